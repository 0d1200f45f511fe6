"""Run a federated simulation through Flower's simulation engine (Ray backend).

`simulate(cfg)` is the Python entry point for notebooks and tests: it builds the
ServerApp around `cfg` (run_simulation hands the ServerApp an empty run_config, so the
config travels by closure) and returns the outcome object the server produced.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrec.client.app import app as client_app
from fedrec.client.storage import ENV_DIR
from fedrec.datasets.shards import read_items
from fedrec.experiments.scaleout import ray_backend, ray_worker_env
from fedrec.run.build import SHARDS_ENV, ensure_shards, num_nodes
from fedrec.run.build import population as count_users
from fedrec.run.config import ConfigError, RunConfig
from fedrec.run.rundir import make_run_dir
from fedrec.server.checkpoint import CHECKPOINT
from fedrec.server.rounds import stop_on_signals
from fedrec.server.runner import FederatedOutcome, resumed_config, run_server


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
    the current round with a checkpoint and the outcome's status is "interrupted".
    `exclude`: users (global ids) the server draws and then drops in every round."""
    if cfg.resume:
        cfg = resumed_config(cfg)
    cfg = cfg.resolved().validate()
    nodes = num_nodes(cfg, check_population(cfg))
    # Cut the data into one shard per node before the engine starts (cached: once per data,
    # split and node count); each node then opens its own shard and nothing else.
    shards = ensure_shards(cfg, nodes)
    run_dir = Path(cfg.resume) if cfg.resume else make_run_dir(cfg, "federated")
    cfg = dataclasses.replace(cfg, out=str(run_dir))
    devices = device_dir(run_dir)
    outcome: dict = {}
    stop = threading.Event()

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        pull_often(grid)
        try:
            outcome["result"] = run_server(grid, cfg, on_round, stop=stop, catalogue=read_items(shards),
                                           exclude=exclude)
        except BaseException as error:  # run_simulation only logs; hand it to the caller
            outcome["error"] = error
            raise

    from flwr.simulation import run_simulation  # imports Ray: keep it off the CLI's start-up path

    # Ray started here with this machine's CPUs, or the running cluster of --ray-address
    backend = ray_backend(cfg.ray_address, num_cpus or os.cpu_count() or 2)
    # What the simulated devices read from the operator, not from the server: their shards
    # and their own disks (workers of a Ray started here inherit this process's environment;
    # ray_worker_env hands it to a joined cluster's workers too).
    env = {ENV_DIR: str(devices), SHARDS_ENV: str(shards.resolve()),
           # one CPU per ClientApp actor (client_resources): torch's own intra-op threads on top
           # of one actor per core oversubscribe the cores (local steps measured 2-10x slower)
           "OMP_NUM_THREADS": str(backend["client_resources"]["num_cpus"]),
           # glibc hands large freed blocks back to the OS, so each chunk's tensors page-fault in
           # anew; keeping blocks up to 16 MB: 1M-user bench 48k -> 60k updates/s, 100k-user
           # 29k -> 47k with a lower peak (8 MB: no faster than glibc's default; 64 MB: +350 MB)
           **{name: str(16 * 2**20) for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}}
    env = ray_worker_env(cfg.ray_address, env)
    devices.mkdir(mode=0o700, exist_ok=True)
    try:
        with _environment(env), stop_on_signals(stop, say):
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=nodes, backend_config=backend)
        if "error" in outcome:
            raise outcome["error"]
        if "result" not in outcome:
            raise RuntimeError("the simulation ended without a result; see the Flower log above")
    finally:
        # The devices' private state is no output: it stays only while the run can be resumed
        # (interrupted, or failed after a checkpoint), or, with --keep-checkpoints, beside the run.
        result = outcome.get("result")
        resumable = (result.status == "interrupted") if result else (run_dir / CHECKPOINT).is_file()
        if not (resumable or cfg.keep_checkpoints):
            shutil.rmtree(devices, ignore_errors=True)
    return outcome["result"]


GRID_PULL_SECONDS = 0.02
"""How often the ServerApp asks the simulation engine for replies. Flower's in-memory grid
asks every 0.1 s; a round whose nodes answer in 50 ms then waits a whole extra tick."""


def pull_often(grid: Grid) -> None:
    """Flower's InMemoryGrid takes its pull interval as a constructor argument that
    run_simulation leaves at 0.1 s; other grids (the Deployment Engine's) are left alone."""
    if hasattr(grid, "pull_interval"):
        grid.pull_interval = GRID_PULL_SECONDS


def device_dir(run_dir: Path) -> Path:
    """The simulated devices' own disks: beside the run directory, not in it (what is in a run
    directory is what a run releases), private to this user (0700)."""
    return run_dir.with_name(run_dir.name + ".devices")


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
