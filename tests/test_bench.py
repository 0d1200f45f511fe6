"""`fedrec bench`: each case names the model it times, at that model's own default K."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from fedrec.models.mf import BPMF_DIM, Hyper
from fedrec.run.config import RunConfig
from fedrec.simulations import bench
from fedrec.simulations.cli import cli


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


@pytest.mark.engine  # two tiny runs through the Ray engine, in this process: ~30 s
def test_bench_times_the_cohort_case_under_both_models_and_says_which(tmp_path, monkeypatch):
    full = bench.cases

    def tiny(*args):
        return {name: dataclasses.replace(cfg, synthetic_users=60, synthetic_items=40, synthetic_density=0.2)
                for name, cfg in full(*args).items()}

    monkeypatch.setattr(bench, "cases", tiny)
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
