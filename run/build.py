"""From a RunConfig to the objects it describes (data split, model hyper-parameters)."""

from __future__ import annotations

import numpy as np

from fedrec.datasets import Split, SyntheticSpec, load_split
from fedrec.models import Hyper
from fedrec.models.device import DevicePolicy

from .config import RunConfig


def synthetic_spec(cfg: RunConfig) -> SyntheticSpec:
    return SyntheticSpec(users=cfg.synthetic_users, items=cfg.synthetic_items, density=cfg.synthetic_density,
                         rank=cfg.synthetic_rank, noise=cfg.synthetic_noise, seed=cfg.seed)


def load_data(cfg: RunConfig) -> Split:
    return load_split(cfg.dataset, cfg.split, cfg.data_dir or None, cfg.seed,
                      synthetic_spec(cfg) if cfg.dataset == "synthetic" else None,
                      cfg.test_fraction, cfg.negatives)


def hyper(cfg: RunConfig) -> Hyper:
    cfg = cfg.resolved()
    return Hyper(dim=cfg.dim, reg_user=cfg.reg_user, reg_item=cfg.reg_item, reg_bias=cfg.reg_bias, lr=cfg.lr,
                 local_epochs=cfg.local_epochs, implicit=cfg.implicit, train_negatives=cfg.train_negatives,
                 init_std=cfg.init_std, seed=cfg.seed)


def device_policy(cfg: RunConfig, noise_share: float = 0.0) -> DevicePolicy:
    """What each device applies to its users' updates; cfg carries the server's calibrated
    z and participation cap (fedrec.server.app.privacy_plan), `noise_share` the
    distributed-DP share the server sized for the round's least accepted survivors."""
    local = cfg.dp == "local"
    noise = cfg.noise_multiplier * cfg.clipping_norm if local else (noise_share if cfg.dp == "distributed" else 0.0)
    return DevicePolicy(update_mode=cfg.update_mode, pad_ratio=cfg.pad_ratio, clip_norm=cfg.clipping_norm,
                        noise_std=noise,
                        max_rounds=cfg.max_rounds_per_user if cfg.dp in ("local", "distributed") else 0,
                        reproducible_seed=cfg.seed if cfg.reproducible_noise else None)


def node_users(population: int, partition_id: int, num_partitions: int) -> np.ndarray:
    """Users hosted by node `partition_id` of `num_partitions`: a contiguous share."""
    bounds = np.linspace(0, population, num_partitions + 1).round().astype(np.int64)
    return np.arange(bounds[partition_id], bounds[partition_id + 1])


def num_nodes(cfg: RunConfig, population: int) -> int:
    """SuperNodes for a simulation: users-per-node users each (auto: 2 nodes, one per core,
    since a node trains its users vectorized and each message costs ~25 ms of engine time)."""
    per_node = cfg.users_per_node or -(-population // 2)
    return max(1, -(-population // per_node))
