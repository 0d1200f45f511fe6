"""Rating tables as flat numpy arrays, and cheap per-user slicing of them.

Everything downstream (splits, the local training step, federated partitions) works on
these arrays rather than on DataFrames: 100,000-user populations need vectorized access,
not a Python object per rating or per user.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import DataError as DataError  # its home is numpy-free; the loaders import it from here too


@dataclass(frozen=True)
class Interactions:
    """Rows of (user, item, rating, timestamp) with contiguous 0-based ids."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.user)
        if not (len(self.item) == len(self.rating) == len(self.timestamp) == n):
            raise ValueError("Interactions arrays must all have the same length")

    def __len__(self) -> int:
        return len(self.user)

    def take(self, index: np.ndarray) -> "Interactions":
        """Rows selected by a boolean mask or an index array."""
        return Interactions(self.user[index], self.item[index], self.rating[index], self.timestamp[index])

    @staticmethod
    def build(user, item, rating, timestamp=None) -> "Interactions":
        user = np.asarray(user, dtype=np.int64)
        ts = np.zeros(len(user), np.int64) if timestamp is None else np.asarray(timestamp, np.int64)
        return Interactions(user, np.asarray(item, np.int64), np.asarray(rating, np.float32), ts)


@dataclass(frozen=True)
class Ratings:
    """A whole data set: interactions plus the maps back to the original ids."""

    name: str
    data: Interactions
    user_ids: np.ndarray  # original id of contiguous user u
    item_ids: np.ndarray  # original id of contiguous item i
    item_titles: np.ndarray | None = None  # title of contiguous item i, where known
    rating_scale: tuple[float, float] = (1.0, 5.0)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True)
class UserIndex:
    """CSR view of interactions grouped by user: O(1) access to one user's rows."""

    rows: np.ndarray  # row numbers into the source Interactions, grouped by user
    indptr: np.ndarray  # user u's rows are rows[indptr[u]:indptr[u+1]]

    @staticmethod
    def build(data: Interactions, n_users: int) -> "UserIndex":
        rows = np.argsort(data.user, kind="stable")
        counts = np.bincount(data.user, minlength=n_users)
        return UserIndex(rows, np.concatenate([[0], np.cumsum(counts)]))

    def counts(self, users: np.ndarray | None = None) -> np.ndarray:
        c = np.diff(self.indptr)
        return c if users is None else c[users]

    def gather(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of several users at once, and for each row its user's position in `users`."""
        users = np.asarray(users, dtype=np.int64)
        lengths = self.indptr[users + 1] - self.indptr[users]
        segment = np.repeat(np.arange(len(users)), lengths)
        starts = np.repeat(self.indptr[users] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return self.rows[starts + np.arange(lengths.sum())], segment


@dataclass(frozen=True)
class Split:
    """Train/test interactions of one data set under one split rule.

    `test_negatives[j]` holds the sampled negative items of test row j (leave-one-out
    ranking evaluation); None for rating-prediction splits. `test_validation[j]` marks test row j
    as a validation row, scored apart from the test rows (None: none are).
    """

    dataset: str
    split: str
    n_users: int
    n_items: int
    train: Interactions
    test: Interactions
    implicit: bool = False
    test_negatives: np.ndarray | None = None
    rating_scale: tuple[float, float] = (1.0, 5.0)
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None
    item_titles: np.ndarray | None = None
    test_validation: np.ndarray | None = None  # True on test rows that are validation items (validation_item)
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def train_index(self) -> UserIndex:
        if "train" not in self._index:
            self._index["train"] = UserIndex.build(self.train, self.n_users)
        return self._index["train"]

    def test_index(self) -> UserIndex:
        if "test" not in self._index:
            self._index["test"] = UserIndex.build(self.test, self.n_users)
        return self._index["test"]
