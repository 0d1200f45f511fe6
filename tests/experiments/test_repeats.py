"""Repeated runs: the Student-t interval, the paired difference, how repeats differ, and
`fedrec compare --repeats` end to end on a small synthetic population."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from typer.testing import CliRunner

from fedrec.cli.main import cli
from fedrec.experiments.repeats import federate_in_session, repeats
from fedrec.experiments.stats import COLUMNS, paired_difference, summarize, t_interval, tidy
from fedrec.run.config import RunConfig

SMALL = ["--synthetic-users", "60", "--synthetic-items", "40", "--synthetic-density", "0.2", "--model", "mf",
         "--dim", "8", "--rounds", "4", "--epochs", "4", "--eval-every", "2"]


def test_t_interval_matches_scipy_and_a_worked_value():
    values = [0.91, 0.93, 0.90, 0.95, 0.92]
    mean, low, high = t_interval(values)
    expected = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values)) and (low, high) == pytest.approx(expected)
    # 1..5: mean 3, sd sqrt(2.5), t(0.975, 4) = 2.7764451: half-width 1.9632432
    assert t_interval([1, 2, 3, 4, 5]) == pytest.approx((3, 3 - 1.9632432, 3 + 1.9632432))


def test_one_run_has_a_mean_but_no_interval():
    mean, low, high = t_interval([0.9])
    assert mean == 0.9 and math.isnan(low) and math.isnan(high)


def _frame(central, federated):
    rows = []
    for r, (c, f) in enumerate(zip(central, federated), start=1):
        rows += tidy("compare", "mf", "central", r, r - 1, "u1", {"rmse": c})
        rows += tidy("compare", "mf", "federated", r, r - 1, "u1", {"rmse": f})
    return pd.DataFrame(rows, columns=COLUMNS)


def test_the_paired_difference_removes_what_both_sides_of_a_repeat_share():
    # each repeat's seed moves both sides a lot; federated is always 0.01 worse, give or take 0.001
    shared = np.array([0.0, 0.08, -0.05, 0.11, -0.02])
    central, federated = 0.9 + shared, 0.91 + shared + np.array([0.001, -0.001, 0.0, 0.0005, -0.0005])
    frame = _frame(central, federated)
    diff = paired_difference(frame).set_index("metric").loc["rmse"]
    assert diff["side"] == "central - federated" and diff["n"] == 5
    assert (diff["mean"], diff["low"], diff["high"]) == pytest.approx(t_interval(central - federated))
    assert diff["high"] < 0  # the paired interval excludes 0; the unpaired ones overlap
    sides = summarize(frame).set_index("side")
    assert sides.loc["central", "low"] < sides.loc["federated", "mean"] < sides.loc["central", "high"]


def test_repeats_change_the_seed_and_rotate_the_ml100k_folds_only():
    folds = repeats(RunConfig(dataset="ml-100k", split="u4", seed=7), 3)
    assert [(r.index, r.seed, r.fold, r.cfg.split, r.cfg.seed) for r in folds] == [
        (1, 7, "u4", "u4", 7), (2, 8, "u5", "u5", 8), (3, 9, "u1", "u1", 9)]
    assert [r.cfg.split for r in repeats(RunConfig(split="random"), 2)] == ["random", "random"]


def test_compare_repeats_writes_a_tidy_csv_intervals_and_a_paired_table(tmp_path):
    out = tmp_path / "cmp"
    result = CliRunner().invoke(cli, ["compare", *SMALL, "--repeats", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "results.csv")
    assert list(frame.columns) == COLUMNS
    assert sorted(frame["repeat"].unique()) == [1, 2, 3] and sorted(frame["seed"].unique()) == [0, 1, 2]
    for side in ("central", "federated"):
        per_run = frame[frame.side == side].groupby("repeat")["metric"].apply(set)
        assert all({"rmse", "mae"} <= metrics for metrics in per_run)
    rmse = frame[(frame.side == "federated") & (frame.metric == "rmse")]["value"]
    assert rmse.nunique() == 3  # the repeats differ
    summary = json.loads((out / "summary.json").read_text())
    federated = next(r for r in summary["intervals"] if r["side"] == "federated" and r["metric"] == "rmse")
    assert (federated["mean"], federated["low"], federated["high"]) == pytest.approx(t_interval(rmse))
    assert any(r["side"] == "central - federated" for r in summary["difference"])
    table = (out / "comparison.md").read_text()
    assert "| rmse |" in table and "central - federated (paired)" in table and " ± " in table
    assert (out / "comparison.png").stat().st_size > 0
    for i in (1, 2, 3):
        assert (out / f"repeat-{i}" / "federated" / "summary.json").is_file()
        assert not (out / f"repeat-{i}" / "federated.devices").exists()  # the devices' state is no output
    assert "central - federated" in result.output and "± " in result.output


@pytest.mark.parametrize("args, expected", [
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--repeats", "2", "--tune"], "--tune runs once"),
])
def test_bad_repeats_are_one_line_exit_2_and_write_nothing(tmp_path, args, expected):
    result = CliRunner().invoke(cli, ["compare", *SMALL, *args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and expected in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.engine
def test_a_federation_in_session_trains_what_flowers_engine_trains(tmp_path):
    """The repeats' in-process federations run the same server and ClientApp code: same metrics, same model."""
    from fedrec.simulations.federated import simulate

    cfg = RunConfig.from_mapping({k.lstrip("-"): v for k, v in zip(SMALL[::2], SMALL[1::2])})
    engine = simulate(dataclasses.replace(cfg, out=str(tmp_path / "engine")), say=lambda line: None)
    session = federate_in_session(dataclasses.replace(cfg, out=str(tmp_path / "session")))
    assert session.summary["metrics"] == pytest.approx(engine.summary["metrics"], rel=1e-9)
    assert all(np.allclose(session.model[k], engine.model[k], rtol=1e-6, atol=1e-7) for k in engine.model)


