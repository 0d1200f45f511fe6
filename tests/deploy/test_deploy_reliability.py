"""A loopback deployment that loses its ServerApp mid-run (kill -9) and is resumed with
`resume=<run dir>`: the SuperNodes kept their users' state on their own disks (node config
`state-dir`), so the run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedrec.client.app import app as client_app
from fedrec.deploy.loopback import BIN, REPO, Processes, flower_env, flwr_run, start_federation, write_connection
from fedrec.run.config import RunConfig
from fedrec.server.runner import run_server
from fedrec.simulations.inprocess import InProcessGrid

pytestmark = pytest.mark.engine

NODES = 2
SETTINGS = dict(synthetic_users=40, synthetic_items=30, synthetic_density=0.25, dim=6, rounds=3, eval_every=3,
                checkpoint_every=1, users_per_round=20)


def _run_config(**values) -> str:
    return " ".join(f"{k.replace('_', '-')}={json.dumps(v) if isinstance(v, str) else v}" for k, v in values.items())


def _serverapps(home: Path) -> list[int]:
    """PIDs of the flwr-serverapp processes of this federation (found by their FLWR_HOME)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if b"flwr-serverapp" in (entry / "cmdline").read_bytes() and \
                    f"FLWR_HOME={home}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return pids


def test_a_killed_serverapp_resumes_to_the_uninterrupted_result(tmp_path):
    run_dir = tmp_path / "run"
    # The uninterrupted reference: the same ClientApp and strategy, in-process.
    reference = run_server(InProcessGrid(client_app, NODES), RunConfig(**SETTINGS, out=str(tmp_path / "reference")))

    env = flower_env(tmp_path / "flwr")
    procs = Processes(env)
    try:
        port = start_federation(procs, tmp_path, NODES, node_config=lambda i: f'state-dir="{tmp_path}/node{i}"')
        write_connection(env, "dep", port)
        first = subprocess.Popen([str(BIN / "flwr"), "run", str(REPO), "dep", "--stream", "--run-config",
                                  _run_config(**SETTINGS, out=str(run_dir))], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 600
        while not ((run_dir / "metrics.csv").is_file() and len((run_dir / "metrics.csv").read_text().splitlines()) > 2):
            assert time.monotonic() < deadline, "round 2 never ended"
            time.sleep(0.2)
        for pid in _serverapps(Path(env["FLWR_HOME"])):
            os.kill(pid, signal.SIGKILL)  # the server side dies without a chance to clean up
        first.wait(timeout=120)
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"

        status, output = flwr_run(env, "dep", port, _run_config(resume=str(run_dir)))
        assert status.get("status") == "finished:completed", output
    finally:
        procs.stop()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["metrics"] == reference.summary["metrics"]
