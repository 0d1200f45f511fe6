"""Run the central baseline and write its run directory."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.datasets import cohort
from fedrec.models.central import CentralResult, train_central
from fedrec.models.registry import algorithm_class
from fedrec.privacy.guarantee import describe
from fedrec.run.build import burn_in, hyper, load_data
from fedrec.run.config import CENTRAL_SETTINGS, RunConfig, ignored_settings, with_defaults
from fedrec.run.rundir import RunWriter


@dataclass
class CentralOutcome:
    summary: dict
    result: CentralResult
    run_dir: Path  # Path() when nothing was written


def run_central(cfg: RunConfig, on_epoch: Callable[[dict], None] | None = None, write: bool = True) -> CentralOutcome:
    start = time.perf_counter()
    # Settings central training does not read go back to their defaults, so that its saved config
    # never claims them (compare hands it the federated run's --dp, --rounds...).
    cfg = with_defaults(cfg, ignored_settings(cfg, CENTRAL_SETTINGS)).resolved().validate()
    out = RunWriter.create(cfg, "central") if write else None  # an unwritable --out fails before training
    split = load_data(cfg)
    rows = cohort(split, np.arange(split.n_users))
    # One step per epoch: local-epochs describes what a device does in a round, not the baseline.
    central_hyper = dataclasses.replace(hyper(cfg), local_epochs=1, burn_in=burn_in(cfg.burn_in, cfg.epochs))
    algorithm = algorithm_class(cfg.model)(central_hyper, split.n_items, split.rating_scale)
    result = train_central(algorithm, rows, split.n_users, cfg.epochs, cfg.strategy, cfg.server_lr, cfg.top_k,
                           cfg.eval_every, on_epoch)
    summary = {
        "mode": "central", "dataset": cfg.dataset, "split": cfg.split, "model": cfg.model,
        "model_reason": cfg.model_reason(), "metrics": result.metrics,
        **({"reported_epoch": result.reported_epoch} if cfg.validation_item else {}),
        **({"burn_in": central_hyper.burn_in} if "burn_in" in algorithm.settings_read else {}),
        "epochs": cfg.epochs, "wall_seconds": time.perf_counter() - start, "train_seconds": result.wall_seconds,
        "num_users": split.n_users, "num_items": split.n_items, "config": cfg.to_dict(),
        "privacy": {"mode": "none", **describe(cfg, central=True)},
    }
    if out is None:
        return CentralOutcome(summary, result, Path())
    # Written at the end only: a central run that fails leaves its directory empty (the CLI removes it).
    out.start_metrics(list(dict.fromkeys(k for row in result.history for k in row)), result.history)
    out.write_config()
    out.write_results(result.model, "epoch", (split.item_ids, split.item_titles))
    out.write_summary(summary)  # last: a summary means the run is complete
    return CentralOutcome(summary, result, out.path)
