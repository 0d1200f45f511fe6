"""Flower-free core: the MF model, the local training step, metrics, the central trainer."""

from .central import CentralResult, initial_global_bias, train_central
from .evaluate import evaluate_rows
from .local import LocalUpdate, local_train, sample_negatives, training_rows
from .metrics import finish
from .mf import Hyper, ItemParams, UserState, predict
from .server_opt import SERVER_OPTIMIZERS, ServerOptimizer

__all__ = [
    "CentralResult", "initial_global_bias", "train_central", "evaluate_rows", "LocalUpdate", "local_train",
    "sample_negatives", "training_rows", "finish", "Hyper", "ItemParams", "UserState", "predict",
    "SERVER_OPTIMIZERS", "ServerOptimizer",
]
