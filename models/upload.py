"""What leaves a device: the item-side update in one of three shapes, optionally noised.

- dense: every item row. Rows the user did not rate are exactly zero, so the upload
  reveals the rated set as plainly as sparse does; it only costs more bytes.
- sparse: the rated rows and their indices. Fewest bytes; reveals the rated set.
- padded: the rated rows plus decoy rows of unrated items, trained like real rows on a
  made-up rating (the prediction plus one of the user's real residuals) or label 1; hides which rows
  are real among the uploaded ones, at the cost of extra bytes and of noise in the decoy
  items' rows. No formal guarantee: an upload still lists a superset of the rated items.
Local DP adds Gaussian noise to every uploaded coordinate on the device; it is honest
only for dense uploads, since neither sparse indices nor decoy choices are noised.
"""

from __future__ import annotations

import numpy as np

from .local import LocalUpdate
from .mf import GLOBAL_BIAS, ITEM_BIAS, ITEM_EMB
from .randomness import mix64, uniform01

ITEM_INDEX = "item-index"


def decoy_rows(users: np.ndarray, segment: np.ndarray, items: np.ndarray, n_items: int, ratio: float,
               key: int, item_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(segment, item, uniform in [0, 1)) of decoy rows: about ratio x each user's rated count.

    Decoy items are drawn in proportion to `item_weight` (the norms of the item rows the
    device received, a public proxy for popularity), because users rate popular items far
    more often than uniform draws would suggest and an observer could tell them apart.
    `key` must be secret (fedrec.models.randomness.private_key): whoever knows it can
    regenerate the decoys and strip them off. Draws are counter-based per (key, user), so a
    user's decoys do not depend on who shares its node.
    """
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
    return seg, item, uniform01(mix64(bits + np.uint64(1)))


def build_upload(update: LocalUpdate, mode: str, local_noise_std: float = 0.0,
                 rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """The arrays a node sends for the summed update of its users.

    local_noise_std: std of each user's on-device noise per coordinate (0: none); `rng`
    must then be a private stream (fedrec.models.randomness.private_rng). Users of a cohort
    noise their own uploads independently; their sum carries per coordinate the noise of
    every user that uploaded it, drawn here directly from that sum's distribution.
    """
    emb, bias, mu = update.emb_delta.numpy(), update.bias_delta.numpy(), update.global_bias_delta.numpy()
    n_users = update.num_users
    if mode == "dense":
        arrays = {ITEM_EMB: emb.copy(), ITEM_BIAS: bias.copy(), GLOBAL_BIAS: mu.copy()}
        per_row_users = np.full(len(bias), n_users)
    else:
        rows, per_row_users = np.unique(update.pair_item.numpy(), return_counts=True)  # pairs are distinct
        arrays = {ITEM_INDEX: rows.astype(np.int64), ITEM_EMB: emb[rows], ITEM_BIAS: bias[rows], GLOBAL_BIAS: mu.copy()}
    if local_noise_std > 0:
        if rng is None:
            raise ValueError("local noise needs a private random stream")
        add_device_noise(arrays, local_noise_std, per_row_users, n_users, rng)
    return arrays


def add_device_noise(arrays: dict[str, np.ndarray], std: float, per_row_users: np.ndarray, n_users: int,
                     rng: np.random.Generator) -> None:
    """Add, in place, the sum of `per_row_users` independent N(0, std^2) per coordinate of
    each row (and of `n_users` to the global bias)."""
    scale = std * np.sqrt(per_row_users).astype(np.float32)
    arrays[ITEM_EMB] = arrays[ITEM_EMB] + rng.normal(size=arrays[ITEM_EMB].shape).astype(np.float32) * scale[:, None]
    arrays[ITEM_BIAS] = arrays[ITEM_BIAS] + rng.normal(size=len(scale)).astype(np.float32) * scale
    arrays[GLOBAL_BIAS] = arrays[GLOBAL_BIAS] + np.float32(rng.normal() * std * np.sqrt(n_users))


def scatter_upload(arrays: dict[str, np.ndarray], n_items: int, dim: int) -> dict[str, np.ndarray]:
    """Dense float64 sums from an upload of any mode (the server's view)."""
    if ITEM_INDEX not in arrays:
        return {k: arrays[k].astype(np.float64) for k in (ITEM_EMB, ITEM_BIAS, GLOBAL_BIAS)}
    rows = arrays[ITEM_INDEX]
    emb = np.zeros((n_items, dim))
    bias = np.zeros(n_items)
    emb[rows] = arrays[ITEM_EMB]  # a node lists each row once
    bias[rows] = arrays[ITEM_BIAS]
    return {ITEM_EMB: emb, ITEM_BIAS: bias, GLOBAL_BIAS: arrays[GLOBAL_BIAS].astype(np.float64)}
