"""Run the central baseline and write its run directory."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.datasets import cohort
from fedrec.models import CentralResult, train_central
from fedrec.models.saved import save_model
from fedrec.run.build import hyper, load_data
from fedrec.run.config import CENTRAL_SETTINGS, RunConfig, ignored_settings, with_defaults
from fedrec.run.rundir import main_metric, make_run_dir, plot_metric, write_config, write_history, write_json


@dataclass
class CentralOutcome:
    summary: dict
    result: CentralResult
    run_dir: Path


def run_central(cfg: RunConfig, on_epoch: Callable[[dict], None] | None = None, write: bool = True) -> CentralOutcome:
    start = time.perf_counter()
    # Settings central training does not read go back to their defaults, so that its saved config
    # never claims them (compare hands it the federated run's --dp, --rounds...).
    cfg = with_defaults(cfg, ignored_settings(cfg, CENTRAL_SETTINGS)).resolved().validate()
    run_dir = make_run_dir(cfg, "central") if write else Path()  # an unwritable --out fails before training
    split = load_data(cfg)
    rows = cohort(split, np.arange(split.n_users))
    # One step per epoch: local-epochs describes what a device does in a round, not the baseline.
    central_hyper = dataclasses.replace(hyper(cfg), local_epochs=1)
    result = train_central(rows, split.n_users, split.n_items, central_hyper, cfg.epochs, cfg.strategy, cfg.server_lr,
                           cfg.top_k, split.rating_scale, cfg.eval_every, on_epoch)
    summary = {
        "mode": "central", "dataset": cfg.dataset, "split": cfg.split, "metrics": result.metrics,
        "epochs": cfg.epochs, "wall_seconds": time.perf_counter() - start, "train_seconds": result.wall_seconds,
        "num_users": split.n_users, "num_items": split.n_items, "config": cfg.to_dict(),
    }
    if write:
        frame = write_history(run_dir, result.history)
        write_config(run_dir, cfg)
        save_model(run_dir, result.items)
        metric = main_metric(cfg.implicit, cfg.top_k)
        plot_metric(frame, "epoch", metric, run_dir / f"{metric.replace('@', '_at_')}.png",
                    f"central {cfg.dataset} {cfg.split}: {metric} per epoch")
        write_json(run_dir / "summary.json", summary)  # last: a summary means the run is complete
    return CentralOutcome(summary, result, run_dir)
