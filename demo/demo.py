"""The finished run the page serves, loaded once at start-up (no training, nothing written).

`fedrec serve --run R` takes a central or federated run directory, or a `fedrec compare`
directory (its federated/ run is served; its central/ numbers are the plot's reference).
The data set is read here because this process stands in for every device: a device reads
its own user's rows from it, nothing else does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
from pathlib import Path

import numpy as np

from fedrec.models.saved import load_catalogue
from fedrec.run.config import ConfigError, RunConfig
from fedrec.run.finished import locate

EXAMPLE_USERS = 5


class UnknownUser(ConfigError):
    """A user id the data set does not have (the page answers 404)."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class Demo:
    """Everything the page reads, loaded once; shared read-only by the server's threads."""

    def __init__(self, run: Path, data_dir: str | None = None):
        from fedrec.personal.model import run_model  # torch and pandas: only once a run was found
        from fedrec.run.build import load_data

        self.paths = locate(run)
        cfg = RunConfig.from_toml(self.paths.run / "config.toml")
        self.cfg = dataclasses.replace(cfg, data_dir=str(data_dir)) if data_dir else cfg
        self.implicit = self.cfg.resolved().implicit
        self.summary = _read_json(self.paths.run / "summary.json")
        self.federated = self.summary.get("mode", "federated") != "central"
        self.split = load_data(self.cfg)
        self.algorithm, self.model = run_model(self.paths.run, self.cfg, self.split)  # the run's, as a device has it
        saved_ids, saved_titles = load_catalogue(self.paths.run)
        ids = self.split.item_ids if self.split.item_ids is not None else saved_ids
        self.item_ids = np.asarray(ids) if ids is not None else np.arange(self.split.n_items)
        titles = self.split.item_titles if self.split.item_titles is not None else saved_titles
        self.titles = ([str(t) for t in titles] if titles is not None
                       else [f"item {i}" for i in self.item_ids.tolist()])
        self.item_row = {str(item): row for row, item in enumerate(self.item_ids.tolist())}
        users = self.split.user_ids if self.split.user_ids is not None else np.arange(self.split.n_users)
        self.user_ids = [str(u) for u in np.asarray(users).tolist()]
        self.user_row = {user: row for row, user in enumerate(self.user_ids)}
        self.scale = tuple(float(v) for v in self.split.rating_scale)
        self.popular = np.argsort(-np.bincount(self.split.train.item, minlength=self.split.n_items),
                                  kind="stable")

    def reload_model(self) -> None:
        """Read model.npz and summary.json again (after a forget replay rewrote them)."""
        from fedrec.personal.model import run_model

        self.algorithm, self.model = run_model(self.paths.run, self.cfg, self.split)
        self.summary = _read_json(self.paths.run / "summary.json")

    @property
    def can_replay(self) -> bool:
        """Can `fedrec forget` replay this run without a user (a completed federated run that kept checkpoints)?"""
        return (self.federated and self.cfg.keep_checkpoints and self.summary.get("status") == "completed"
                and self.cfg.dp == "none")  # under DP fedrec forget erases but does not replay

    def no_replay(self) -> str:
        """Why forgetting cannot replay this run, and what bounds the user's influence instead."""
        if not self.federated:
            return ("a central run trained on everyone's pooled ratings: removing a user's influence means training "
                    "again without the user")
        from fedrec.personal import forget

        if self.cfg.dp != "none":  # fedrec forget erases the device and replays nothing: what it says instead
            return (f"under {self.cfg.dp} differential privacy, fedrec forget erases the device and does not replay "
                    "the federation (a replay would release a second model from the other users' data that no "
                    f"privacy accounting covers); {forget.dp_bound(self.cfg, self.summary.get('privacy') or {})}")
        return forget.no_replay(self.summary, self.paths.run)

    @property
    def refused_protections(self) -> list[str]:
        """What the run's algorithm says of secure aggregation and DP where it admits neither (its own reasons):
        the page must not promise the server could be kept from reading a device's statistics."""
        from fedrec.models.algorithm import DP, SECURE_AGGREGATION

        refuses = self.algorithm.refuses
        return [f"no {what}: {refuses[mechanism]}" for mechanism, what in
                ((SECURE_AGGREGATION, "secure aggregation"), (DP, "differential privacy")) if mechanism in refuses]

    @property
    def metric(self) -> str:
        return f"hr@{self.cfg.top_k}" if self.implicit else "rmse"

    @functools.cached_property
    def central_value(self) -> float | None:
        """The central baseline's final metric, where the run has one beside it (a compare directory)."""
        if self.paths.central is None:
            return None
        return _read_json(self.paths.central / "summary.json").get("metrics", {}).get(self.metric)

    def row_of(self, user: str) -> int:
        user = str(user).strip()
        if user not in self.user_row:
            raise UnknownUser(f"unknown user {user!r}: this data set has users {self.user_ids[0]} to "
                              f"{self.user_ids[-1]} ({len(self.user_ids)} of them)")
        return self.user_row[user]

    def example_users(self) -> list[str]:
        """A few users spread over the population (the first, the last and some between)."""
        picks = np.linspace(0, len(self.user_ids) - 1, EXAMPLE_USERS).round().astype(int)
        return [self.user_ids[i] for i in dict.fromkeys(picks.tolist())]

    def well_known(self, n: int) -> list[int]:
        """Model rows of the n most-rated items of the training data: movies a visitor can rate."""
        return self.popular[:n].tolist()

    def forget_command(self, user: str) -> str:
        return f"fedrec forget --run {shlex.quote(str(self.paths.run))} --user {shlex.quote(user)}"
