"""Run a federated simulation on Flower's simulation runtime: the one `flwr run` uses, a local
SuperLink in simulation mode whose flwr-simulation process runs the ServerApp and the Ray-backed
ClientApps (simulations/engine.py).

`simulate(cfg)` is the Python entry point for notebooks and tests. The ServerApp runs in another
process, so everything it hands back is read from the run directory it writes (summary.json,
metrics.csv, model.npz, audit.jsonl), and metrics.csv, flushed as each round ends, is followed for
`on_round`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pickle
import shutil
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from fedrec.client.storage import ENV_DIR
from fedrec.datasets.shards import node_name, open_shard
from fedrec.models.saved import load_model
from fedrec.run.build import SHARDS_ENV, ensure_shards, make_algorithm, num_nodes
from fedrec.run.build import population as count_users
from fedrec.run.config import ConfigError, RunConfig
from fedrec.run.rundir import make_run_dir
from fedrec.server import checkpoint
from fedrec.server.app import CONTROL_ENV
from fedrec.server.rounds import StopRequest, stop_on_signals
from fedrec.server.runner import FederatedOutcome, resumed_config

from .engine import Engine, RunFailed, ray_federation, ray_worker_env, stop_marked, toml_lines, write_app

SERVERAPP, CLIENTAPP = "fedrec.server.app:app", "fedrec.client.app:app"


def check_population(cfg: RunConfig) -> int:
    """Validate what depends on the data before anything starts; returns the user count."""
    population = count_users(cfg)
    if cfg.users_per_round > population:
        raise ConfigError(f"users-per-round={cfg.users_per_round} is larger than the {population} users "
                          f"of {cfg.dataset}; use at most {population} (0 = all)")
    return population


def simulate(cfg: RunConfig, on_round: Callable[[dict], None] | None = None,
             num_cpus: int | None = None, say: Callable[[str], None] = print,
             exclude: Iterable[int] = ()) -> FederatedOutcome:
    """Run (or with cfg.resume continue) a simulation. Ctrl-C/SIGTERM: the run stops after
    the current round with a checkpoint and the outcome's status is "interrupted"; a second
    one ends the run's processes and this one at once (exit 130).
    `exclude`: users (global ids) the server draws and then drops in every round."""
    started = time.perf_counter()
    if cfg.resume:
        cfg = resumed_config(cfg)
        # What an engine of this run left running when its driver was killed must not write into
        # the run directory any more (its reaper kills it; this waits for that) before it is read.
        stop_marked(str(engine_dir(Path(cfg.resume)).resolve()), grace=0)
    cfg = cfg.resolved().validate()
    nodes = num_nodes(cfg, check_population(cfg))
    # Cut the data into one shard per node before the engine starts (cached: once per data,
    # split and node count); each node then opens its own shard and nothing else.
    shards = ensure_shards(cfg, nodes).resolve()
    run_dir = Path(cfg.resume) if cfg.resume else make_run_dir(cfg, "federated")
    cfg = dataclasses.replace(cfg, out=str(run_dir))
    devices, private = device_dir(run_dir), engine_dir(run_dir)
    control = private / "control"
    # What the simulated devices read from the operator, not from the server (their shards, their
    # own disks), and the settings of their processes: set on the SuperLink, inherited by
    # flwr-simulation and the Ray it starts (ray_worker_env hands them to a joined cluster's workers).
    env = ray_worker_env(cfg.ray_address, worker_env(devices, shards)) | {CONTROL_ENV: str(control)}
    engine, stop = Engine(private, env), StopRequest(control / "stop")
    follow = MetricsFollower(run_dir / "metrics.csv", on_round,
                             skip=len(checkpoint.load(run_dir).history) if cfg.resume else 0)
    devices.mkdir(mode=0o700, exist_ok=True)
    keep_log = False
    try:
        with stop_on_signals(stop, say, at_once=lambda: engine.stop(grace=2)), engine:
            engine.start()
            control.mkdir(mode=0o700)
            (control / "inputs.json").write_text(json.dumps({"exclude": sorted(int(u) for u in exclude),
                                                             "shards": str(shards)}))
            if stop.is_set():  # asked before the control directory existed
                stop.set()
            app = write_app(private / "app", SERVERAPP, CLIENTAPP, RunConfig().to_dict())
            (private / "run-config.toml").write_text(toml_lines(cfg.to_dict()))
            engine.run(app, private / "run-config.toml",
                       ray_federation(cfg.ray_address, num_cpus or os.cpu_count() or 2, nodes), follow)
            return _outcome(cfg, run_dir, shards, control, engine, say, started)
    except RunFailed:
        keep_log = True  # beside the run, private: it is what explains the failure
        raise
    finally:
        # The devices' private state is no output: it stays only while the run can be resumed
        # (interrupted, or failed after a checkpoint), or, with --keep-checkpoints, beside the run.
        interrupted = _read_json(run_dir / "summary.json").get("status") == "interrupted"
        if not (interrupted or (run_dir / checkpoint.CHECKPOINT).is_file() or cfg.keep_checkpoints):
            shutil.rmtree(devices, ignore_errors=True)
        _clear(private, keep=engine.log if keep_log else None)


def _outcome(cfg: RunConfig, run_dir: Path, shards: Path, control: Path, engine: Engine,
             say: Callable[[str], None], started: float) -> FederatedOutcome:
    """What the ServerApp left in the run directory, or what ended the run: the server's own
    exception, raised again here, or RunFailed with the end of Flower's log."""
    summary = _read_json(run_dir / "summary.json")
    if (control / "error.pickle").is_file():
        raise _server_error(control / "error.pickle", summary)
    status = summary.get("status", "")
    listing = {} if status == "interrupted" else engine.status()  # interrupted: failed for Flower, no matter
    if status == "interrupted":
        model = _checkpointed_model(cfg, run_dir, shards)
    elif status == "completed" and listing.get("status") == "finished:completed":
        model = load_model(run_dir)
    else:
        say(engine.tail())
        raise RunFailed(f"the simulation ended without a result (Flower: {listing.get('status', 'no run')}, "
                        f"{listing.get('status-details', '')}); Flower's log: {engine.log}")
    return FederatedOutcome(summary, read_rows(run_dir / "metrics.csv"), model, run_dir, read_audit(run_dir),
                            time.perf_counter() - started, status=status)


