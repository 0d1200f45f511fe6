"""From a RunConfig (or its data part) to the objects it describes: the data split and its shards, the model's
hyper-parameters, the algorithm."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedrec.datasets import DataError, Split, SyntheticSpec, load_split
from fedrec.datasets.catalog import synthetic_split
from fedrec.datasets.config import DataConfig
from fedrec.datasets.download import dataset_folder
from fedrec.datasets.movielens import FORMATS
from fedrec.datasets.partition import cohort
from fedrec.datasets.shards import SHARD_FORMAT, node_name, open_shard, write_shards
from fedrec.datasets.splits import validation_split, with_validation_item
from fedrec.datasets.synthetic import stream_seed
from fedrec.models.algorithm import Algorithm
from fedrec.models.defaults import Hyper
from fedrec.models.registry import algorithm_class

from .config import ConfigError, RunConfig


def synthetic_spec(cfg: DataConfig) -> SyntheticSpec:
    return SyntheticSpec(users=cfg.synthetic_users, items=cfg.synthetic_items, density=cfg.synthetic_density,
                         rank=cfg.synthetic_rank, noise=cfg.synthetic_noise, seed=cfg.seed)


def load_data(cfg: DataConfig) -> Split:
    """The run's split; with cfg.validation, a validation split cut from its training rows alone
    (what the central trainer and, through ensure_shards, every device then train and score on); with
    cfg.validation_item, the split with a validation item per user held out beside its test item."""
    split = load_split(cfg.dataset, cfg.split, cfg.data_dir or None, cfg.seed,
                       synthetic_spec(cfg) if cfg.dataset == "synthetic" else None,
                       cfg.test_fraction, cfg.negatives)
    if cfg.validation_item:
        return with_validation_item(split, cfg.negatives, stream_seed(cfg.seed, "validation"))
    if not cfg.validation:
        return split
    return validation_split(split, cfg.test_fraction, cfg.negatives, stream_seed(cfg.seed, "validation"))


def hyper(cfg: RunConfig) -> Hyper:
    cfg = cfg.resolved()
    return Hyper(model=cfg.model, dim=cfg.dim, reg_user=cfg.reg_user, reg_item=cfg.reg_item, reg_bias=cfg.reg_bias,
                 lr=cfg.lr, local_epochs=cfg.local_epochs, implicit=cfg.implicit, train_negatives=cfg.train_negatives,
                 init_std=cfg.init_std, seed=cfg.seed, recency_items=cfg.recency_items,
                 recency_decay=cfg.recency_decay, recency_weight=cfg.recency_weight, bpmf_alpha=cfg.bpmf_alpha,
                 burn_in=burn_in(cfg.burn_in, cfg.rounds), epsilon=cfg.target_epsilon if cfg.dp != "none" else 0.0,
                 local_batch=cfg.local_batch, item_lr_scale=cfg.item_lr_scale, recon_fraction=cfg.recon_fraction,
                 confidence=cfg.confidence, heldout_not_negative=cfg.heldout_not_negative)


def burn_in(setting: int, steps: int) -> int:
    """BPMF draws kept out of the averaged model: the setting, but at most half of the run's rounds
    (epochs): a run shorter than its burn-in would serve its last, unaveraged draw (a 10-round run with
    the default 20 scored every item 5.00). summary.json says when it was cut."""
    return min(setting, steps // 2)


def make_algorithm(settings: RunConfig | Hyper, n_items: int, rating_scale: tuple[float, float]) -> Algorithm:
    """The run's algorithm (a run's model settings, or a device's resolved ones) for a catalogue of
    `n_items` rated on `rating_scale`."""
    model = settings if isinstance(settings, Hyper) else hyper(settings)
    return algorithm_class(model.model)(model, n_items, rating_scale)


def num_nodes(cfg: RunConfig, population: int) -> int:
    """SuperNodes for a simulation: users-per-node users each (auto: 2 nodes, one per core,
    since a node trains its users vectorized and each message costs ~25 ms of engine time)."""
    per_node = cfg.users_per_node or -(-population // 2)
    return max(1, -(-population // per_node))


SHARDS_ENV = "FEDREC_SHARDS"
"""The shard set a simulation driver built for its nodes (set in the engine workers' environment)."""


def data_key(cfg: DataConfig) -> str:
    """What data and split a run trains on: a node checks its shard was cut for the same."""
    fields = {"dataset": cfg.dataset, "split": cfg.split, "seed": cfg.seed}
    if cfg.split == "random":
        fields["test_fraction"] = cfg.test_fraction
    if cfg.split == "loo":
        fields["negatives"] = cfg.negatives
    if cfg.dataset == "synthetic":
        fields["synthetic"] = synthetic_spec(cfg).__dict__
    if cfg.validation:  # only when set: the keys (and cached shards) of test runs stay as they were
        fields["validation"] = "loo" if cfg.implicit else cfg.test_fraction
    if cfg.validation_item:
        fields["validation_item"] = True
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def population(cfg: DataConfig) -> int:
    """Number of users, without splitting (synthetic: the setting; MovieLens: its user ids)."""
    if cfg.dataset == "synthetic":
        return cfg.synthetic_users
    return load_data(cfg).n_users


def shard_set_dir(cfg: DataConfig, num_partitions: int) -> Path:
    """Where the shard set for this data, split and node count is cached: $FEDREC_SHARD_CACHE,
    else ~/.cache/fedrec/shards (never inside a data directory, which may be read-only or
    shared). The name also covers the source files (folder, size, time), so a
    changed or different copy of a data set never reuses another's shards."""
    source = ""
    if cfg.dataset != "synthetic":
        ratings = dataset_folder(cfg.dataset, cfg.data_dir or None) / FORMATS[cfg.dataset].ratings_file
        stat = ratings.resolve().stat()
        source = f"{ratings.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(f"{SHARD_FORMAT}|{data_key(cfg)}|{source}|{num_partitions}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("FEDREC_SHARD_CACHE") or Path.home() / ".cache" / "fedrec" / "shards")
    return root.expanduser() / f"{cfg.dataset}-{cfg.split}-{num_partitions}n-{digest}"


