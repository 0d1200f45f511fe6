"""One run on Flower's supported runtime, as `flwr run APP CONNECTION` does it with a local
SuperLink in simulation mode (`flwr.simulation.run_simulation` is deprecated since Flower 1.28).

    Engine(workdir, env).start()   `flower-superlink --simulation` on 127.0.0.1 (a free port), its
                                   own FLWR_HOME, no runtime dependency installation
    engine.run(app, config, ...)   `flwr run APP CONNECTION --stream --run-config FILE
                                   --federation-config ...`; Flower's SuperExec starts one
                                   `flwr-simulation` process for it: the ServerApp in a thread,
                                   the ClientApps on Ray
    engine.status()                how Flower says the run ended (`flwr ls --format json`)
    engine.stop()                  every process it started

Flower detaches its processes into sessions of their own, so no one process group holds them:
each carries this engine's marker in its environment (they all inherit the SuperLink's, Ray's
workers included) and stop() ends what carries it; should this process die without stopping
them (kill -9), a reaper process kills them at once, as a kill -9 of a driver that ran the
ServerApp and Ray in-process did. What the devices read from the operator and the thread and
allocator settings travel the same way as the marker. Flower's and Ray's own output goes to
workdir/flower.log; `workdir` is private to the run, never its run directory (what a run releases).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from fedrec.deploy.loopback import BIN, free_port, wait_for_port, write_connection

MARK = "FEDREC_ENGINE"
CONNECTION = "fedrec"
POLL_SECONDS = 0.1  # how often the caller's poll() runs while the run goes (the progress bar)
# SuperExec asks the SuperLink for a new run every 1 s by default (FLWR_SUPEREXEC_TASK_POLL_INTERVAL,
# flwr/supercore/superexec/run_superexec.py): half a second of waiting on average before a run starts.
# It keeps asking while the run goes: at 0.1 s that cost the SuperLink ~4% of a core on ML-100K.
TASK_POLL_SECONDS = "0.25"


class RunFailed(RuntimeError):
    """The run ended without a result of its own (Flower or Ray failed, not the ServerApp)."""


def write_app(folder: Path, serverapp: str, clientapp: str, config: dict) -> Path:
    """A Flower app directory holding a pyproject.toml only: the FAB `flwr run` builds from it
    carries no code, so flwr-simulation imports the components from the installed packages.
    `config`: every run-config key with its default (`flwr run --run-config` accepts no others)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(
        '[project]\nname = "fedrec-run"\nversion = "1.0.0"\ndescription = "A fedrec run"\ndependencies = []\n\n'
        f'[tool.flwr.app]\npublisher = "fedrec"\n\n[tool.flwr.app.components]\nserverapp = "{serverapp}"\n'
        f'clientapp = "{clientapp}"\n\n[tool.flwr.app.config]\n{toml_lines(config)}')
    return folder


def toml_lines(values: dict) -> str:
    """Flat `key = value` lines (JSON's literals are TOML's for strings, numbers and booleans)."""
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


def federation_config(settings: dict) -> str:
    return " ".join(f"{key}={json.dumps(value)}" for key, value in settings.items())


