"""The one function that turns a data set and split name (names.py) into a Split."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from .download import dataset_folder
from .interactions import DataError, Interactions, Ratings, Split
from .movielens import load_movielens
from .names import CANONICAL, DATASETS, DEFAULT_SPLIT, MOVIELENS, SPLITS, TEST_FRACTION, TEST_NEGATIVES, SyntheticSpec
from .splits import canonical_split, leave_one_out, random_holdout
from .synthetic import BLOCK_USERS, generate, generate_users, stream_seed, user_blocks


def load_ratings(dataset: str, data_dir: str | None = None, synthetic: SyntheticSpec | None = None,
                 download: bool = True) -> Ratings:
    if dataset == "synthetic":
        return generate(synthetic or SyntheticSpec())[0]
    if dataset not in MOVIELENS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return load_movielens(dataset, dataset_folder(dataset, data_dir, download))


@functools.lru_cache(maxsize=4)
def load_split(dataset: str, split: str = DEFAULT_SPLIT, data_dir: str | None = None, seed: int = 0,
               synthetic: SyntheticSpec | None = None, test_fraction: float = TEST_FRACTION,
               negatives: int = TEST_NEGATIVES, download: bool = True) -> Split:
    """Load `dataset` and split it; cached, since every simulated client of a process asks."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if split in CANONICAL and dataset != "ml-100k":
        raise DataError(f"split {split!r} exists only for ml-100k; use 'random' or 'loo'")
    if dataset == "synthetic":
        return synthetic_split(synthetic or SyntheticSpec(), split, seed, test_fraction, negatives)
    ratings = load_ratings(dataset, data_dir, synthetic, download)
    if split in CANONICAL:
        return canonical_split(ratings, dataset_folder(dataset, data_dir, download), split)
    if split == "loo":
        return leave_one_out(ratings, negatives, seed)
    return random_holdout(ratings, test_fraction, seed)


def synthetic_split(spec: SyntheticSpec, split: str, seed: int, test_fraction: float, negatives: int,
                    lo: int = 0, hi: int | None = None) -> Split:
    """Users lo..hi-1 of the synthetic data set, split block by block (each block of users with
    its own seeded stream), so a node's shard is cut without generating anyone else's ratings."""
    hi = spec.users if hi is None else hi
    parts = []
    for first, last in user_blocks(spec, lo, hi):
        block = (first // BLOCK_USERS) * BLOCK_USERS
        end = min(spec.users, block + BLOCK_USERS)
        data = generate_users(spec, block, end)  # the whole block: its split stream covers all of it
        local = Interactions(data.user - block, data.item, data.rating, data.timestamp)
        ratings = Ratings("synthetic", local, np.arange(end - block), np.arange(spec.items), None, (1.0, 5.0))
        stream = stream_seed(seed, "split", block // BLOCK_USERS)  # np.random.default_rng takes a list as a seed
        part = (leave_one_out(ratings, negatives, stream) if split == "loo"
                else random_holdout(ratings, test_fraction, stream))
        parts.append((_users_between(part, first - block, last - block), block))
    if not parts:
        raise DataError(f"no synthetic users in {lo}..{hi - 1}")
    negatives_ = None if split != "loo" else np.concatenate([p.test_negatives for p, _ in parts])
    return Split("synthetic", split, spec.users, spec.items, _joined(parts, "train"), _joined(parts, "test"),
                 implicit=split == "loo", test_negatives=negatives_, user_ids=np.arange(spec.users),
                 item_ids=np.arange(spec.items))


def _users_between(split: Split, lo: int, hi: int) -> Split:
    if lo == 0 and hi == split.n_users:
        return split
    train = (split.train.user >= lo) & (split.train.user < hi)
    test = (split.test.user >= lo) & (split.test.user < hi)
    negatives = None if split.test_negatives is None else split.test_negatives[test]
    return dataclasses.replace(split, train=split.train.take(train), test=split.test.take(test),
                               test_negatives=negatives, _index={})


def _joined(parts: list[tuple[Split, int]], side: str) -> Interactions:
    """One side of the block splits, their users moved back to global ids."""
    sides = [(getattr(part, side), first) for part, first in parts]
    column = {f: np.concatenate([getattr(rows, f) for rows, _ in sides]) for f in ("item", "rating", "timestamp")}
    return Interactions(np.concatenate([rows.user + first for rows, first in sides]), **column)
