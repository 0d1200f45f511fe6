"""A SuperLink and SuperNodes on 127.0.0.1, for tests, benchmarks and `fedrec deploy`: unique
ports, an own FLWR_HOME, no runtime dependency installation, optional TLS and SuperNode
authentication, every process stopped by its group."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .certs import Certs

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
        self.end(*self.procs)

    def end(self, *procs: subprocess.Popen) -> None:
        """SIGTERM each process group, then SIGKILL what is left after 15 s. Flower detaches the
        processes it spawns (SuperExec, ServerApp, ClientApp) into their own sessions; they
        watch their parent's PID and exit with it."""
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


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


@dataclass(frozen=True)
class Secure:
    """TLS on every connection to the SuperLink and, when node keys are given, SuperNode
    authentication: node I signs its requests with node_keys[I], whose `.pub` is registered."""

    certs: Certs
    node_keys: tuple[Path, ...] = ()


def start_superlink(procs: Processes, workdir: Path, port: int, secure: Secure | None = None,
                    database: Path | None = None, log_name: str = "superlink.log") -> subprocess.Popen:
    """Without a database the SuperLink keeps its state (registered nodes, runs) in memory only."""
    tls = ["--insecure"] if secure is None else ["--ssl-ca-certfile", str(secure.certs.ca), "--ssl-certfile",
                                                 str(secure.certs.cert), "--ssl-keyfile", str(secure.certs.key)]
    auth = ["--enable-supernode-auth"] if secure and secure.node_keys else []
    db = ["--database", str(database)] if database else []
    log = workdir / log_name
    link = procs.start("flower-superlink", *tls, *auth, *db, "--host", "127.0.0.1", "--port", str(port),
                       "--disable-runtime-dependency-installation", log=log)
    wait_for_port(port, link, log)
    return link


def start_supernode(procs: Processes, port: int, index: int, count: int, log: Path, secure: Secure | None = None,
                    key: Path | None = None, node_config: str = "", extra: tuple[str, ...] = ()) -> subprocess.Popen:
    tls = ["--insecure"] if secure is None else ["--root-certificates", str(secure.certs.ca)]
    auth = ["--auth-supernode-private-key", str(key)] if key else []
    if not re.search(r"(^|\s)(shard|partition-id)=", node_config):  # a node config may name its own share
        node_config = f"partition-id={index} num-partitions={count} {node_config}".strip()
    return procs.start("flower-supernode", *tls, *auth, "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                       "--node-config", node_config, *extra, log=log)


def start_federation(procs: Processes, workdir: Path, users: int, secure: Secure | None = None,
                     database: Path | None = None, node_config=lambda index: "", connection: str = "dep") -> int:
    """A SuperLink and one SuperNode per user (the deployment shape); returns the port. With
    node keys, each node's public key is registered before the node starts: an unregistered
    node is refused for good, not retried."""
    port = free_port()
    start_superlink(procs, workdir, port, secure, database)
    keys = secure.node_keys if secure else ()
    if keys:
        write_connection(procs.env, connection, port, secure.certs.ca)
        for key in keys[:users]:
            flwr(procs.env, "supernode", "register", str(key) + ".pub", connection)
    for user in range(users):
        start_supernode(procs, port, user, users, workdir / f"node{user}.log", secure,
                        keys[user] if keys else None, node_config(user))
    return port


def flwr(env: dict, *args: str, timeout: float = 120) -> str:
    """A `flwr` CLI command that must succeed; returns its stdout."""
    done = subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"flwr {' '.join(args)} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def write_connection(env: dict, connection: str, port: int, ca: Path | None = None, host: str = "127.0.0.1") -> None:
    """The CLI's connection in $FLWR_HOME/config.toml: TLS trusting only `ca`, or plain text."""
    home = Path(env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    tls = "insecure = true" if ca is None else f"root-certificates = '{Path(ca).resolve()}'"  # TOML literal string
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{connection}"\n[superlink.{connection}]\n'
                                      f'address = "{host}:{port}"\n{tls}\n')


def run_status(env: dict, connection: str, run_id: str | None = None) -> dict:
    """One run's listing (the newest without run_id); {} when there is none."""
    listing = subprocess.run([str(BIN / "flwr"), "ls", connection, "--format", "json",
                              *(["--run-id", run_id] if run_id else [])],
                             env=env, capture_output=True, text=True, timeout=120)
    try:
        runs = json.loads(listing.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        return {}
    return max(runs, key=lambda r: r.get("pending-at") or "", default={})


def flwr_run(env: dict, connection: str, port: int, run_config: str, extra: list[str] | None = None,
             ca: Path | None = None) -> tuple[dict, str]:
    """`flwr run .` against 127.0.0.1:port (TLS when `ca` is given); returns the run's listing
    and the CLI's output. `flwr run --stream` exits 0 even when the run fails: the caller
    checks the status."""
    write_connection(env, connection, port, ca)
    run = subprocess.run([str(BIN / "flwr"), "run", str(REPO), connection, "--stream", "--run-config", run_config,
                          *(extra or [])], env=env, capture_output=True, text=True, timeout=1800)
    started = re.search(r"Successfully started run (\d+)", run.stdout)
    return run_status(env, connection, started.group(1) if started else None), run.stdout[-3000:] + run.stderr[-3000:]
