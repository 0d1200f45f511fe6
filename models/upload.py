"""What leaves a device: the item-side update in one of three shapes, optionally noised.

- dense: every item row. Rows the user did not rate are exactly zero, so the upload
  reveals the rated set as plainly as sparse does; it only costs more bytes.
- sparse: the rated rows and their indices. Fewest bytes; reveals the rated set.
- padded: the rated rows plus decoy rows of unrated items whose updates are drawn to look
  like real ones (see local_train); hides which rows are real as far as their values
  allow, at the cost of extra bytes and of noise in the decoy items' rows.
Local DP adds Gaussian noise to every uploaded coordinate on the device.
"""

from __future__ import annotations

import numpy as np

from .local import LocalUpdate
from .mf import GLOBAL_BIAS, ITEM_BIAS, ITEM_EMB, Hyper

ITEM_INDEX = "item-index"


def decoy_rows(users: np.ndarray, segment: np.ndarray, items: np.ndarray, n_items: int, ratio: float,
               hyper: Hyper, round_: int, item_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(segment, item, standard normal) of decoy rows: about ratio x each user's rated count.

    Decoy items are drawn in proportion to `item_weight` (the client passes the norms of the
    item rows it received, a public proxy for popularity), because users rate popular items
    far more often than uniform draws would suggest and an observer could tell them apart.
    """
    gen = np.random.default_rng([hyper.seed, round_, int(users[0]) if len(users) else 0, 7])
    counts = np.bincount(segment, minlength=len(users))
    want = np.minimum(np.rint(counts * ratio).astype(np.int64), n_items - counts)
    p = None if item_weight is None else item_weight / item_weight.sum()
    draw_seg = np.repeat(np.arange(len(users)), 3 * want)  # 3x: room for rejected draws
    draw_item = gen.choice(n_items, size=len(draw_seg), p=p)
    rated = np.sort(segment * n_items + items)
    key = draw_seg * n_items + draw_item
    pos = np.minimum(np.searchsorted(rated, key), max(len(rated) - 1, 0))
    fresh = rated[pos] != key if len(rated) else np.ones(len(key), bool)
    key = key[fresh]
    _, first = np.unique(key, return_index=True)  # one decoy per item per user
    key = key[np.sort(first)]
    seg = key // n_items
    rank = np.arange(len(seg)) - np.searchsorted(seg, seg)  # seg is grouped: position within the user
    key = key[rank < want[seg]]
    seg, item = key // n_items, key % n_items
    return seg, item, gen.standard_normal(len(seg)).astype(np.float32)


def build_upload(update: LocalUpdate, mode: str, local_noise_std: float = 0.0,
                 rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """The arrays a node sends for the summed update of its users.

    local_noise_std: std of each user's on-device noise per coordinate (0: none). Users of a
    cohort noise their own uploads independently; their sum carries per coordinate the
    noise of every user that uploaded it, drawn here directly from that sum's distribution.
    """
    emb, bias, mu = update.emb_delta.numpy(), update.bias_delta.numpy(), update.global_bias_delta.numpy()
    n_users = update.num_users
    if mode == "dense":
        arrays = {ITEM_EMB: emb.copy(), ITEM_BIAS: bias.copy(), GLOBAL_BIAS: mu.copy()}
        per_row_users = np.full(len(bias), n_users)
    else:
        pairs = np.unique(update.row_segment.numpy().astype(np.int64) * len(bias) + update.touched.numpy())
        rows, per_row_users = np.unique(pairs % len(bias), return_counts=True)
        arrays = {ITEM_INDEX: rows.astype(np.int64), ITEM_EMB: emb[rows], ITEM_BIAS: bias[rows], GLOBAL_BIAS: mu.copy()}
    if local_noise_std > 0:
        rng = rng or np.random.default_rng()
        scale = local_noise_std * np.sqrt(per_row_users).astype(np.float32)
        arrays[ITEM_EMB] = arrays[ITEM_EMB] + rng.normal(size=arrays[ITEM_EMB].shape).astype(np.float32) * scale[:, None]
        arrays[ITEM_BIAS] = arrays[ITEM_BIAS] + rng.normal(size=len(scale)).astype(np.float32) * scale
        arrays[GLOBAL_BIAS] = arrays[GLOBAL_BIAS] + np.float32(rng.normal() * local_noise_std * np.sqrt(n_users))
    return arrays


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
