"""The `fedrec` CLI: results on disk, one-line errors with exit code 2."""

from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from fedrec.simulations.cli import cli

SMALL = ["--synthetic-users", "80", "--synthetic-items", "50", "--synthetic-density", "0.2", "--dim", "8"]


def test_central_writes_summary_and_metrics(tmp_path):
    out = tmp_path / "central"
    result = CliRunner().invoke(cli, ["central", "--dataset", "synthetic", *SMALL, "--epochs", "12", "--eval-every", "4",
                                      "--seed", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "central" and summary["dataset"] == "synthetic" and summary["split"] == "random"
    assert summary["epochs"] == 12 and summary["config"]["seed"] == 3 and summary["wall_seconds"] > 0
    assert {"rmse", "mae"} <= set(summary["metrics"])
    frame = pd.read_csv(out / "metrics.csv")
    assert list(frame["epoch"]) == [4, 8, 12] and frame["rmse"].notna().all()
    assert "rmse" in result.output


def test_config_file_then_flags(tmp_path):
    (tmp_path / "c.toml").write_text("[tool.flwr.app.config]\nepochs = 3\ndim = 4\neval-every = 3\n")
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["central", "--config", str(tmp_path / "c.toml"), *SMALL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["config"]["dim"] == 8  # the flag wins over the file


def _error(args):
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output.strip()


def test_bad_settings_give_one_line_and_exit_2(tmp_path):
    cases = {
        ("simulate", "--strategy", "fedfoo"): "strategy='fedfoo' is not valid",
        ("simulate", "--rounds", "0"): "rounds must be > 0",
        ("central", "--lr", "-0.1"): "lr must be > 0",
        ("simulate", "--users-per-round", "5000", *SMALL): "users-per-round=5000 is larger than the 80 users",
        ("central", "--dataset", "ml-100k", "--split", "u1", "--data-dir", str(tmp_path / "none")): "ml-100k is not at",
        ("central", "--split", "u3"): "exists only for ml-100k",
        ("central", "--config", str(tmp_path / "missing.toml")): "cannot read config file",
    }
    for args, expected in cases.items():
        code, output = _error(list(args))
        assert code == 2, (args, output)
        assert expected in output and "Traceback" not in output
        assert len(output.splitlines()) <= 3  # one message (progress line may precede it)
    assert not list(tmp_path.glob("**/summary.json"))


def test_every_command_builds_and_documents_its_flags():
    for command in ("central", "simulate", "compare", "tune", "accuracy", "bench", "audit", "privacy-sweep"):
        result = CliRunner().invoke(cli, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "--users-per-round" in result.output and "--seed" in result.output


def test_privacy_flags_are_checked_before_any_work(tmp_path):
    code, output = _error(["simulate", "--dp", "central", "--clipping-norm", "0", "--noise-multiplier", "1",
                           "--out", str(tmp_path / "x")])
    assert code == 2 and "needs --clipping-norm > 0" in output
    code, output = _error(["privacy-sweep", "--epsilons", "1,a", "--clipping-norm", "0.1"])
    assert code == 2 and "comma-separated list" in output
    assert not (tmp_path / "x").exists()
