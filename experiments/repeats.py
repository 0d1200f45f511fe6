"""Repeats of one experiment, and the federations they run in one session.

A repeat changes the seed (initial vectors, negatives, non-DP sampling, synthetic data) and, where the
protocol has folds (ML-100K u1..u5), the fold: repeat r of a u2 run trains on u(2+r), wrapping after
u5. On the random and leave-one-out splits the seed also draws the split, so there the interval covers
the split's variation too.

One run's time goes mostly to starting Flower's engine, not to training: on ML-100K u1 (2 cores) a
federated run's rounds take ~8 s of its ~23 s; the rest is the SuperLink, `flwr run`, the
flwr-simulation process, Ray and its actors importing torch. Flower's engine starts all of that
afresh for every `flwr run`, and a ClientApp reads its shards and device-state directory from the
environment the engine was started with, so repeats cannot share one engine. `federate_in_session`
runs each repeat's federation with the same ServerApp and ClientApp code (server/runner.py,
client/app.py) in this process instead (simulations/inprocess.py, as `fedrec tune` and `fedrec
robustness` do): torch, the data and the shards are loaded once for all repeats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from fedrec.run.config import RunConfig

FOLDS = ("u1", "u2", "u3", "u4", "u5")


@dataclass(frozen=True)
class Repeat:
    index: int  # 1-based, as in the directory names repeat-1, repeat-2...
    seed: int
    fold: str  # the split the repeat runs on (a fold of u1..u5, else the run's own split)
    cfg: RunConfig


def repeats(cfg: RunConfig, count: int) -> list[Repeat]:
    """`count` repeats of `cfg`: seeds seed, seed+1, ...; folds rotated where the split is one of u1..u5."""
    out = []
    for r in range(count):
        split = FOLDS[(FOLDS.index(cfg.split) + r) % len(FOLDS)] if cfg.split in FOLDS else cfg.split
        seed = cfg.seed + r
        out.append(Repeat(r + 1, seed, split, dataclasses.replace(cfg, seed=seed, split=split)))
    return out


def check_repeats(count: int) -> None:
    from fedrec.run.config import ConfigError

    if count < 1:
        raise ConfigError(f"--repeats must be >= 1 (got {count})")


@contextlib.contextmanager
def one_torch_thread():
    """Torch on one thread, as each of the engine's ClientApp actors (simulations/federated.py worker_env).
    On the shared 2-core machine torch's own intra-op threads made ML-100K u1 federated rounds 3.4x and
    central MF epochs 7x slower (measured back to back under load); the engine's actors are why."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def federate_in_session(cfg: RunConfig, on_round: Callable[[dict], None] | None = None):
    """One federation through the ServerApp and ClientApp code in this process (see the module
    docstring); the FederatedOutcome `simulate` returns, with cfg.out as its run directory. The
    devices' state lives beside it while the run goes and is removed after (unless
    --keep-checkpoints), as `simulate` does."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.client.app import app as client_app
    from fedrec.client.storage import ENV_DIR
    from fedrec.datasets.shards import read_items
    from fedrec.run.build import SHARDS_ENV, ensure_shards, num_nodes
    from fedrec.run.rundir import make_run_dir
    from fedrec.server.runner import run_server
    from fedrec.simulations.federated import _environment, check_population, device_dir
    from fedrec.simulations.inprocess import InProcessGrid

    cfg = cfg.resolved().validate()
    nodes = num_nodes(cfg, check_population(cfg))
    shards = ensure_shards(cfg, nodes).resolve()
    run_dir = make_run_dir(cfg, "federated")
    devices = device_dir(run_dir)
    try:
        with _environment({SHARDS_ENV: str(shards), ENV_DIR: str(devices)}), one_torch_thread():
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
            return run_server(InProcessGrid(client_app, nodes), dataclasses.replace(cfg, out=str(run_dir)),
                              on_round, catalogue=read_items(shards))
    finally:
        if not cfg.keep_checkpoints:
            shutil.rmtree(devices, ignore_errors=True)
