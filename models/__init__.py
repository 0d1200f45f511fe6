"""Flower-free core: the MF model, the local training step, metrics, the central trainer.

The names below load on first use, so that `fedrec.models.defaults` (what the run config and
the command line read) comes without torch.
"""

import importlib

_HOMES = {
    "CentralResult": "central", "initial_global_bias": "central", "train_central": "central",
    "evaluate_rows": "evaluate", "LocalUpdate": "local", "local_train": "local", "sample_negatives": "local",
    "training_rows": "local", "finish": "metrics", "Hyper": "defaults", "ItemParams": "mf", "UserState": "mf",
    "predict": "mf", "SERVER_OPTIMIZERS": "defaults", "ServerOptimizer": "server_opt",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
