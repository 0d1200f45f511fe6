"""What a node holds: its users' data (cached per process) and their private state."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context

from fedrec.datasets import DataError
from fedrec.datasets.shards import Shard, ShardMeta, node_name, open_shard
from fedrec.models import Hyper, UserState
from fedrec.models.randomness import private_rng
from fedrec.run.build import SHARDS_ENV, data_key, ensure_shards, hyper
from fedrec.run.config import RunConfig
from fedrec.run.schema import CHECKPOINT_ROUND, RESUMED_FROM, SERIES, STATE_KEY

from .storage import discard_after, load_snapshot, rounds_taken, save_snapshot, state_root


@dataclass(frozen=True)
class NodeData:
    shard: Shard  # this node's users and their rows, memory-mapped
    hyper: Hyper

    @property
    def users(self) -> np.ndarray:  # global ids of the users this node hosts
        return self.shard.users

    @property
    def meta(self) -> ShardMeta:
        return self.shard.meta


def node_data(cfg: RunConfig, context: Context) -> NodeData:
    """This node's shard, from where the node's own config says (never a path the server
    sent): node config `shard` (deployment: `fedrec partition` wrote it), else the set the
    simulation driver built ($FEDREC_SHARDS), else cut on first use from node config
    `data-dir` (else $FEDREC_DATA_DIR, else ~/.cache/fedrec) and cached."""
    if "shard" in context.node_config:
        path = Path(str(context.node_config["shard"])).expanduser()
    else:
        partition_id, num_partitions = partition(context)
        if os.environ.get(SHARDS_ENV):
            shard_set = Path(os.environ[SHARDS_ENV])
        else:
            data_dir = str(context.node_config.get("data-dir", ""))
            shard_set = ensure_shards(dataclasses.replace(cfg, data_dir=data_dir, out="", resume=""), num_partitions)
        path = shard_set / node_name(partition_id)
    return NodeData(_open(str(path), data_key(cfg)), hyper(cfg))


@functools.lru_cache(maxsize=8)
def _open(path: str, key: str) -> Shard:
    """Open once per process: simulated nodes share a worker process and its cache."""
    shard = open_shard(path)
    if shard.meta.data_key != key:
        raise DataError(f"the shard at {path} was cut for other data or another split than this run's; "
                        "write one for this run with `fedrec partition` (same dataset, split, seed)")
    return shard


def partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError:
        raise ValueError("this SuperNode has neither a shard nor partition-id/num-partitions in its node config; "
                         "start it with --node-config 'shard=\"DIR/node-00000\"' (see `fedrec partition`)") from None


def load_state(context: Context, node: NodeData, cfg: RunConfig, config, up_to: int) -> UserState:
    """The node's users' private state as of round `up_to`: in context.state during a run,
    else the device's own saved snapshot (after a restart or a resumed run), else new.
    Where privacy is on, a user's starting vector is drawn from OS entropy: seeded, the
    server would know it and could fit each uploaded row against it."""
    if STATE_KEY not in context.state:
        root, series = state_root(context), str(config.get(SERIES, ""))
        if root and series and RESUMED_FROM in config:
            discard_after(root, series, str(config[RESUMED_FROM]))
        saved = load_snapshot(root, series, up_to) if root and series else None
        if saved is not None:
            state = UserState.from_arrays(saved)
            steps = rounds_taken(root, series)
            if cfg.dp in ("local", "distributed") and steps is not None and len(steps) == len(state.step):
                # the cap counts every round this device ever uploaded, also in a timeline cut off by a crash
                state.step = torch.maximum(state.step, torch.as_tensor(steps, dtype=state.step.dtype))
        else:
            # --reproducible-noise keeps the seeded population matrix, as in non-private runs
            private = (cfg.dp != "none" or cfg.update_mode == "padded") and not cfg.reproducible_noise
            state = UserState.init(node.users, node.meta.population, node.hyper,
                                   private_rng("user-init") if private else None)
        _keep(context, state)
    record = context.state[STATE_KEY]
    return UserState.from_arrays({k: record[k].numpy() for k in record.keys()})


def save_state(context: Context, state: UserState, config, round_: int) -> None:
    """Keep the state for the rest of the run, and on the device's disk if it has one."""
    _keep(context, state)
    root, series = state_root(context), str(config.get(SERIES, ""))
    if root and series:
        save_snapshot(root, series, round_, state.arrays(), int(config.get(CHECKPOINT_ROUND, 0)))


def _keep(context: Context, state: UserState) -> None:
    context.state[STATE_KEY] = ArrayRecord({k: Array(v) for k, v in state.arrays().items()})
