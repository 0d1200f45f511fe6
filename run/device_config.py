"""What a device receives from the server: its part of the run's config, and nothing else.

The data part without paths (which public data set and split: a node cuts its shard from its own
copy, or checks the shard it was given was cut for this run), the model it trains (resolved:
the algorithm `--model auto` chose, its defaults filled in), what it applies to its users' statistics
(the privacy pipeline's device policy, with the z the server calibrated), and the simulated failure
rate. Not the server's rounds or sampling, the accountant, SecAgg+'s parameters or the output paths.
Crosses the wire as one flat record: `data.split`, `model.dim`, `policy.clipping_norm`, ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from fedrec.datasets.config import DataConfig
from fedrec.models.defaults import Hyper
from fedrec.privacy.policy import DevicePolicy

from . import schema
from .build import hyper
from .config import ConfigError, RunConfig
from .setting import coerce


@dataclass(frozen=True)
class DeviceConfig:
    data: DataConfig = DataConfig()
    model: Hyper = Hyper()
    policy: DevicePolicy = DevicePolicy()
    top_k: int = 10  # K of the HR@K and NDCG@K the device scores its user with
    dropout: float = 0.0  # simulation: the probability that a sampled device fails in a round
    keep_checkpoints: bool = False  # keep the users' state at the server's checkpoints (what forget replays from)

    @classmethod
    def of(cls, cfg: RunConfig, noise_share: float = 0.0) -> DeviceConfig:
        """A validated run's device part: `cfg` with the z the server calibrated, `noise_share` the
        distributed-DP noise each user adds (sized by the server for the least survivors SecAgg+ accepts)."""
        data = dataclasses.replace(cfg.part(DataConfig), data_dir="")  # a node reads its own, never the server's
        return cls(data, hyper(cfg), cfg.device_policy(cfg.seed, noise_share), cfg.top_k, cfg.dropout,
                   cfg.keep_checkpoints)

    def record(self) -> dict[str, Any]:
        """Flat and typed for a ConfigRecord (None, the private default of a seed, is left out)."""
        flat: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                flat |= {f"{f.name}.{g.name}": getattr(value, g.name) for g in fields(value)
                         if getattr(value, g.name) is not None}
            else:
                flat[f.name] = value
        return flat

    @classmethod
    def from_record(cls, record, ignore: tuple[str, ...] = ()) -> DeviceConfig:
        """The inverse of `record`; keys in `ignore` (the round's own: fedrec.run.schema.ROUND_KEYS) are
        skipped, any other unknown key is an error (a server of another version)."""
        parts: dict[str, dict] = {f.name: {} for f in fields(cls) if dataclasses.is_dataclass(f.default)}
        top: dict[str, Any] = {}
        defaults = cls()
        for key, value in record.items():
            if key in ignore:
                continue
            part, _, name = key.rpartition(".")
            target = parts.get(part) if part else top
            default = getattr(getattr(defaults, part), name, _MISSING) if part in parts else \
                getattr(defaults, name, _MISSING)
            if target is None or default is _MISSING:
                raise ConfigError(f"unknown device setting {key!r} (is the server another fedrec version?)")
            target[name] = value if default is None else coerce(key, value, type(default))
        return cls(**{name: type(getattr(defaults, name))(**values) for name, values in parts.items()},
                   **top)


_MISSING = object()
NOISE_SHARE_KEY = "policy.noise_std"
"""The key of a device's noise share in its config record: a round of unequal weight overrides it."""


def round_config(cfg: RunConfig, round_: int, users, noise_share: float = 0.0) -> dict[str, Any]:
    """A train round's config for one node, as the server sends it: the device's part of the resolved,
    validated `cfg` and the round's keys (its number, the node's sampled users)."""
    return DeviceConfig.of(cfg, noise_share).record() | {schema.ROUND: round_, schema.USERS: [int(u) for u in users]}