def _checkpointed_model(cfg: RunConfig, run_dir: Path, shards: Path) -> dict:
    """An interrupted run's model as of its checkpoint (not released: the run directory holds none)."""
    meta = open_shard(shards / node_name(0)).meta
    state = make_algorithm(cfg, meta.n_items, meta.rating_scale).init_server(cfg.strategy, cfg.server_lr)
    state.load(checkpoint.load(run_dir).server)
    return state.model()


def worker_env(devices: Path, shards: Path) -> dict[str, str]:
    return {ENV_DIR: str(devices), SHARDS_ENV: str(shards),
            # one CPU per ClientApp actor (client-resources-num-cpus=1): torch's own intra-op threads on
            # top of one actor per core oversubscribe the cores (local steps measured 2-10x slower)
            "OMP_NUM_THREADS": "1",
            # glibc hands large freed blocks back to the OS, so each chunk's tensors page-fault in
            # anew; keeping blocks up to 16 MB: 1M-user bench 48k -> 60k updates/s, 100k-user
            # 29k -> 47k with a lower peak (8 MB: no faster than glibc's default; 64 MB: +350 MB)
            **{name: str(16 * 2**20) for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}}


class MetricsFollower:
    """on_round(row) for each row the server appends to metrics.csv, from row `skip` on (a resumed
    run starts the file afresh with its checkpoint's rows), once the server has started the file
    anew (before that, a resumed run's file still holds rows of the timeline it cuts off). Reads
    only what was appended since the last call."""

    def __init__(self, path: Path, on_round: Callable[[dict], None] | None, skip: int = 0):
        self.path, self.on_round, self.skip = path, on_round, skip
        self.before, self.started = _stamp(path), False
        self.offset, self.header, self.rows = 0, None, 0

    def __call__(self) -> None:
        if self.on_round is None:
            return
        self.started = self.started or _stamp(self.path) not in (None, self.before)
        if not self.started:
            return
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line still being written waits for the next call
        self.offset += len(complete)
        for cells in csv.reader(complete.decode().splitlines()):
            if self.header is None:
                self.header = cells
                continue
            self.rows += 1
            if self.rows > self.skip:
                self.on_round(_row(dict(zip(self.header, cells))))


def read_rows(path: Path) -> list[dict]:
    """metrics.csv's complete lines as rows: numbers as numbers, empty cells left out."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # being written
    return [_row(row) for row in csv.DictReader(lines)]


def _row(cells: dict) -> dict:
    return {key: _number(value) for key, value in cells.items() if value not in ("", None)}


def read_audit(run_dir: Path) -> list[dict]:
    """audit.jsonl (a DP run writes none): in the run directory, or in the server's kept memory
    once users are forgotten (server/app.py audit_location)."""
    for path in (run_dir / "audit.jsonl", checkpoint.kept_dir(run_dir) / "audit.jsonl"):
        if path.is_file():
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return []


def _clear(folder: Path, keep: Path | None = None) -> None:
    """Remove `folder`, or with `keep`, everything in it but that file."""
    if keep is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for entry in folder.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry != keep:
            entry.unlink()


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _server_error(path: Path, summary: dict) -> BaseException:
    """The ServerApp's own exception (written by server/app.py main), as run_simulation's thread
    handed it over before; its message alone where it cannot be rebuilt here."""
    try:
        error = pickle.loads(path.read_bytes())  # our own file, in the run's 0700 directory
    except Exception:
        error = None
    if isinstance(error, BaseException):
        return error
    return RunFailed(summary.get("status", "failed: (no message)").removeprefix("failed: "))


def device_dir(run_dir: Path) -> Path:
    """The simulated devices' own disks: beside the run directory, not in it (what is in a run
    directory is what a run releases), private to this user (0700)."""
    return run_dir.with_name(run_dir.name + ".devices")


def engine_dir(run_dir: Path) -> Path:
    """The engine's own files (FLWR_HOME, the app directory, Flower's log, the ServerApp's control
    directory): beside the run directory, private to this user (0700), removed after the run."""
    return run_dir.with_name(run_dir.name + ".engine")


@contextmanager
def _environment(values: dict[str, str]):
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
