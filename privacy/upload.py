"""The shape of what leaves a device, and the server's view of it.

- dense: every item row of every statistic. Rows the users did not touch are exactly zero, so the
  upload reveals the touched set as plainly as sparse does; it only costs more bytes. The only shape
  SecAgg+ sums (a sparse row set would itself leak).
- sparse: the touched rows and their indices (ITEM_INDEX). Fewest bytes; reveals the touched set.
- padded: sparse, with decoy rows trained like real ones (fedrec.privacy.decoys): hides which rows are
  real among the uploaded ones, with no formal bound.
Under local DP every uploaded coordinate carries each of its users' noise (fedrec.privacy.noise); it
is honest only for dense uploads, since neither sparse indices nor decoy choices are noised.
"""

from __future__ import annotations

import numpy as np

from fedrec.models.algorithm import Statistic, Sums

from .noise import add_device_noise
from .policy import UPDATE_MODES  # noqa: F401 (part of this stage's vocabulary)

ITEM_INDEX = "item-index"


def build_upload(sums: Sums, statistics: dict[str, Statistic], mode: str, noise_std: float = 0.0,
                 rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """The arrays a device sends for the summed contributions of its users; `noise_std`: each user's
    noise per coordinate (0: none), drawn from `rng`, which must then be a private stream."""
    per_item = {name for name, s in statistics.items() if s.per_item}
    values = {name: value.numpy() for name, value in sums.arrays.items()}
    if mode == "dense":
        arrays = {name: value.astype(np.float32, copy=True) for name, value in values.items()}
        some_row = next((values[n] for n in per_item), np.zeros(0))
        per_row_users = np.full(len(some_row), sums.num_users)
    else:
        touched = np.concatenate([t.numpy() for t in sums.pair_item]) if sums.pair_item else np.zeros(0, np.int64)
        rows, per_row_users = np.unique(touched, return_counts=True)  # each (user, item) pair is listed once
        arrays = {ITEM_INDEX: rows.astype(np.int64)}
        arrays |= {name: (value[rows] if name in per_item else value).astype(np.float32)
                   for name, value in values.items()}
    if noise_std > 0:
        if rng is None:
            raise ValueError("device noise needs a private random stream")
        noised = {k: v for k, v in arrays.items() if k != ITEM_INDEX}
        add_device_noise(noised, noise_std, per_row_users, sums.num_users, per_item, rng)
        arrays.update(noised)
    return arrays


def scatter(arrays: dict[str, np.ndarray], statistics: dict[str, Statistic], n_items: int) -> dict[str, np.ndarray]:
    """Dense float64 sums from an upload of any shape (the server's view)."""
    if ITEM_INDEX not in arrays:
        return {name: arrays[name].astype(np.float64) for name in statistics}
    rows = arrays[ITEM_INDEX]
    out = {}
    for name, stat in statistics.items():
        if stat.per_item:
            out[name] = np.zeros((n_items, stat.width))
            out[name][rows] = arrays[name]  # a device lists each row once
        else:
            out[name] = arrays[name].astype(np.float64)
    return out
