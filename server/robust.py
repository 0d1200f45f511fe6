"""Robust aggregation: how much of each accepted reply the server applies.

Validation (fedrec.server.validation) drops replies that break the protocol; a reply can
still be well formed and hostile, e.g. a device sending -1000 x its update. Without
clipping nothing bounds it, and one such reply in a hundred wrecks the model.

`--robust-aggregation norm-bound` scales each reply down to at most
    robust_bound x (median per-user norm of the round's replies) x (users it sums),
the triangle-inequality bound of a sum of users whose updates are at most robust_bound
times a typical one. The median is over replies (each reply's norm / its users), so it
holds while fewer than half the replies are hostile. A single reply (a SecAgg+ sum, one
node) is its own median and is never scaled: the server cannot tell its parts apart.

Not under DP. A bound computed from the round's replies depends on every user's data, so
the sensitivity of the sum would no longer be C and the accountant's epsilon would be
wrong; scaling every reply by data-dependent factors also changes what the noise is
calibrated to. Under DP the defence is the fixed, data-independent bound instead: a reply
summing n users above n·C is rejected by validation (the clipping every honest device
applies), and then no reply is scaled here.
"""

from __future__ import annotations

import numpy as np

from fedrec.common.config import RunConfig


def reply_scales(norms: np.ndarray, users: np.ndarray, cfg: RunConfig, private: bool) -> np.ndarray:
    """Factor in [0, 1] applied to each accepted reply's update, given each reply's L2 norm and user count."""
    scales = np.ones(len(norms))
    if cfg.robust_aggregation == "none" or private or len(norms) == 0:
        return scales
    counted = users > 0
    if not counted.any():
        return scales
    per_user = np.median(norms[counted] / users[counted])
    bound = cfg.robust_bound * per_user * users
    over = norms > bound
    scales[over] = bound[over] / norms[over]  # a reply with 0 users and a non-zero update is zeroed
    return scales
