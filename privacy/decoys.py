"""Decoy rows for padded uploads: which unrated items a device trains beside its users' rated ones.

No formal guarantee: a padded upload still lists a superset of the rated items; decoys only make the
rated rows harder to pick out. Decoy items are drawn in proportion to a public popularity proxy (the
norms of the item rows the device received), because users rate popular items far more often than
uniform draws would suggest and an observer could tell them apart. The draw's key comes from OS
entropy (fedrec.models.randomness.private_key): whoever knows it regenerates the decoys and strips them.
Draws are counter-based per (key, user), so a user's decoys do not depend on who shares its node.
"""

from __future__ import annotations

import numpy as np
import torch

from fedrec.models.algorithm import Decoys
from fedrec.models.randomness import mix64, uniform01


def choose(users: np.ndarray, segment: np.ndarray, items: np.ndarray, n_items: int, ratio: float, key: int,
           item_weight: np.ndarray | None = None) -> Decoys:
    """About `ratio` x each user's rated count of decoy (user position, item) pairs, one per item."""
    counts = np.bincount(segment, minlength=len(users))
    want = np.minimum(np.rint(counts * ratio).astype(np.int64), n_items - counts)
    tries = 3 * want  # room for draws that hit a rated item or repeat
    draw_seg = np.repeat(np.arange(len(users)), tries)
    counter = np.arange(len(draw_seg)) - np.repeat(np.cumsum(tries) - tries, tries)
    base = mix64(np.asarray(users, np.uint64)[draw_seg] ^ np.uint64(key & (2**64 - 1)))
    bits = mix64(base + counter.astype(np.uint64) * np.uint64(2))
    weight = np.ones(n_items) if item_weight is None else item_weight
    cdf = np.cumsum(weight) / weight.sum()
    draw_item = np.minimum(np.searchsorted(cdf, uniform01(bits), side="right"), n_items - 1)
    rated = np.sort(segment * n_items + items)
    code = draw_seg * n_items + draw_item
    pos = np.minimum(np.searchsorted(rated, code), max(len(rated) - 1, 0))
    fresh = rated[pos] != code if len(rated) else np.ones(len(code), bool)
    code, bits = code[fresh], bits[fresh]
    _, first = np.unique(code, return_index=True)  # one decoy per item per user
    first = np.sort(first)
    code, bits = code[first], bits[first]
    seg = code // n_items
    rank = np.arange(len(seg)) - np.searchsorted(seg, seg)  # seg is grouped: position within the user
    keep = rank < want[seg]
    seg, item, bits = seg[keep], code[keep] % n_items, bits[keep]
    # one more counter draw of the same (user, draw): picks the decoy's made-up target
    return Decoys(seg, item, uniform01(mix64(bits + np.uint64(1))))


def public_popularity(shared: dict[str, torch.Tensor], n_items: int) -> np.ndarray:
    """A popularity proxy every device can compute from what it received: the norm of each item's
    shared rows (every per-item array), plus a floor so every item can be drawn."""
    norm = np.zeros(n_items)
    for value in shared.values():
        if value.ndim and value.shape[0] == n_items:
            norm += value.reshape(n_items, -1).double().norm(dim=1).numpy()
    return norm + 1e-6