def _fake_suite(cfg, users_per_node, log, tune_trials, run_dir):
    """accuracy's cases as its report holds them, with values that depend on the seed."""
    from fedrec.experiments import accuracy

    assert accuracy._FEDERATE.get() is not None  # the repeats' federations run in this process
    s = cfg.seed * 0.01

    def pair(model, metrics):
        return {"central": {"model": model, "metrics": metrics},
                "federated": {"metrics": {k: v + 0.02 for k, v in metrics.items()}}}

    folds = {f"u{k}": pair("bpmf", {"rmse": 0.9 + k * 0.001 + s}) | {"peers": {"SVD": {"rmse": 0.95, "mae": 0.7}}}
             for k in range(1, 6)}
    return {"cases": {"ml100k-u1-u5": {"folds": folds}, "ml100k-u1": folds["u1"],
                      "ml100k-loo": pair("mf", {"hr@10": 0.6 + s, "ndcg@10": 0.35})}}


def test_accuracy_repeats_write_one_row_per_run_and_metric_and_intervals_per_case(tmp_path, monkeypatch):
    from fedrec.experiments import accuracy
    from fedrec.experiments.accuracy_repeats import run_accuracy_repeats

    monkeypatch.setattr(accuracy, "_suite", _fake_suite)
    report = run_accuracy_repeats(RunConfig(out=str(tmp_path / "acc"), seed=3), 2, log=lambda line: None)
    frame = pd.read_csv(tmp_path / "acc" / "results.csv")
    assert list(frame.columns) == COLUMNS
    # per repeat: 5 folds x (central and federated rmse, SVD's rmse and mae), leave-one-out's 2 sides x 2 metrics
    assert len(frame) == 2 * (5 * 4 + 4) and sorted(frame["seed"].unique()) == [3, 4]
    assert set(frame[frame.experiment == "ml100k-loo"]["fold"]) == {"loo"}
    assert set(frame[frame.side == "peer"]["algorithm"]) == {"SVD"}
    saved = json.loads((tmp_path / "acc" / "accuracy.json").read_text())
    diff = {(r["experiment"], r["metric"]): r for r in saved["difference"]}
    assert diff[("ml100k-loo", "hr@10")]["mean"] == pytest.approx(-0.02)
    assert diff[("ml100k-u1-u5", "rmse")]["n"] == 10  # five folds in each of two repeats
    assert (tmp_path / "acc" / "accuracy.png").stat().st_size > 0 and len(saved["runs"]) == 2
    assert report["intervals_frame"]["n"].min() == 2


def test_accuracy_with_repeats_runs_its_federations_in_session(tmp_path):
    from fedrec.experiments import accuracy

    cfg = RunConfig.from_mapping({k.lstrip("-"): v for k, v in zip(SMALL[::2], SMALL[1::2])})
    token = accuracy._FEDERATE.set(lambda c: federate_in_session(dataclasses.replace(c, out=str(tmp_path / "f"))))
    try:
        case = accuracy._fed(cfg, 0, log=lambda line: None)
    finally:
        accuracy._FEDERATE.reset(token)
    assert case["num_nodes"] == 2 and 0 < case["metrics"]["rmse"] < 2 and case["curve"][-1]["round"] == 4
    assert (tmp_path / "f" / "summary.json").is_file()
