"""The Python API: DataFrames back, bad settings as ConfigError, and nothing from Flower on the
console (no per-round log lines, no deprecation banner)."""

from __future__ import annotations

import logging
import sys

import pandas as pd
import pytest

from fedrec import api
from fedrec.experiments.stats import COLUMNS
from fedrec.run.config import ConfigError

SMALL = dict(synthetic_users=40, synthetic_items=30, synthetic_density=0.25, model="mf", dim=4, rounds=2, epochs=2,
             eval_every=2)


@pytest.fixture(autouse=True)
def flower_logs_rounds(monkeypatch, capfd):
    """Flower's console log at its own default, INFO, on this test's stderr (a CLI test before may have
    quietened it for the process, or imported Flower while CliRunner held stderr); capfd first, so that
    sys.stderr is the one it captures."""
    from flwr.supercore.logger import console_handler

    monkeypatch.setattr(console_handler, "level", logging.INFO)
    monkeypatch.setattr(console_handler, "stream", sys.stderr)


def _flower_free(text: str) -> None:
    assert "deprecat" not in text.lower() and "INFO" not in text and "ROUND" not in text, text


def test_compare_returns_the_tidy_frame_and_flower_prints_nothing(tmp_path, capfd):
    runs = api.compare(repeats=2, out=str(tmp_path / "cmp"), **SMALL)
    out, err = capfd.readouterr()
    _flower_free(out + err)
    assert isinstance(runs, pd.DataFrame) and list(runs.columns) == COLUMNS and runs.attrs["run_dir"]
    assert set(runs["side"]) == {"central", "federated"} and sorted(runs["repeat"].unique()) == [1, 2]
    spread = api.intervals(runs)
    assert {"mean", "low", "high", "n"} <= set(spread.columns) and (spread["n"] == 2).all()
    paired = api.difference(runs).set_index("metric")
    assert paired.loc["rmse", "side"] == "central - federated"


def test_central_returns_its_history_and_summary(tmp_path, capfd):
    history = api.central(out=str(tmp_path / "c"), **{"eval-every": 1, **{k: v for k, v in SMALL.items()
                                                                           if k != "eval_every"}})
    _flower_free("".join(capfd.readouterr()))
    assert list(history["epoch"]) == [1, 2] and "rmse" in history and history.attrs["summary"]["mode"] == "central"


def test_a_bad_setting_raises_the_command_lines_message(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting 'userz'"):
        api.central(userz=3)
    with pytest.raises(ConfigError, match="--repeats must be >= 1"):
        api.compare(repeats=0, **SMALL)


def test_a_grid_through_the_api_is_its_results_table(tmp_path, capfd):
    grid = tmp_path / "g.toml"
    grid.write_text('algorithms = ["mf"]\nreferences = ["central"]\n[settings]\nsynthetic-users = 40\n'
                    'synthetic-items = 30\ndim = 4\nrounds = 2\nepochs = 2\neval-every = 2\n[grid]\ndim = [2, 4]\n')
    frame = api.experiment(grid, out=str(tmp_path / "out"))
    _flower_free("".join(capfd.readouterr()))
    assert set(frame["side"]) == {"federated", "central"} and set(frame["dim"].dropna()) == {2, 4}


@pytest.mark.engine
def test_simulate_on_flowers_runtime_prints_no_banner(tmp_path, capfd):
    rounds = api.simulate(out=str(tmp_path / "sim"), **SMALL)
    _flower_free("".join(capfd.readouterr()))
    assert list(rounds["round"]) == [1, 2] and rounds.attrs["summary"]["status"] == "completed"


def test_positive_control_flower_logs_every_round_when_not_quietened(tmp_path, capfd):
    from fedrec.experiments.repeats import federate_in_session
    from fedrec.run.config import RunConfig

    federate_in_session(RunConfig(out=str(tmp_path / "loud"), **SMALL))
    with pytest.raises(AssertionError):
        _flower_free("".join(capfd.readouterr()))
