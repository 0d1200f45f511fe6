"""Choose hyper-parameters on a validation split carved out of the training data.

The test set is never looked at: each grid point trains on 80% of the training ratings,
is scored on the other 20% (per-user holdout), and the best (settings, epochs) wins.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np

from fedrec.datasets import Ratings, cohort
from fedrec.datasets.splits import leave_one_out, random_holdout
from fedrec.models import train_central
from fedrec.run.build import hyper, load_data
from fedrec.run.config import RunConfig
from fedrec.run.rundir import main_metric, make_run_dir, write_json

GRID = {"dim": (32, 64), "reg_user": (0.02, 0.05, 0.1), "reg_item": (0.1, 0.2, 0.3, 0.5)}
IMPLICIT_GRID = {"dim": (32, 64), "reg_user": (0.001, 0.01, 0.05), "reg_item": (0.001, 0.01, 0.05)}


def grid_for(cfg: RunConfig) -> dict:
    return IMPLICIT_GRID if cfg.implicit else GRID


def validation_split(cfg: RunConfig):
    split = load_data(cfg)
    train_only = Ratings(split.dataset, split.train, np.arange(split.n_users), np.arange(split.n_items),
                         rating_scale=split.rating_scale)
    if cfg.implicit:
        return leave_one_out(train_only, cfg.negatives, cfg.seed + 1)
    return random_holdout(train_only, 0.2, cfg.seed + 1)


def tune(cfg: RunConfig, on_point=None) -> dict:
    cfg = cfg.resolved().validate()
    grid = grid_for(cfg)
    val = validation_split(cfg)
    rows = cohort(val, np.arange(val.n_users))
    metric = main_metric(cfg.implicit, cfg.top_k)
    better = (lambda a, b: a > b) if cfg.implicit else (lambda a, b: a < b)
    points = []
    for values in itertools.product(*grid.values()):
        point = dataclasses.replace(cfg, **dict(zip(grid, values)))
        start = time.perf_counter()
        result = train_central(rows, val.n_users, val.n_items, hyper(point), cfg.epochs, cfg.strategy, cfg.server_lr,
                               cfg.top_k, val.rating_scale, cfg.eval_every)
        best = min(result.history, key=lambda r: -r[metric] if cfg.implicit else r[metric])
        entry = {**dict(zip(grid, values)), "epochs": best["epoch"], f"val_{metric}": best[metric],
                 "seconds": time.perf_counter() - start}
        points.append(entry)
        if on_point:
            on_point(entry)
    chosen = points[0]
    for p in points[1:]:
        if better(p[f"val_{metric}"], chosen[f"val_{metric}"]):
            chosen = p
    report = {"dataset": cfg.dataset, "split": cfg.split, "validation": "20% per-user holdout of the training ratings"
              if not cfg.implicit else "leave-one-out of the training interactions", "metric": metric,
              "chosen": chosen, "points": points, "config": cfg.to_dict()}
    run_dir = make_run_dir(cfg, "tune")
    write_json(run_dir / "tune.json", report)
    report["run_dir"] = str(run_dir)
    return report
