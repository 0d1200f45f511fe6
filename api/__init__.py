"""fedrec from Python: each function runs what the command of the same name runs and returns a pandas
DataFrame. Settings are keyword arguments with the names of the flags (`users_per_round=200` or, as
in a config file, `**{"users-per-round": 200}`); `config` reads a TOML file first. A bad setting
raises fedrec.run.config.ConfigError (a ValueError) with the message the command line prints.

    from fedrec import api
    history = api.central(dataset="ml-100k", split="u1", data_dir="data")   # one row per epoch
    rounds = api.simulate(rounds=20)                                      # one row per round
    runs = api.compare(repeats=5, dataset="ml-100k", split="u1")          # one row per run and metric
    api.intervals(runs)                                                   # mean and 95% interval per side
    api.difference(runs)                                                  # paired central - federated
    grid = api.experiment("examples/privacy_utility_ml100k.toml", data_dir="data")

Each frame's `attrs` hold "run_dir" (where the run's files went) and, for one run, its "summary"
(summary.json). Flower's per-round log lines stay out of a notebook's output: only warnings and errors
of Flower's logger are shown while a function runs.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pandas as pd

from fedrec.experiments.stats import paired_difference, summarize
from fedrec.run.config import RunConfig

__all__ = ["central", "simulate", "compare", "experiment", "intervals", "difference", "settings"]


def settings(config: str | Path | None = None, **values) -> RunConfig:
    """The RunConfig of a TOML file (if given) and keyword settings, checked."""
    base = RunConfig.from_toml(config) if config else RunConfig()
    return RunConfig.from_mapping(values, base).validate()


def central(config: str | Path | None = None, **values) -> pd.DataFrame:
    """The central baseline (`fedrec central`): its metrics per epoch."""
    from fedrec.simulations.central import run_central

    with _quiet():
        outcome = run_central(settings(config, **values))
    return _frame(outcome.result.history, outcome.run_dir, outcome.summary)


def simulate(config: str | Path | None = None, **values) -> pd.DataFrame:
    """A federated run on Flower's simulation runtime (`fedrec simulate`): its metrics per round."""
    from fedrec.simulations.federated import simulate as run

    with _quiet():
        outcome = run(settings(config, **values), say=lambda line: None)
    return _frame(outcome.history, outcome.run_dir, outcome.summary)


def compare(config: str | Path | None = None, repeats: int = 1, **values) -> pd.DataFrame:
    """Central and federated side by side (`fedrec compare --repeats N`): one row per run and metric
    (experiment, algorithm, side, repeat, seed, fold, metric, value); OUT/comparison.md has the table."""
    from fedrec.experiments.compare_repeats import run_compare_repeats
    from fedrec.experiments.repeats import check_repeats, federate_in_session
    from fedrec.simulations.central import run_central

    check_repeats(repeats)
    with _quiet():
        report = run_compare_repeats(settings(config, **values), repeats, run_central, federate_in_session)
    frame = report["frame"]
    frame.attrs["run_dir"] = str(report["run_dir"])
    return frame


def experiment(path: str | Path, out: str = "", data_dir: str = "") -> pd.DataFrame:
    """A grid file (`fedrec experiment`), resumed if `out` holds its unfinished run: its results.csv."""
    from fedrec.experiments.grid import read_grid
    from fedrec.experiments.grid_run import run_grid

    with _quiet():
        report = run_grid(read_grid(Path(path), data_dir), out, str(Path(path).resolve()))
    frame = report["frame"]
    frame.attrs["run_dir"] = str(report["run_dir"])
    return frame


def intervals(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, 95% Student-t interval (low, high) and count per side, algorithm, metric (and grid axes)."""
    return summarize(frame)


def difference(frame: pd.DataFrame, first: str = "central", second: str = "federated") -> pd.DataFrame:
    """Per metric, `first` minus `second` of the same repeat, with its 95% interval."""
    return paired_difference(frame, first, second)


def _frame(rows: list[dict], run_dir: Path, summary: dict) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame.attrs.update(run_dir=str(run_dir), summary=summary)
    return frame


@contextlib.contextmanager
def _quiet():
    """Flower's console log at WARNING while fedrec runs (it logs every round at INFO), as it was after."""
    from flwr.supercore.logger import console_handler

    level = console_handler.level
    console_handler.setLevel(logging.WARNING)
    try:
        yield
    finally:
        console_handler.setLevel(level)
