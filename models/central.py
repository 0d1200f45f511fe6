"""The central baseline: the same algorithm with every user's data in one place and every user in every
step (one step = one epoch). It runs exactly the device's training loop and the server's step, without
privacy: a federation of one node holding everyone, so federated equals central by construction."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .algorithm import Algorithm, DeviceKeys, UserState
from .metrics import DEFAULT_TOP_K, finish, reported
from .server_opt import DEFAULT_SERVER_LR, DEFAULT_SERVER_OPTIMIZER
from .train import evaluate_cohort, train_cohort


@dataclass
class CentralResult:
    model: dict[str, np.ndarray]  # what is evaluated and saved
    users: UserState
    history: list[dict] = field(default_factory=list)  # one row per evaluated epoch
    metrics: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    reported_epoch: int = 0  # the epoch of `metrics`: the last, or the best-validation one (--validation-item)


def tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in arrays.items()}


def train_central(algorithm: Algorithm, rows, n_users: int, epochs: int, strategy: str = DEFAULT_SERVER_OPTIMIZER,
                  server_lr: float = DEFAULT_SERVER_LR, k: int = DEFAULT_TOP_K, eval_every: int = 1,
                  on_epoch: Callable[[dict], None] | None = None) -> CentralResult:
    """`epochs` rounds of the algorithm over every user of `rows` at once."""
    torch.manual_seed(algorithm.settings.seed)
    start = time.perf_counter()
    server = algorithm.init_server(strategy, server_lr)
    users = algorithm.new_users(np.asarray(rows.users), n_users, None)
    keys = DeviceKeys(algorithm.settings.seed)
    result = CentralResult(server.model(), users)
    for epoch in range(1, epochs + 1):
        users, sums = train_cohort(algorithm, tensors(server.broadcast()), users, rows, epoch, keys)
        algorithm.server_step(server, sums.arrays, float(sums.num_users), epoch)
        row = {"epoch": epoch, "train_loss": sums.loss_sum / max(sums.num_rows, 1),
               "seconds": time.perf_counter() - start}
        if epoch % eval_every == 0 or epoch == epochs:
            row.update(finish(evaluate_cohort(algorithm, tensors(server.model()), users, rows, k), k))
            result.history.append(row)
        if on_epoch:
            on_epoch(row)
    result.model, result.users = server.model(), users
    chosen, _ = reported(result.history, k)
    result.metrics = {k_: v for k_, v in chosen.items() if k_ not in ("epoch", "seconds")}
    result.reported_epoch = chosen["epoch"]
    result.wall_seconds = time.perf_counter() - start
    return result
