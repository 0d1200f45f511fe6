"""Data layer: MovieLens loaders and download, synthetic data, splits, per-user partitions.

Flower-free; `load_split` is the one entry point the rest of fedrec uses.
"""

from .catalog import DATASETS, SPLITS, load_ratings, load_split
from .interactions import DataError, Interactions, Ratings, Split, UserIndex
from .partition import CohortData, cohort, user_partition
from .synthetic import SyntheticSpec, SyntheticTruth, generate

__all__ = [
    "DATASETS", "SPLITS", "load_ratings", "load_split", "DataError", "Interactions", "Ratings",
    "Split", "UserIndex", "CohortData", "cohort", "user_partition", "SyntheticSpec",
    "SyntheticTruth", "generate",
]
