"""`fedrec recommend`: a user's top-N from a finished run, computed as the user's device would.

The run's `model.npz` holds only the item side. The user's side is re-fitted here from the
user's own training ratings against it by the run's algorithm (its `recommend`), whether the
run was central or federated: a federated run never had the user's vector outside the device.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from fedrec.datasets import cohort
from fedrec.run.build import load_data
from fedrec.run.config import ConfigError, RunConfig
from fedrec.run.finished import locate

from .model import run_model


def recommend(run: Path, user: str, n: int = 10, data_dir: str | None = None,
              include_unrated: bool = False) -> list[dict]:
    """[{"item": original id, "title": ..., "score": predicted rating}] for `user` (original id).
    Items no user rated in training are left out (the model never learned them: their score is the
    initial bias, which can top the list) unless `include_unrated`."""
    run = locate(run).run  # a compare directory: its federated run
    cfg = RunConfig.from_toml(run / "config.toml")
    cfg = dataclasses.replace(cfg, data_dir=str(data_dir)) if data_dir else cfg
    if cfg.resolved().implicit:
        raise ConfigError("recommend ranks by predicted rating; this run trained on implicit feedback "
                          f"(--split {cfg.split}); use a rating run")
    split = load_data(cfg)
    algorithm, model = run_model(run, cfg, split)
    ids = split.user_ids if split.user_ids is not None else np.arange(split.n_users)
    match = np.flatnonzero(ids.astype(str) == str(user).strip())
    if not len(match):
        raise ConfigError(f"unknown user {user!r}: {cfg.dataset} has users {ids[0]}..{ids[-1]} ({len(ids)} of them)")
    rows = cohort(split, match[:1])
    unrated = None if include_unrated else np.flatnonzero(np.bincount(split.train.item, minlength=split.n_items) == 0)
    try:
        best, scores = algorithm.recommend(model, rows.train_item, rows.train_rating, n, hide=unrated)
    except ValueError as error:  # e.g. a user with no training ratings: nothing to fit
        raise ConfigError(f"user {user}: {error}") from None
    item_ids = split.item_ids if split.item_ids is not None else np.arange(split.n_items)
    titles = split.item_titles
    return [{"item": item_ids[i].item(), "title": str(titles[i]) if titles is not None else f"item {item_ids[i]}",
             "score": round(float(s), 4)} for i, s in zip(best, scores)]
