"""What one device holds: a user's own train and test ratings, and nothing else."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .interactions import Split


@dataclass(frozen=True)
class CohortData:
    """Ratings of several users, flattened; `segment[j]` is row j's position in `users`.

    One user is the cohort of size one (the deployment shape)."""

    users: np.ndarray
    train_segment: np.ndarray
    train_item: np.ndarray
    train_rating: np.ndarray
    test_segment: np.ndarray
    test_item: np.ndarray
    test_rating: np.ndarray
    test_negatives: np.ndarray | None  # [len(test rows), n] for leave-one-out
    train_time: np.ndarray | None = None  # timestamps of the training rows (the device's own; never sent)
    test_validation: np.ndarray | None = None  # True on held-out rows that are validation items

    def validation_side(self, validation: bool) -> "CohortData":
        """The cohort with only its validation rows (True) or only its test rows (False) held out."""
        keep = self.test_validation == validation
        return dataclasses.replace(self, test_segment=self.test_segment[keep], test_item=self.test_item[keep],
                                   test_rating=self.test_rating[keep], test_validation=None,
                                   test_negatives=None if self.test_negatives is None else self.test_negatives[keep])

    def train_counts(self) -> np.ndarray:
        return np.bincount(self.train_segment, minlength=len(self.users))

    def subset(self, positions: np.ndarray) -> "CohortData":
        """The cohort of users[positions] (positions sorted), segments renumbered."""
        new_position = np.full(len(self.users), -1)
        new_position[positions] = np.arange(len(positions))
        train = new_position[self.train_segment] >= 0
        test = new_position[self.test_segment] >= 0
        negatives = None if self.test_negatives is None else self.test_negatives[test]
        return CohortData(self.users[positions], new_position[self.train_segment[train]], self.train_item[train],
                          self.train_rating[train], new_position[self.test_segment[test]], self.test_item[test],
                          self.test_rating[test], negatives,
                          None if self.train_time is None else self.train_time[train],
                          None if self.test_validation is None else self.test_validation[test])


def cohort(split: Split, users) -> CohortData:
    """The partitions of `users`, gathered with index arithmetic (no per-user Python)."""
    users = np.asarray(users, dtype=np.int64)
    train_rows, train_seg = split.train_index().gather(users)
    test_rows, test_seg = split.test_index().gather(users)
    negatives = None if split.test_negatives is None else split.test_negatives[test_rows]
    return CohortData(
        users, train_seg, split.train.item[train_rows], split.train.rating[train_rows],
        test_seg, split.test.item[test_rows], split.test.rating[test_rows], negatives,
        split.train.timestamp[train_rows], None if split.test_validation is None else split.test_validation[test_rows],
    )


def user_partition(split: Split, user: int) -> CohortData:
    """One user's device data."""
    return cohort(split, [user])
