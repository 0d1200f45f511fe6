"""A SuperLink and SuperNodes on 127.0.0.1, for tests and benchmarks: unique ports, an own
FLWR_HOME, no runtime dependency installation, every process stopped by its group."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path) -> dict:
    return dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")


class Processes:
    """Flower processes started in their own sessions, so stop() ends them and their children."""

    def __init__(self, env: dict):
        self.env, self.procs = env, []

    def start(self, *args, log: Path) -> subprocess.Popen:
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=self.env, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on {port}: {log.read_text()[-2000:]}")


def start_federation(procs: Processes, workdir: Path, users: int) -> int:
    """A SuperLink and one SuperNode per user (the deployment shape); returns the port."""
    port = free_port()
    log = workdir / "superlink.log"
    link = procs.start("flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
                       "--disable-runtime-dependency-installation", log=log)
    wait_for_port(port, link, log)
    for user in range(users):
        procs.start("flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                    "--node-config", f"partition-id={user} num-partitions={users}", log=workdir / f"node{user}.log")
    return port


def flwr_run(env: dict, connection: str, port: int, run_config: str, extra: list[str] | None = None) -> tuple[dict, str]:
    """`flwr run .` against 127.0.0.1:port; returns the run's listing and the CLI's output.
    `flwr run --stream` exits 0 even when the run fails: the caller checks the status."""
    home = Path(env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{connection}"\n[superlink.{connection}]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    run = subprocess.run([str(BIN / "flwr"), "run", str(REPO), connection, "--stream", "--run-config", run_config,
                          *(extra or [])], env=env, capture_output=True, text=True, timeout=1800)
    listing = subprocess.run([str(BIN / "flwr"), "ls", connection, "--format", "json"], env=env, capture_output=True,
                             text=True, timeout=120)
    runs = json.loads(listing.stdout)["runs"]
    return (runs[0] if runs else {}), run.stdout[-3000:] + run.stderr[-3000:]
