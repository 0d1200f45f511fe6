"""`fedrec bench` (experiments/bench.py): each case names the model it times, at that model's own default
K; the engine's floor and a cohort case, each in a fresh process through Ray's simulation engine, report
finite numbers in range."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from typer.testing import CliRunner

from fedrec.cli.main import cli
from fedrec.experiments import bench
from fedrec.models.defaults import BPMF_DIM, Hyper
from fedrec.run.config import RunConfig


@pytest.mark.parametrize("dataset", ["synthetic", "ml-100k"])
def test_each_case_pins_its_model_whatever_the_command_line_says(dataset):
    # what a user passes (--model bpmf, --dim 32) must not change what a case name stands for
    base = RunConfig(dataset=dataset, data_dir="/nowhere", model="bpmf", dim=32)
    pinned = {name: cfg.resolved() for name, cfg in bench.cases(base, 3, 1).items()}
    assert set(pinned) == set(bench.CASE_NAMES) - {"engine-floor"}
    assert {name: (c.model, c.dim) for name, c in pinned.items()} == {
        name: ("bpmf", BPMF_DIM) if name == "ml100k-cohorts-bpmf" else ("mf", Hyper().dim) for name in pinned}
    for cfg in pinned.values():
        cfg.validate()  # BPMF's case is one it can run: every user, each round, nothing it refuses


def _tiny(monkeypatch):
    """The cases at 60 users and 40 items (their configs travel to the child processes as they are)."""
    full = bench.cases

    def tiny(*args):
        return {name: dataclasses.replace(cfg, synthetic_users=60, synthetic_items=40, synthetic_density=0.2)
                for name, cfg in full(*args).items()}

    monkeypatch.setattr(bench, "cases", tiny)


@pytest.mark.engine  # two tiny runs through the Ray engine, in this process: ~30 s
def test_bench_times_the_cohort_case_under_both_models_and_says_which(tmp_path, monkeypatch):
    _tiny(monkeypatch)
    monkeypatch.setattr(bench, "_in_child", lambda target, *args: target(*args))  # a spawned child re-imports
    out = tmp_path / "bench"
    result = CliRunner().invoke(cli, ["bench", "--rounds", "2", "--cases", "ml100k-cohorts-mf,ml100k-cohorts-bpmf",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    assert {name: (c["model"], c["dim"]) for name, c in report["cases"].items()} == {
        "ml100k-cohorts-mf": ("mf", Hyper().dim), "ml100k-cohorts-bpmf": ("bpmf", BPMF_DIM)}
    assert all(c["seconds_per_round"] > 0 and c["num_users"] == 60 for c in report["cases"].values())
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in result.output.splitlines()
            if line.startswith("│")]  # the printed table, its rows in the cases' order (names may be cut short)
    assert [row[1:3] for row in rows] == [["mf", str(Hyper().dim)], ["bpmf", str(BPMF_DIM)]]


@pytest.mark.engine  # the floor's and the case's fresh processes, each starting Ray: ~1 min
def test_bench_measures_the_engine_floor_and_a_cohort_case_in_fresh_processes(tmp_path, monkeypatch):
    _tiny(monkeypatch)
    lines = []
    report = bench.run_bench(RunConfig(out=str(tmp_path / "bench")), rounds=3, one_user_rounds=1,
                             names=("engine-floor", "ml100k-cohorts-mf"), log=lines.append)
    floor = report["engine_floor_seconds_per_round"]
    assert math.isfinite(floor) and 0 < floor < 10
    assert set(report["cases"]) == {"ml100k-cohorts-mf"}
    case = report["cases"]["ml100k-cohorts-mf"]
    assert (case["model"], case["num_users"], case["rounds"], case["num_nodes"]) == ("mf", 60, 3, 2)
    assert case["users_per_round"] == 60 and case["measured_rounds"] == 1  # round 1 warms up, round 3 evaluates
    for key in ("updates_per_second", "seconds_per_round", "max_seconds_per_round", "end_to_end_seconds",
                "peak_rss_mb", "partition_seconds", "partition_peak_rss_mb", "shard_set_mb"):
        assert math.isfinite(case[key]) and case[key] > 0, key
    assert case["updates_per_second"] == pytest.approx(60 / case["seconds_per_round"])
    assert case["seconds_per_round"] <= case["max_seconds_per_round"] < case["end_to_end_seconds"]
    assert case["seconds_per_round_over_engine_floor"] == pytest.approx(case["seconds_per_round"] - floor)
    assert 0 < case["metrics"]["rmse"] < 2  # ratings 1 to 5: trained, not diverged
    written = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert written == {k: v for k, v in report.items() if k != "run_dir"}
    assert len(lines) == 2  # the floor, then the case
