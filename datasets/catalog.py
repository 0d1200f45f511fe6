"""Names of data sets and splits, and the one function that turns them into a Split."""

from __future__ import annotations

import functools

from .download import dataset_folder
from .interactions import DataError, Ratings, Split
from .movielens import MOVIELENS, load_movielens
from .splits import CANONICAL, canonical_split, leave_one_out, random_holdout
from .synthetic import SyntheticSpec, generate

DATASETS = (*MOVIELENS, "synthetic")
SPLITS = (*CANONICAL, "random", "loo")


def load_ratings(dataset: str, data_dir: str | None = None, synthetic: SyntheticSpec | None = None,
                 download: bool = True) -> Ratings:
    if dataset == "synthetic":
        return generate(synthetic or SyntheticSpec())[0]
    if dataset not in MOVIELENS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return load_movielens(dataset, dataset_folder(dataset, data_dir, download))


@functools.lru_cache(maxsize=4)
def load_split(dataset: str, split: str = "random", data_dir: str | None = None, seed: int = 0,
               synthetic: SyntheticSpec | None = None, test_fraction: float = 0.2,
               negatives: int = 99, download: bool = True) -> Split:
    """Load `dataset` and split it; cached, since every simulated client of a process asks."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if split in CANONICAL and dataset != "ml-100k":
        raise DataError(f"split {split!r} exists only for ml-100k; use 'random' or 'loo'")
    ratings = load_ratings(dataset, data_dir, synthetic, download)
    if split in CANONICAL:
        return canonical_split(ratings, dataset_folder(dataset, data_dir, download), split)
    if split == "loo":
        return leave_one_out(ratings, negatives, seed)
    return random_holdout(ratings, test_fraction, seed)