def ensure_shards(cfg: DataConfig, num_partitions: int, out: str | Path | None = None,
                  progress: Callable[[int], None] | None = None) -> Path:
    """The shard set of `num_partitions` contiguous user shares, written on first use."""
    root = Path(out) if out else shard_set_dir(cfg, num_partitions)
    if (root / "items.json").is_file():
        first = open_shard(root / node_name(0)).meta
        if first.data_key != data_key(cfg) or first.num_partitions != num_partitions:
            raise DataError(f"{root} holds {first.num_partitions} shards of other data or another split; "
                            "choose another directory")
        return root
    users = population(cfg)
    if num_partitions < 1 or num_partitions > users:
        raise ConfigError(f"cannot cut {users} users into {num_partitions} shards; use 1..{users}")
    bounds = np.linspace(0, users, num_partitions + 1).round().astype(np.int64)
    common = dict(population=users, data_key=data_key(cfg), progress=progress)
    if cfg.dataset == "synthetic" and not (cfg.validation or cfg.validation_item):  # cut from everyone's train rows
        spec = synthetic_spec(cfg)

        def rows_of(lo: int, hi: int):
            part = synthetic_split(spec, cfg.split, cfg.seed, cfg.test_fraction, cfg.negatives, lo, hi)
            return cohort(part, np.arange(lo, hi))

        return write_shards(root, bounds, rows_of, n_items=cfg.synthetic_items, rating_scale=(1.0, 5.0),
                            implicit=cfg.split == "loo", item_ids=np.arange(cfg.synthetic_items), titles=None,
                            **common)
    split = load_data(cfg)
    try:
        return write_shards(root, bounds, lambda lo, hi: cohort(split, np.arange(lo, hi)), n_items=split.n_items,
                            rating_scale=split.rating_scale, implicit=split.implicit, item_ids=split.item_ids,
                            titles=split.item_titles, **common)
    finally:
        load_split.cache_clear()  # a process that partitions does not keep the whole data set
