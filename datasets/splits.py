"""Train/test splits, deterministic for a seed.

Users and items that appear only in test: every rule here keeps each user in train (random
holdout keeps at least one training rating per user; leave-one-out holds out one of at
least two). Items can still appear only in test (always possible in u1-u5, rare
elsewhere); the model never updates them, so they score with their initial parameters:
zero bias and a small random embedding, i.e. close to global mean + user bias.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .interactions import DataError, Interactions, Ratings, Split, UserIndex
from .movielens import map_ids, read_ratings_file
from .names import CANONICAL, FORMATS, TEST_FRACTION, TEST_NEGATIVES


def _split(ratings: Ratings, name: str, train: Interactions, test: Interactions, **extra) -> Split:
    return Split(ratings.name, name, ratings.n_users, ratings.n_items, train, test,
                 rating_scale=ratings.rating_scale, user_ids=ratings.user_ids,
                 item_ids=ratings.item_ids, item_titles=ratings.item_titles, **extra)


def canonical_split(ratings: Ratings, folder: Path, fold: str) -> Split:
    """The published ML-100K folds uN.base / uN.test, on the ids of the full u.data."""
    if ratings.name != "ml-100k" or fold not in CANONICAL:
        raise DataError(f"split {fold!r} exists only for ml-100k (u1..u5); use 'random' or 'loo'")
    fmt = FORMATS["ml-100k"]
    parts = []
    for suffix in ("base", "test"):
        path = Path(folder) / f"{fold}.{suffix}"
        parts.append(map_ids(read_ratings_file(path, fmt), ratings, path))
    return _split(ratings, fold, parts[0], parts[1])


def _rank_within_user(data: Interactions, key: np.ndarray) -> np.ndarray:
    """Position of each row among its user's rows, ordered by `key` ascending."""
    if len(key) and key.min() >= 0 and key.max() < 1:  # one float sort orders by user, then key: 5x lexsort's speed
        order = np.argsort(data.user + key)
    else:
        order = np.lexsort((key, data.user))
    counts = np.bincount(data.user)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(data), np.int64)
    rank[order] = np.arange(len(data)) - np.repeat(starts, counts)
    return rank


def random_holdout(ratings: Ratings, test_fraction: float = TEST_FRACTION, seed: int = 0) -> Split:
    """Hold out a random `test_fraction` of each user's ratings; keep at least one in train."""
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be between 0 and 1")
    data = ratings.data
    rng = np.random.default_rng(seed)
    rank = _rank_within_user(data, rng.random(len(data)))
    counts = np.bincount(data.user, minlength=ratings.n_users)
    n_test = np.minimum(np.rint(counts * test_fraction).astype(np.int64), counts - 1)
    is_test = rank < n_test[data.user]
    return _split(ratings, "random", data.take(~is_test), data.take(is_test))


def leave_one_out(ratings: Ratings, n_negatives: int = TEST_NEGATIVES, seed: int = 0) -> Split:
    """Each user's latest interaction is the test positive; sampled negatives are items the
    user never interacted with. Ratings become implicit feedback (every rating = positive).
    Users with a single interaction, or with fewer than `n_negatives` unrated items, stay in
    train only. Timestamp ties break at random."""
    data = ratings.data
    rng = np.random.default_rng(seed)
    latest_first = -data.timestamp.astype(np.float64) + rng.random(len(data)) * 0.5
    rank = _rank_within_user(data, latest_first)
    counts = np.bincount(data.user, minlength=ratings.n_users)
    eligible = (counts >= 2) & (ratings.n_items - counts >= n_negatives)
    if not eligible.any():
        raise DataError(f"{ratings.name}: no user has {n_negatives} unrated items to sample as negatives; "
                        "lower the number of negatives")
    is_test = (rank == 0) & eligible[data.user]
    train, test = data.take(~is_test), data.take(is_test)
    negatives = sample_negatives(UserIndex.build(data, ratings.n_users), data.item, test.user,
                                 ratings.n_items, n_negatives, rng)
    return _split(ratings, "loo", train, test, implicit=True, test_negatives=negatives)


def validation_split(split: Split, fraction: float = TEST_FRACTION, negatives: int = TEST_NEGATIVES,
                     seed=0) -> Split:
    """A split of `split`'s training rows alone, for choosing settings: the rule of the test side
    applied again inside train (a per-user random holdout of `fraction`; leave-one-out of the
    training interactions for implicit splits). Its test side is validation rows; the real test
    rows are not looked at."""
    users = split.user_ids if split.user_ids is not None else np.arange(split.n_users)
    items = split.item_ids if split.item_ids is not None else np.arange(split.n_items)
    train_only = Ratings(split.dataset, split.train, users, items, split.item_titles, split.rating_scale)
    held = leave_one_out(train_only, negatives, seed) if split.implicit else random_holdout(train_only, fraction, seed)
    return dataclasses.replace(held, split=f"{split.split}-validation", user_ids=split.user_ids,
                               item_ids=split.item_ids, _index={})


def with_validation_item(split: Split, negatives: int = TEST_NEGATIVES, seed=0) -> Split:
    """`split` (leave-one-out) with each user's latest training interaction held out as well, as a
    validation item with its own sampled negatives: the protocol of NCF and PFedRec, which score both
    items each round and report the test metrics of the best-validation round. The validation rows
    join the test side, marked by `test_validation`; training keeps the rest."""
    held = validation_split(split, negatives=negatives, seed=seed)
    test = Interactions(*(np.concatenate([getattr(split.test, f), getattr(held.test, f)])
                          for f in ("user", "item", "rating", "timestamp")))
    marks = np.concatenate([np.zeros(len(split.test), bool), np.ones(len(held.test), bool)])
    return dataclasses.replace(split, train=held.train, test=test, test_validation=marks, _index={},
                               test_negatives=np.concatenate([split.test_negatives, held.test_negatives]))


def sample_negatives(index: UserIndex, items: np.ndarray, users: np.ndarray, n_items: int,
                     n: int, rng: np.random.Generator) -> np.ndarray:
    """For each entry of `users`, n distinct items that user never interacted with."""
    out = np.empty((len(users), n), np.int64)
    for j, u in enumerate(users):  # once per test user, at split time only
        seen = items[index.rows[index.indptr[u]:index.indptr[u + 1]]]
        pool_size = n_items - len(np.unique(seen))
        candidates = np.setdiff1d(rng.choice(n_items, size=min(n_items, 2 * n + len(seen)), replace=False), seen)
        if len(candidates) < n:
            candidates = np.setdiff1d(np.arange(n_items), seen)
        out[j] = rng.choice(candidates, size=n, replace=False) if pool_size >= n else candidates[:n]
    return out
