"""A finished run's model as a user's device holds it: the released arrays (model.npz) and the run's
algorithm, which refits the user and ranks items against them (fedrec.models.algorithm.Algorithm)."""

from __future__ import annotations

from pathlib import Path

import torch

from fedrec.datasets import Split
from fedrec.models.algorithm import Algorithm
from fedrec.models.saved import load_model
from fedrec.run.build import make_algorithm
from fedrec.run.config import ConfigError, RunConfig


def run_model(run_dir: Path, cfg: RunConfig, split: Split) -> tuple[Algorithm, dict[str, torch.Tensor]]:
    """(the run's algorithm for `split`'s catalogue, its released model as tensors); a ConfigError when
    the model was not made for this catalogue (e.g. another --data-dir than the run's)."""
    algorithm = make_algorithm(cfg, split.n_items, split.rating_scale)
    model = load_model(run_dir)
    check_shapes(model, algorithm, cfg)
    return algorithm, {name: torch.as_tensor(value) for name, value in model.items()}


def check_shapes(model: dict, algorithm: Algorithm, cfg: RunConfig) -> None:
    """The model's arrays must be the ones this run's algorithm releases for this catalogue."""
    expected = {name: value.shape for name, value in algorithm.init_server(cfg.strategy, cfg.server_lr).model().items()}
    got = {name: value.shape for name, value in model.items()}
    if got == expected:
        return
    rows = {shape[0] for shape in got.values() if len(shape) == 2}  # per-item arrays: one row per item
    if len(rows) == 1 and rows != {algorithm.n_items}:
        raise ConfigError(f"the model has {rows.pop()} items but {cfg.dataset} has {algorithm.n_items}; "
                          "pass the --data-dir the run used")
    raise ConfigError(f"model.npz holds {_listed(got)}, not the {_listed(expected)} that its config.toml's "
                      f"{algorithm.title} releases; was it replaced?")


def _listed(shapes: dict) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in sorted(shapes.items()))
