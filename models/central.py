"""The central baseline: the same model, loss and updates, with every user's data in one
place and every user taking part in every step (one step = one epoch over the data)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .bpmf import Sampler, device_draw, draw_key
from .defaults import DEFAULT_SERVER_LR, DEFAULT_SERVER_OPTIMIZER, DEFAULT_TOP_K
from .evaluate import UserRows, evaluate_rows
from .local import local_train, training_rows
from .metrics import finish
from .mf import Hyper, ItemParams, UserState
from .recency import Recency
from .server_opt import ServerOptimizer


@dataclass
class CentralResult:
    items: ItemParams
    users: UserState
    history: list[dict] = field(default_factory=list)  # one row per evaluated epoch
    metrics: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0


def initial_global_bias(implicit: bool, rating_scale: tuple[float, float]) -> float:
    """A public starting point for mu: the middle of the rating scale (0 logits if implicit)."""
    return 0.0 if implicit else sum(rating_scale) / 2


def train_central(rows: UserRows, n_users: int, n_items: int, hyper: Hyper, epochs: int,
                  optimizer: str = DEFAULT_SERVER_OPTIMIZER, server_lr: float = DEFAULT_SERVER_LR,
                  k: int = DEFAULT_TOP_K, rating_scale: tuple[float, float] = (1.0, 5.0), eval_every: int = 1,
                  on_epoch: Callable[[dict], None] | None = None) -> CentralResult:
    """Full-batch training of biased MF over all users at once."""
    torch.manual_seed(hyper.seed)
    start = time.perf_counter()
    items = ItemParams.init(n_items, hyper, initial_global_bias(hyper.implicit, rating_scale))
    users = UserState.init(np.asarray(rows.users), n_users, hyper)
    sampler = Sampler(items, hyper, hyper.seed) if hyper.model == "bpmf" else None  # items: the draws' mean
    # BPMF steps by draws: no optimizer (torch.optim's first one imports torch._dynamo: 1.8-3.7 s here, loaded)
    opt = ServerOptimizer(items, optimizer, server_lr) if sampler is None else None
    result = CentralResult(items, users)
    for epoch in range(1, epochs + 1):
        if sampler is not None:  # one Gibbs sweep, the same draws as a federated round (models/bpmf.py)
            users, update = device_draw(sampler.current, users, rows, hyper, 0.0, epoch, draw_key(hyper.seed, epoch))
            sampler.step({"item-emb": update.emb_delta.double(), "item-bias": update.bias_delta.double()}, epoch)
        else:
            seg, item, target = training_rows(rows, n_items, hyper, epoch)
            users, update = local_train(items, users, seg, item, target, hyper)
            n = max(update.num_users, 1)
            opt.step({"item-emb": update.emb_delta / n, "item-bias": update.bias_delta / n,
                      "global-bias": update.global_bias_delta / n})
        row = {"epoch": epoch, "train_loss": update.loss_sum / max(update.num_rows, 1),
               "seconds": time.perf_counter() - start}
        if epoch % eval_every == 0 or epoch == epochs:
            sums = evaluate_rows(items, users, rows, hyper.implicit, k, rating_scale, Recency.of(hyper))
            row.update(finish(sums, k))
            result.history.append(row)
        if on_epoch:
            on_epoch(row)
    result.users = users
    result.metrics = {k_: v for k_, v in result.history[-1].items() if k_ not in ("epoch", "seconds")}
    result.wall_seconds = time.perf_counter() - start
    return result
