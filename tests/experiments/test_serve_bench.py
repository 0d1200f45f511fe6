"""fedrec serve-bench end to end on a small synthetic run: real `fedrec serve` processes, the
in-process fit and the page's own cold-start form; a wrong --run is one line, exit 2, no OUT left."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedrec.cli.main import cli

SMALL = ["--dataset", "synthetic", "--synthetic-users", "60", "--synthetic-items", "40", "--synthetic-density", "0.3",
         "--dim", "8"]


@pytest.mark.engine  # real `fedrec serve` processes: ~8 s
def test_serve_bench_times_start_up_and_cold_start_fits(tmp_path):
    run, out = tmp_path / "central", tmp_path / "bench"
    trained = CliRunner().invoke(cli, ["central", *SMALL, "--epochs", "3", "--eval-every", "3", "--out", str(run)])
    assert trained.exit_code == 0, trained.output
    result = CliRunner().invoke(cli, ["serve-bench", "--run", str(run), "--starts", "1", "--repeats", "5",
                                      "--http-repeats", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "serve_bench.json").read_text())
    start = report["start_up"]
    assert 0 < start["first_page_seconds"]["max"] <= start["device_page_seconds"]["max"] < 60
    fits = report["fit_top10_in_process"]
    assert set(fits["by_ratings"]) == {"5", "10", "15", "20"} and fits["all"]["n"] == 20
    assert fits["all"]["median"] <= fits["all"]["p95"] <= fits["all"]["max"] < 1.0
    posted = report["fit_top10_http"]  # each POST answered with 10 recommendations, or the bench raised
    assert posted["all"]["n"] == 2 * len(posted["by_ratings"]) > 0
    assert posted["fit_seconds_shown"]["n"] == posted["all"]["n"] and 0 < posted["first_post_after_start_seconds"] < 30
    assert "serve start -> GET / 200" in result.output


def test_serve_bench_without_a_finished_run_is_one_line_exit_2(tmp_path):
    for run, expected in ((tmp_path / "nowhere", "nowhere is not a directory"), (tmp_path, "has no model.npz")):
        result = CliRunner().invoke(cli, ["serve-bench", "--run", str(run), "--out", str(tmp_path / "bench")])
        assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output
        assert not (tmp_path / "bench").exists()
