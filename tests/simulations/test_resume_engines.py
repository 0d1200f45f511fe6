"""Stop, kill -9 and resume through the real Ray engine and the real CLI: the resumed run ends
exactly where an uninterrupted one does (seeded mode)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.engine

FEDREC = str(Path(sys.executable).parent / "fedrec")
SETTINGS = ["--synthetic-users", "300", "--synthetic-items", "120", "--synthetic-density", "0.1", "--dim", "8",
            "--rounds", "8", "--eval-every", "2", "--checkpoint-every", "2", "--users-per-round", "100"]


def _start(*args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, FLWR_LOG_LEVEL="ERROR")
    return subprocess.Popen([FEDREC, "simulate", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_round(run_dir: Path, round_: int, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        csv = run_dir / "metrics.csv"
        if csv.is_file() and len(csv.read_text().splitlines()) - 1 >= round_:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    raise TimeoutError(f"round {round_} never ended")


def _status(run_dir: Path) -> str:
    return json.loads((run_dir / "summary.json").read_text())["status"]


def test_ctrl_c_then_kill_9_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    whole = _start(*SETTINGS, "--out", "whole", cwd=tmp_path)
    assert whole.wait(timeout=600) == 0, whole.stdout.read()

    run = tmp_path / "run"
    first = _start(*SETTINGS, "--out", "run", cwd=tmp_path)
    _wait_for_round(run, 3, first)
    first.send_signal(signal.SIGINT)  # Ctrl-C: finish the round, checkpoint, exit 130 with one line
    stopped_at = time.monotonic()
    assert first.wait(timeout=60) == 130
    assert time.monotonic() - stopped_at < 30
    output = first.stdout.read().strip().splitlines()
    assert "Traceback" not in "\n".join(output) and output[-1].startswith("interrupted after round")
    assert _status(run) == "interrupted" and (run / "checkpoint.npz").is_file()
    assert not (run / "devices").exists() and (tmp_path / "run.devices").is_dir()  # not in the run directory

    second = _start("--resume", "run", cwd=tmp_path)
    _wait_for_round(run, 6, second)
    os.killpg(second.pid, signal.SIGKILL)  # no chance to clean up: the last periodic checkpoint stands
    second.wait(timeout=60)
    assert _status(run) == "running"

    third = _start("--resume", "run", cwd=tmp_path)
    assert third.wait(timeout=600) == 0, third.stdout.read()
    assert _status(run) == "completed" and not (run / "checkpoint.npz").exists()
    assert not (tmp_path / "run.devices").exists()  # the simulated devices' private state is not kept
    pd.testing.assert_frame_equal(pd.read_csv(run / "metrics.csv").drop(columns="seconds"),
                                  pd.read_csv(tmp_path / "whole" / "metrics.csv").drop(columns="seconds"))
    assert (json.loads((run / "summary.json").read_text())["metrics"]
            == json.loads((tmp_path / "whole" / "summary.json").read_text())["metrics"])
