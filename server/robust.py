"""Robust aggregation: how much of each accepted reply the server applies.

Validation (fedrec.server.validation) drops replies that break the protocol; a reply can
still be well formed and hostile, e.g. a device sending -1000 x its update. Without
clipping nothing bounds it, and one such reply in a hundred wrecks the model.

`--robust-aggregation norm-bound` drops (scale 0) each reply whose norm exceeds
    robust_bound x (median per-user norm of the round's replies) x (users it sums),
the triangle-inequality bound of a sum of users whose updates are at most robust_bound
times a typical one. The median is over replies (each reply's norm / its users), so it
holds while fewer than half the replies are hostile. A single reply (a SecAgg+ sum, one
node) is its own median and is never touched: the server cannot tell its parts apart.

Why drop rather than scale down to the bound: FedAdam (the default) normalizes each
coordinate, so a reply scaled to the bound still sets the direction of the item rows that
only it touched this round; on ML-100K that left +1.35% RMSE where dropping leaves none
(docs/results.md, Poisoning). An attacker who knows the rule can still send up to the bound,
as with scaling. Honest replies stay far inside it (the largest per-user norm of 6,000
honest ML-100K replies was 7.8 x the round's median, against the default bound of 10).

Not under DP. A bound computed from the round's replies depends on every user's data, so
dropping by it would change the sum's sensitivity and the accountant's epsilon would be
wrong. Under DP the defence is the fixed, data-independent bound instead: a reply summing
n users above n·C is rejected by validation (every honest device clips to C), and no
reply is touched here.
"""

from __future__ import annotations

import numpy as np

from fedrec.run.config import RunConfig


def reply_scales(norms: np.ndarray, users: np.ndarray, cfg: RunConfig, private: bool) -> np.ndarray:
    """Factor in {0, 1} applied to each accepted reply's update, given each reply's L2 norm and user count."""
    scales = np.ones(len(norms))
    if cfg.robust_aggregation == "none" or private or len(norms) == 0:
        return scales
    counted = users > 0
    if not counted.any():
        return scales
    bound = cfg.robust_bound * np.median(norms[counted] / users[counted]) * users
    scales[norms > bound] = 0.0  # a reply with 0 users and a non-zero update too
    return scales
