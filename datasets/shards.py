"""Per-node shards: what one node holds on disk, its own users' rows and nothing else.

A shard set is a directory with one `node-PPPPP/` per node and the public item metadata
(`items.json`: original ids and titles). A shard holds `meta.json` (which users, how many
items, the rating scale, the data key it was cut for) and flat `.npy` arrays grouped by
user (CSR: user j's rows are `[indptr[j], indptr[j+1])`), opened memory-mapped, so a node's
memory grows with the rows its sampled users touch, not with the population.

A set is written once into a temporary directory and renamed into place, so a reader sees
a whole set or none, and two processes racing to build the same set both end with it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .interactions import DataError
from .partition import CohortData

SHARD_FORMAT = 2  # 2: train_time.npy, the training rows' timestamps (recency re-scoring on the device)
_ARRAYS = ("train_indptr", "train_item", "train_rating", "train_time", "test_indptr", "test_item", "test_rating")


@dataclass(frozen=True)
class ShardMeta:
    partition_id: int
    num_partitions: int
    first_user: int  # global id of the shard's first user; its users are contiguous
    num_users: int
    population: int
    n_items: int
    rating_scale: tuple[float, float]
    implicit: bool
    data_key: str  # what data and split the shard was cut from (fedrec.run.build.data_key)


@dataclass(frozen=True)
class Shard:
    """One node's users and their rows; arrays memory-mapped read-only."""

    meta: ShardMeta
    train_indptr: np.ndarray
    train_item: np.ndarray
    train_rating: np.ndarray
    train_time: np.ndarray
    test_indptr: np.ndarray
    test_item: np.ndarray
    test_rating: np.ndarray
    test_negatives: np.ndarray | None
    test_validation: np.ndarray | None = None

    @property
    def users(self) -> np.ndarray:
        return np.arange(self.meta.first_user, self.meta.first_user + self.meta.num_users)

    def cohort(self, positions: np.ndarray) -> CohortData:
        """The rows of the shard's users at `positions` (sorted), copied out of the map."""
        positions = np.asarray(positions, dtype=np.int64)
        train, train_seg = _gather(self.train_indptr, positions)
        test, test_seg = _gather(self.test_indptr, positions)
        negatives = None if self.test_negatives is None else np.asarray(self.test_negatives[test], np.int64)
        return CohortData(self.users[positions], train_seg, self.train_item[train].astype(np.int64),
                          np.asarray(self.train_rating[train]), test_seg, self.test_item[test].astype(np.int64),
                          np.asarray(self.test_rating[test]), negatives, np.asarray(self.train_time[train]),
                          None if self.test_validation is None else np.asarray(self.test_validation[test]))

    def train_counts(self) -> np.ndarray:
        return np.diff(self.train_indptr)


def _gather(indptr: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of the users at `positions`, and each row's position in `positions`."""
    starts, lengths = indptr[positions], indptr[positions + 1] - indptr[positions]
    segment = np.repeat(np.arange(len(positions)), lengths)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return offsets + np.arange(int(lengths.sum())), segment


def node_name(partition_id: int) -> str:
    return f"node-{partition_id:05d}"


def open_shard(path: str | Path) -> Shard:
    path = Path(path)
    try:
        raw = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path} is not a fedrec shard ({error}); write one with `fedrec partition`") from None
    if raw.pop("format", None) != SHARD_FORMAT:
        raise DataError(f"{path} was written by another fedrec version; write it again with `fedrec partition`")
    meta = ShardMeta(**{**raw, "rating_scale": tuple(raw["rating_scale"])})
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in _ARRAYS}
    optional = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                if (path / f"{name}.npy").is_file() else None for name in ("test_negatives", "test_validation")}
    return Shard(meta, **arrays, **optional)


def read_items(shard_set: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The public item catalogue of a shard set: original item ids and titles (None if unknown)."""
    items = json.loads((Path(shard_set) / "items.json").read_text())
    return np.asarray(items["item_ids"]), None if items["titles"] is None else np.asarray(items["titles"])


def write_shards(root: str | Path, bounds: np.ndarray, rows_of: Callable[[int, int], CohortData], *,
                 population: int, n_items: int, rating_scale: tuple[float, float], implicit: bool, data_key: str,
                 item_ids: np.ndarray, titles: np.ndarray | None,
                 progress: Callable[[int], None] | None = None) -> Path:
    """Write the set for nodes p = 0..len(bounds)-2, node p hosting users bounds[p]..bounds[p+1]-1,
    whose rows `rows_of(lo, hi)` returns. Returns `root`; an existing complete set is kept."""
    root = Path(root)
    if (root / "items.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for p in range(len(bounds) - 1):
            lo, hi = int(bounds[p]), int(bounds[p + 1])
            meta = ShardMeta(p, len(bounds) - 1, lo, hi - lo, population, n_items, rating_scale, implicit, data_key)
            _write_shard(tmp / node_name(p), meta, rows_of(lo, hi))
            if progress:
                progress(p + 1)
        items = {"item_ids": np.asarray(item_ids).tolist(),
                 "titles": None if titles is None else [str(t) for t in titles]}
        (tmp / "items.json").write_text(json.dumps(items))
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished the same set first
            if not (root / "items.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_shard(path: Path, meta: ShardMeta, rows: CohortData) -> None:
    path.mkdir()
    n = meta.num_users
    arrays = {
        "train_indptr": _indptr(rows.train_segment, n), "train_item": rows.train_item.astype(np.int32),
        "train_rating": rows.train_rating.astype(np.float32), "train_time": rows.train_time.astype(np.int64),
        "test_indptr": _indptr(rows.test_segment, n), "test_item": rows.test_item.astype(np.int32),
        "test_rating": rows.test_rating.astype(np.float32),
    }
    if rows.test_negatives is not None:
        arrays["test_negatives"] = rows.test_negatives.astype(np.int32)
    if rows.test_validation is not None:
        arrays["test_validation"] = rows.test_validation.astype(bool)
    for name, values in arrays.items():
        np.save(path / f"{name}.npy", values, allow_pickle=False)
    (path / "meta.json").write_text(json.dumps({"format": SHARD_FORMAT, **meta.__dict__}, indent=1))


def _indptr(segment: np.ndarray, n: int) -> np.ndarray:
    if len(segment) and np.any(np.diff(segment) < 0):
        raise ValueError("rows must be grouped by user")  # cohort() gathers them that way
    return np.concatenate([[0], np.cumsum(np.bincount(segment, minlength=n))]).astype(np.int64)
