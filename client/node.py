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
from fedrec.models.algorithm import Algorithm, UserState
from fedrec.privacy.device import ROUNDS, new_users
from fedrec.privacy.policy import DevicePolicy
from fedrec.run.build import SHARDS_ENV, data_key, ensure_shards, make_algorithm
from fedrec.run.device_config import DeviceConfig
from fedrec.run.schema import CHECKPOINT_ROUND, RESUMED_FROM, SERIES, STATE_KEY

from .storage import (
    claim,
    discard_after,
    load,
    rounds_taken,
    save_base,
    save_delta,
    series_dir,
    start_steps,
    state_root,
)


@dataclass(frozen=True)
class NodeData:
    shard: Shard  # this node's users and their rows, memory-mapped
    algorithm: Algorithm

    @property
    def users(self) -> np.ndarray:  # global ids of the users this node hosts
        return self.shard.users

    @property
    def meta(self) -> ShardMeta:
        return self.shard.meta


def node_data(device: DeviceConfig, context: Context) -> NodeData:
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
            shard_set = ensure_shards(dataclasses.replace(device.data, data_dir=data_dir), num_partitions)
        path = shard_set / node_name(partition_id)
    shard = _open(str(path), data_key(device.data))
    return NodeData(shard, make_algorithm(device.model, shard.meta.n_items, shard.meta.rating_scale))


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


_HELD: dict[str, tuple[int, str, dict]] = {}
"""Per device directory, the state this process last loaded or saved (round, journal entry,
arrays): a simulated node that trains again in the same worker reads only the new deltas."""
_HOLD_AT_MOST = 4


def load_state(context: Context, node: NodeData, policy: DevicePolicy, config, up_to: int) -> UserState:
    """The node's users' private state as of round `up_to`: from the device's own disk (base
    and journal, see storage.py) if it has one, else from context.state, else new. Where
    privacy is on, a user's starting vector is drawn from OS entropy: seeded, the server
    would know it and could fit each uploaded row against it."""
    root, series = state_root(context), str(config.get(SERIES, ""))
    if not (root and series):
        if STATE_KEY not in context.state:
            _keep(context, _new_state(node, policy))
        record = context.state[STATE_KEY]
        return {k: torch.as_tensor(record[k].numpy()) for k in record.keys()}
    directory = series_dir(root, series)
    claim(directory, {"first_user": node.meta.first_user, "num_users": node.meta.num_users})
    if RESUMED_FROM in config:
        discard_after(root, series, str(config[RESUMED_FROM]))
    held = _HELD.pop(str(directory), None)
    loaded = load(directory, up_to, held)
    if loaded is None:  # a device's first round in this series
        arrays = {k: v.numpy() for k, v in _new_state(node, policy).items()}
        start_steps(directory, arrays[ROUNDS])  # before the base: a crash in between cannot lose the cap
        loaded = (0, save_base(directory, 0, arrays), arrays)
    steps = rounds_taken(directory)
    if steps is None:
        start_steps(directory, loaded[2][ROUNDS])
    elif policy.caps_rounds and len(steps) == len(loaded[2][ROUNDS]):
        # the cap counts every round this device ever uploaded, also in a timeline cut off by a crash
        np.maximum(loaded[2][ROUNDS], steps.astype(loaded[2][ROUNDS].dtype), out=loaded[2][ROUNDS])
    _hold(directory, loaded)
    return {k: torch.from_numpy(v) for k, v in loaded[2].items()}  # shares memory with what is held


def save_state(context: Context, state: UserState, config, round_: int, positions: np.ndarray,
               keep_bases: bool = False) -> None:
    """Record the state after `round_`, in which the users at `positions` trained: on the
    device's disk (their rows only) if it has one, else in context.state for the run.
    keep_bases: the run keeps its checkpoints, so the device keeps its state at each one."""
    root, series = state_root(context), str(config.get(SERIES, ""))
    if not (root and series):
        _keep(context, state)
        return
    directory = series_dir(root, series)
    held = _HELD.pop(str(directory), None)  # dropped if the write fails: the disk is the truth
    index = torch.as_tensor(positions)
    rows = {k: v[index].numpy() for k, v in state.items()}
    name = save_delta(directory, round_, positions, rows, int(config.get(CHECKPOINT_ROUND, 0)), keep_bases)
    _hold(directory, (round_, name, {k: v.numpy() for k, v in state.items()} if held is None else held[2]))


def _hold(directory: Path, entry: tuple[int, str, dict]) -> None:
    _HELD[str(directory)] = entry
    while len(_HELD) > _HOLD_AT_MOST:
        _HELD.pop(next(iter(_HELD)))


def _new_state(node: NodeData, policy: DevicePolicy) -> UserState:
    # private starting vectors where the run claims anything against the server (the policy says)
    return new_users(node.algorithm, node.users, node.meta.population, policy)


def _keep(context: Context, state: UserState) -> None:
    context.state[STATE_KEY] = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})
