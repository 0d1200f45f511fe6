"""Ctrl-C through the real CLI: one line, exit code 130, no empty directory left behind; an
interrupted federated run still checkpoints and says how to resume (tests/simulations/test_resume_engines.py
covers its resume)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedrec.run.rundir import remove_if_empty

FEDREC = str(Path(sys.executable).parent / "fedrec")
SMALL = ["--synthetic-users", "300", "--synthetic-items", "120", "--synthetic-density", "0.1", "--dim", "8"]


def _start(*args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, FLWR_LOG_LEVEL="ERROR")
    return subprocess.Popen([FEDREC, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for(ready, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "never got there"
        time.sleep(0.02)


def _ctrl_c(proc: subprocess.Popen) -> tuple[int, list[str], list[str]]:
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends the fedrec process
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out.strip().splitlines(), err.strip().splitlines()


def _empty_dirs(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_dir() and not any(p.iterdir())]


@pytest.mark.parametrize("command", [
    ["compare", *SMALL, "--epochs", "1000"],  # in its data loading or central training
    ["simulate", *SMALL],  # before the engine: importing, loading and cutting the data
    ["central", *SMALL, "--epochs", "1000"],
])
def test_ctrl_c_early_is_one_line_and_leaves_nothing(tmp_path, command):
    proc = _start(*command, "--out", "out", cwd=tmp_path)
    _wait_for((tmp_path / "out").is_dir, proc)  # the run directory is made before any work
    code, out, err = _ctrl_c(proc)
    assert code == 130 and out == [] and err == ["interrupted, nothing written"], (out, err)
    assert list(tmp_path.iterdir()) == []  # not even compare's central/ or the run directory: --out is free again


def test_an_existing_empty_out_directory_stays_and_is_left_empty(tmp_path):
    (tmp_path / "out").mkdir()
    proc = _start("compare", *SMALL, "--epochs", "1000", "--out", "out", cwd=tmp_path)
    _wait_for((tmp_path / "out" / "central").is_dir, proc)  # the central side has started
    code, _, err = _ctrl_c(proc)
    # the run's announcement (model, privacy) may or may not have reached stderr first: Ctrl-C adds one line
    assert code == 130 and err[-1] == "interrupted, nothing written" and "Traceback" not in "\n".join(err)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any((tmp_path / "out").iterdir())


@pytest.mark.engine
def test_ctrl_c_after_a_federated_round_of_compare_checkpoints_and_keeps_what_was_written(tmp_path):
    proc = _start("compare", *SMALL, "--epochs", "2", "--rounds", "40", "--eval-every", "1", "--out", "out",
                  cwd=tmp_path)
    metrics = tmp_path / "out" / "federated" / "metrics.csv"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, proc)  # round 1 done
    code, _, err = _ctrl_c(proc)
    assert code == 130 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("interrupted after round ")
    assert err[-1].endswith(f"continue with: fedrec simulate --resume {tmp_path / 'out' / 'federated'}")
    assert (tmp_path / "out" / "federated" / "checkpoint.npz").is_file()
    assert (tmp_path / "out" / "central" / "summary.json").is_file()  # the finished central run is kept
    assert _empty_dirs(tmp_path) == []


def test_remove_if_empty_removes_empty_folders_inside_and_keeps_any_holding_a_file(tmp_path):
    run = tmp_path / "a" / "run"
    (run / "central").mkdir(parents=True)
    (run / "federated" / "deeper").mkdir(parents=True)
    remove_if_empty(run, keep=tmp_path)
    assert list(tmp_path.iterdir()) == []  # the run and the parent made for it
    (run / "central").mkdir(parents=True)
    (run / "federated").mkdir()
    (run / "central" / "summary.json").write_text("{}")
    remove_if_empty(run, keep=tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "a", "a/run", "a/run/central", "a/run/central/summary.json"]


def test_a_run_directory_interrupted_while_it_is_made_leaves_nothing(tmp_path, monkeypatch):
    from fedrec.run.config import RunConfig
    from fedrec.run.rundir import make_run_dir

    assert make_run_dir(RunConfig(out=str(tmp_path / "made" / "run")), "central").is_dir()  # uninterrupted

    def ctrl_c(path, data):  # Ctrl-C between making the folders and proving them writable
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        make_run_dir(RunConfig(out=str(tmp_path / "a" / "b")), "central")
    assert [p.name for p in tmp_path.iterdir()] == ["made"]


def test_a_ctrl_c_a_library_swallowed_is_raised_again_at_the_next_progress_update(monkeypatch):
    """Seen with a Ctrl-C during numpy's lazy import of numpy.random inside training: something caught the
    KeyboardInterrupt and training went on. The CLI's handler remembers it; the next update raises it."""
    import threading

    from rich.progress import Progress

    from fedrec.cli import main as fedrec_cli

    monkeypatch.setattr(fedrec_cli, "_ctrl_c", threading.Event())
    progress = Progress(disable=True)
    update = fedrec_cli._tracker(progress, progress.add_task("central", total=3), "epoch")
    update({"epoch": 1, "rmse": 1.0})  # not interrupted: the update goes through
    try:
        fedrec_cli._on_ctrl_c(signal.SIGINT, None)
    except KeyboardInterrupt:
        pass  # a catch-all in some library
    with pytest.raises(KeyboardInterrupt):
        update({"epoch": 2, "rmse": 1.0})
