"""Data layer: MovieLens loaders and download, synthetic data, splits, per-user partitions.

Flower-free; `load_split` is the one entry point the rest of fedrec uses. The names below load
on first use, so that `fedrec.datasets.names` (what the run config and the command line read)
comes without numpy or pandas.
"""

import importlib

_HOMES = {
    "DATASETS": "names", "SPLITS": "names", "SyntheticSpec": "names", "DataError": "errors",
    "load_ratings": "catalog", "load_split": "catalog",
    "Interactions": "interactions", "Ratings": "interactions", "Split": "interactions", "UserIndex": "interactions",
    "CohortData": "partition", "cohort": "partition", "user_partition": "partition",
    "SyntheticTruth": "synthetic", "generate": "synthetic",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
