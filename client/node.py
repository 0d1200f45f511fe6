"""What a node holds: its users' data (cached per process) and their private state."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context

from fedrec.datasets import CohortData, Split, cohort
from fedrec.models import Hyper, UserState
from fedrec.models.randomness import private_rng
from fedrec.run.build import hyper, load_data, node_users
from fedrec.run.config import RunConfig
from fedrec.run.schema import CHECKPOINT_ROUND, RESUMED_FROM, SERIES, STATE_KEY

from .storage import discard_after, load_snapshot, rounds_taken, save_snapshot, state_root


@dataclass(frozen=True)
class NodeData:
    split: Split
    users: np.ndarray  # global ids of the users this node hosts
    rows: CohortData  # their train and test rows
    hyper: Hyper


def node_data(cfg: RunConfig, context: Context) -> NodeData:
    """This node's data, read from where the node's own config says (never a path the server
    sent): node config `data-dir`, else $FEDREC_DATA_DIR, else ~/.cache/fedrec."""
    data_dir = str(context.node_config.get("data-dir", ""))
    return _load(dataclasses.replace(cfg, data_dir=data_dir, out="", resume=""), *partition(context))


@functools.lru_cache(maxsize=8)
def _load(cfg: RunConfig, partition_id: int, num_partitions: int) -> NodeData:
    """Load once per process: simulated nodes share a worker process and its cache."""
    split = load_data(cfg)
    users = node_users(split.n_users, partition_id, num_partitions)
    return NodeData(split, users, cohort(split, users), hyper(cfg))


def partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError:
        raise ValueError("this SuperNode has no partition-id/num-partitions in its node config; start it with "
                         "--node-config 'partition-id=U num-partitions=N'") from None


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
            state = UserState.init(node.users, node.split.n_users, node.hyper,
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