class Engine:
    """A SuperLink for one run. `env`: set in every process of the engine."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None):
        self.workdir = Path(workdir).resolve()
        self.log = self.workdir / "flower.log"
        # The marker names the work directory: a new engine for the same run ends what an engine
        # killed with -9 left running (a ServerApp still writing into the run directory).
        self.env = {**os.environ, **(env or {}), "FLWR_HOME": str(self.workdir / "flwr-home"),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL",
                                                                        TASK_POLL_SECONDS),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", MARK: str(self.workdir)}
        self.children: list[subprocess.Popen] = []
        self.lifeline, self.reaper = None, None

    def start(self) -> Engine:
        """The SuperLink, in a fresh work directory (after ending what an engine killed with -9 left)."""
        stop_marked(str(self.workdir))
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(mode=0o700, parents=True)
        self._start_reaper()
        port = free_port()
        link = self._spawn("flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
                           "--disable-runtime-dependency-installation")
        wait_for_port(port, link, self.log)
        write_connection(self.env, CONNECTION, port)
        return self

    def run(self, app: Path, run_config: Path, federation: dict, poll: Callable[[], None] = lambda: None) -> None:
        """Submit the run and wait for it, calling poll() meanwhile and once after. `flwr run
        --stream` exits 0 even when the run failed: status() says how it ended."""
        cli = self._spawn("flwr", "run", str(app), CONNECTION, "--stream", "--run-config", str(run_config),
                          "--federation-config", federation_config(federation))
        while cli.poll() is None:
            poll()
            time.sleep(POLL_SECONDS)
        poll()

    def status(self) -> dict:
        """The run's `flwr ls` listing ({} if there is none): "status" is "finished:completed" for a
        run that completed, "status-details" says why one did not."""
        listing = subprocess.run([str(BIN / "flwr"), "ls", CONNECTION, "--format", "json"], env=self.env,
                                 capture_output=True, text=True, timeout=120, start_new_session=True)
        try:
            return max(json.loads(listing.stdout)["runs"], key=lambda r: r.get("pending-at") or "", default={})
        except (json.JSONDecodeError, KeyError):
            return {}

    def stop(self, grace: float = 15) -> None:
        stop_marked(str(self.workdir), grace)
        if self.lifeline is not None:
            os.close(self.lifeline)  # the reaper finds nothing left and exits
            self.lifeline = None
            self.reaper.wait(timeout=30)
        for child in self.children:
            child.poll()  # reaped: no zombie left behind

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.is_file() else ""

    def _spawn(self, command: str, *args: str) -> subprocess.Popen:
        with open(self.log, "a") as log:  # the child keeps its own handle
            child = subprocess.Popen([str(BIN / command), *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)  # no terminal Ctrl-C
        self.children.append(child)
        return child

    def _start_reaper(self) -> None:
        """A process (without the marker, in a session of its own) holding the read end of a pipe
        only this process writes to: EOF, however this process ended, and it SIGKILLs the engine."""
        read, self.lifeline = os.pipe()  # not inherited by the engine's processes (PEP 446)
        code = ("import sys; from fedrec.simulations.engine import stop_marked; "
                "sys.stdin.buffer.read(); stop_marked(sys.argv[1], grace=0)")
        self.reaper = subprocess.Popen([sys.executable, "-c", code, str(self.workdir)], stdin=read,
                                       stdout=subprocess.DEVNULL, start_new_session=True)
        os.close(read)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def marked(marker: str) -> list[int]:
    """Live processes (of this user: others' environments are unreadable) carrying the marker."""
    needle = f"{MARK}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0"):
                if (entry / "stat").read_text().rsplit(") ", 1)[1][0] != "Z" and int(entry.name) != os.getpid():
                    found.append(int(entry.name))
        except (OSError, IndexError):
            pass
    return found


def stop_marked(marker: str, grace: float = 15) -> None:
    """SIGTERM every process carrying the marker, SIGKILL what is left after `grace` seconds."""
    deadline = time.monotonic() + grace
    sent: set[int] = set()
    while (pids := marked(marker)) and time.monotonic() < deadline + 5:
        late = time.monotonic() > deadline
        for pid in pids:
            if late or pid not in sent:
                try:
                    os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
                except ProcessLookupError:
                    pass
                sent.add(pid)
        time.sleep(0.1)


# ---------------------------------------------------------------- Flower's Ray backend
RAY_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # ray.init merges this job config's runtime_env into its own


def ray_federation(address: str, cpus: int, nodes: int) -> dict:
    """`flwr run --federation-config` for Flower's Ray backend: `nodes` simulated SuperNodes, one
    CPU per ClientApp actor (an actor pool of floor(CPUs / 1) per Ray node), quiet Ray logging;
    a Ray started by the run with `cpus` CPUs or, with an address, that running cluster (joined
    through RAY_ADDRESS, ray_worker_env). Flower's `ray.init()` must then get no CPU or GPU
    counts (Ray raises "When connecting to an existing cluster, num_cpus and num_gpus must not
    be provided")."""
    settings = {"num-supernodes": nodes, "client-resources-num-cpus": 1, "client-resources-num-gpus": 0.0,
                "init-args-logging-level": "ERROR", "init-args-log-to-driver": False}
    return settings if address else settings | {"init-args-num-cpus": cpus, "init-args-num-gpus": 0}


def ray_worker_env(address: str, env: dict[str, str]) -> dict[str, str]:
    """The environment to run Flower's simulation under so that the ClientApp workers see `env`.
    A Ray started by the run: its workers inherit it. A joined cluster (RAY_ADDRESS, which Ray
    reads when `ray.init()` gets no address; empty: none, whatever the caller's environment
    says): workers are started by each host's raylet and do not, so `env` also travels in the
    job's runtime_env (Flower passes its own, PYTHONPATH only; ray.init merges the two per
    variable)."""
    if not address:
        return dict(env) | {"RAY_ADDRESS": ""}
    return dict(env) | {"RAY_ADDRESS": address, RAY_JOB_CONFIG: json.dumps({"runtime_env": {"env_vars": dict(env)}})}
