"""What a node holds: its users' data (cached per process) and their private state."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Context

from fedrec.common.build import hyper, load_data, node_users
from fedrec.common.config import RunConfig
from fedrec.common.schema import STATE_KEY
from fedrec.datasets import CohortData, Split, cohort
from fedrec.models import Hyper, UserState
from fedrec.models.randomness import private_rng


@dataclass(frozen=True)
class NodeData:
    split: Split
    users: np.ndarray  # global ids of the users this node hosts
    rows: CohortData  # their train and test rows
    hyper: Hyper


@functools.lru_cache(maxsize=8)
def node_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> NodeData:
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


def load_state(context: Context, node: NodeData, cfg: RunConfig) -> UserState:
    """The node's users' private state, created (and kept) on first use; lives only in
    context.state. Where privacy is on, a user's starting vector is drawn from OS entropy:
    seeded, the server would know it and could fit each uploaded row against it."""
    if STATE_KEY not in context.state:
        # --reproducible-noise keeps the seeded population matrix, as in non-private runs
        private = (cfg.dp != "none" or cfg.update_mode == "padded") and not cfg.reproducible_noise
        save_state(context, UserState.init(node.users, node.split.n_users, node.hyper,
                                           private_rng("user-init") if private else None))
    record = context.state[STATE_KEY]
    return UserState.from_arrays({k: record[k].numpy() for k in record.keys()})


def save_state(context: Context, state: UserState) -> None:
    context.state[STATE_KEY] = ArrayRecord({k: Array(v) for k, v in state.arrays().items()})
