"""`fedrec experiment FILE.toml`: a tiny grid end to end (synthetic data, in-process federations),
resuming where it stopped, refusing a changed grid, and grid files that are wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedrec.cli.main import cli
from fedrec.experiments import grid_run
from fedrec.experiments.grid import read_grid
from fedrec.experiments.stats import COLUMNS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = """
name = "tiny"
algorithms = ["mf"]
repeats = 2

[settings]
synthetic-users = 40
synthetic-items = 30
synthetic-density = 0.25
dim = 4
rounds = 2
epochs = 2
eval-every = 2
dp = "central"
clipping-norm = 0.5

[grid]
target-epsilon = [4, 16]
"""
CELLS = 2 * 2 + 2 * 2  # (2 epsilons + the central and non-private references) x 2 repeats


def _grid(tmp_path, text=TINY) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return path


def _run(path, out):
    return CliRunner().invoke(cli, ["experiment", str(path), "--out", str(out)])


def test_a_tiny_grid_writes_one_tidy_csv_and_a_plot_per_axis(tmp_path):
    result = _run(_grid(tmp_path), tmp_path / "out")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(frame.columns) == [*COLUMNS[:6], "target-epsilon", "epsilon", "noise_multiplier", "metric", "value"]
    assert len(frame) == CELLS * 2 + 2  # rmse and mae per run, and each central run's train_loss
    assert set(frame["side"]) == {"federated", "central", "non-private"}
    dp = frame[frame.side == "federated"]
    assert sorted(dp["target-epsilon"].unique()) == [4, 16] and dp["epsilon"].between(3.5, 16).all()
    z = dp.groupby("target-epsilon")["noise_multiplier"].first()
    assert z[4] > z[16] > 0  # a smaller epsilon needs more noise
    assert frame[frame.side != "federated"]["target-epsilon"].isna().all()  # the references follow no privacy axis
    assert sorted(frame["seed"].unique()) == [0, 1]
    assert (tmp_path / "out" / "rmse_vs_target-epsilon.png").stat().st_size > 0
    assert len(list((tmp_path / "out" / "cells").glob("*.json"))) == CELLS
    assert "tiny: rmse" in result.output


def test_a_stopped_grid_resumes_with_the_cells_it_had_not_finished(tmp_path, monkeypatch):
    ran, real = [], grid_run.run_cell

    def stops_at_the_third(cell, run_dir, on_round=None):
        if len(ran) == 2:
            raise KeyboardInterrupt
        ran.append(cell.key)
        return real(cell, run_dir, on_round)

    monkeypatch.setattr(grid_run, "run_cell", stops_at_the_third)
    path, out = _grid(tmp_path), tmp_path / "out"
    first = _run(path, out)
    assert first.exit_code == 130 and "run the same command again to resume" in first.output
    assert len(list((out / "cells").glob("*.json"))) == 2 and not (out / "results.csv").exists()

    resumed = []
    monkeypatch.setattr(grid_run, "run_cell", lambda cell, *a: resumed.append(cell.key) or real(cell, *a))
    second = _run(path, out)
    assert second.exit_code == 0, second.output
    assert len(resumed) == CELLS - 2 and not set(resumed) & set(ran)  # finished cells are not run again
    assert "(resumed)" in second.output
    assert len(pd.read_csv(out / "results.csv")) == CELLS * 2 + 2


def test_a_changed_grid_refuses_to_resume_and_changes_nothing(tmp_path):
    path, out = _grid(tmp_path), tmp_path / "out"
    assert _run(path, out).exit_code == 0
    before = sorted(p.name for p in (out / "cells").iterdir())
    path.write_text(TINY.replace("[4, 16]", "[4, 8, 16]"))
    result = _run(path, out)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "holds results of another grid" in result.output
    assert sorted(p.name for p in (out / "cells").iterdir()) == before


@pytest.mark.parametrize("change, expected", [
    (lambda t: "whatever = 1\n" + t, "unknown key(s) whatever"),
    (lambda t: t.replace('algorithms = ["mf"]', ""), "algorithms must be a non-empty list"),
    (lambda t: t.replace("repeats = 2", "repeats = 0"), "repeats must be a whole number >= 1"),
    (lambda t: t.replace("target-epsilon = [4, 16]", "target-epsilon = 4"), "grid axis target-epsilon must be"),
    (lambda t: t.replace("dim = 4", "dimm = 4"), "unknown setting 'dimm'"),
    (lambda t: t.replace("[4, 16]", "[4, \"x\"]"), "target-epsilon='x' is not a valid float"),
    (lambda t: t.replace('dp = "central"', 'model = "mf"'), "model is not set in a grid file"),
    (lambda t: t.replace('algorithms = ["mf"]', 'algorithms = ["nosuch"]'), "model='nosuch' is not valid"),
    (lambda t: t.replace("clipping-norm = 0.5", ""), "cell federated-mf-target-epsilon=4-r1"),
    (lambda t: t.replace("[grid]", "users-per-round = 500\n[grid]"), "larger than the 40 users"),
    (lambda t: t.replace("[grid]", "[grid"), "cannot read grid file"),
])
def test_a_bad_grid_file_is_one_line_exit_2_and_writes_nothing(tmp_path, change, expected):
    result = _run(_grid(tmp_path, change(TINY)), tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert expected in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


def test_the_example_grids_parse_and_say_how_to_run_them(shared_data):
    files = sorted(EXAMPLES.glob("*.toml"))
    assert {f.stem for f in files} >= {"privacy_utility_ml100k", "central_vs_federated"}
    for path in files:
        grid = read_grid(path, str(shared_data))
        assert grid.cells and f"fedrec experiment examples/{path.name}" in path.read_text()
    privacy = read_grid(EXAMPLES / "privacy_utility_ml100k.toml", str(shared_data))
    assert privacy.axes == {"target-epsilon": [1, 2, 4, 8, 16]}
    assert json.dumps(sorted({c.kind for c in privacy.cells})) == '["central", "federated", "non-private"]'
