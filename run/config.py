"""A run's settings: the parts owned by their layers, side by side in one flat object.

Each part declares its settings (a default, help, panel, allowed values) and validates itself: data
(datasets/config.py), model (models/config.py), privacy (privacy/config.py), server (server/config.py),
engine and output (simulations/config.py). `RunConfig` is all of them at once, because a setting keeps
one name from its flag (`--clipping-norm`) and its TOML key (`clipping-norm`) to its use
(`PrivacyConfig.clipping_norm`, `DevicePolicy.clipping_norm`, `clip(..., clipping_norm)`); it adds what
spans parts: the model `--model auto` runs, what an algorithm refuses, what a run would not use.
Sources, later ones winning: defaults, a TOML file, flags. Plain Python: no torch until a run resolves.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedrec.datasets.config import DataConfig
from fedrec.datasets.names import KNOWN_SIZES
from fedrec.models.config import ModelConfig
from fedrec.models.config import with_defaults as model_defaults
from fedrec.privacy.config import PrivacyConfig
from fedrec.server.config import ServerConfig
from fedrec.simulations.config import EngineConfig

from .setting import GROUPS as GROUPS  # the command line's help panels
from .setting import ConfigError as ConfigError
from .setting import check_values, coerce, kebab

PARTS = (DataConfig, ModelConfig, PrivacyConfig, ServerConfig, EngineConfig)


@dataclass(frozen=True)
class RunConfig(EngineConfig, ServerConfig, PrivacyConfig, ModelConfig, DataConfig):  # fields: data first
    """Every part's settings (see the module docstring); `part(P)` is the part P alone."""

    def part(self, kind: type):
        """The part `kind` (one of PARTS) with this run's values: what a layer, or a device, receives."""
        return kind(**{f.name: getattr(self, f.name) for f in fields(kind)})

    # ------------------------------------------------------------------ the model the run trains
    def asked(self) -> dict[str, str]:
        """The privacy mechanisms and the participation the run asks for, each with its flag."""
        from fedrec.models.registry import algorithm_class

        asked = self.part(PrivacyConfig).mechanisms()
        if self.model != "auto" and self.clipping_norm == algorithm_class(self.model).bounded_norm:
            asked.pop("clipping", None)  # the algorithm's own bound, filled in when resolved: not asked for
        if self.partial:
            asked["partial-participation"] = ("--users-per-round" if self.users_per_round else "--sampling poisson")
        return asked

    def resolved(self) -> RunConfig:
        """The algorithm --model auto picks, and the algorithm's own defaults where the run says -1."""
        name = self.auto_model() if self.model == "auto" else self.model
        resolved = dataclasses.replace(self, model=name, **model_defaults(self.part(ModelConfig), name, self.implicit))
        from fedrec.models.registry import algorithm_class

        # an algorithm of few releases of unequal weight runs exactly that many rounds (epochs centrally)
        cls = algorithm_class(name)
        weights = cls.release_weights(self.target_epsilon if self.dp != "none" else 0.0)
        if weights:
            resolved = dataclasses.replace(resolved, rounds=len(weights), epochs=len(weights))
        if cls.bounded_norm and self.clipping_norm == 0:  # its own bound: clipping then changes nothing
            resolved = dataclasses.replace(resolved, clipping_norm=cls.bounded_norm)
        return resolved

    def auto_model(self) -> str:
        from fedrec.models.registry import auto

        return auto(self.implicit, self.asked())[0]

    def model_reason(self) -> str:
        """Which model the run trains and why (the table, summary.json, comparison.md). True whether the model
        came from --model auto or by name, so it can be said of a resolved config too."""
        from fedrec.models.registry import AUTO_ORDER, auto

        chosen, passed_over = auto(self.implicit, self.asked())
        model = chosen if self.model == "auto" else self.model
        if model != chosen:
            return f"{model}, chosen with --model (--model auto would run {chosen} here)"
        if passed_over:
            return f"{model}, what --model auto runs here ({passed_over})"
        return f"{model}, what --model auto runs here (the first of {', '.join(AUTO_ORDER)} it tries)"

    # ------------------------------------------------------------------ validation
    def validate(self) -> RunConfig:
        self.check_values()
        # an algorithm that bounds its own statistics fills in --clipping-norm (resolved): check with its C
        checked = dataclasses.replace(self, clipping_norm=self.resolved().clipping_norm)
        for kind in PARTS:  # each part on its own, then what spans parts
            getattr(kind, f"check_{kind.__name__.removesuffix('Config').lower()}")(checked)
        if self.dp == "central" and self.accountant == "pld" and self.sampling == "fixed" and self.partial:
            raise ConfigError("--accountant pld does not support fixed-size sampling (replace-one); "
                              "use --sampling poisson or --accountant rdp")
        self._check_refusals()
        _check_memory(self)
        return self

    def check_values(self) -> None:
        """Each value on its own: its type, finite, one of its choices."""
        check_values(self)

    def _check_refusals(self) -> None:
        """What the algorithm's statistics do not admit, in its own words (models/<algorithm>.py: refuses)."""
        from fedrec.models.registry import ALGORITHMS, algorithm_class

        name = self.resolved().model
        cls = algorithm_class(name)
        if self.implicit and not cls.implicit_feedback:
            others = ", ".join(n for n, c in ALGORITHMS.items() if c.implicit_feedback)
            raise ConfigError(f"--model {name} models ratings; for --split loo use --model {others}")
        if not self.implicit and not cls.rating_feedback:
            others = ", ".join(n for n, c in ALGORITHMS.items() if c.rating_feedback)
            raise ConfigError(f"--model {name} models implicit feedback only; use --split loo, or for ratings "
                              f"--model {others}")
        for mechanism, flag in self.asked().items():
            if mechanism in cls.refuses:
                raise ConfigError(f"--model {name} refuses {flag}: {cls.refuses[mechanism]}")
        if cls.bounded_norm and self.clipping_norm not in (0.0, cls.bounded_norm):
            raise ConfigError(f"--model {name} bounds each user's statistics at norm {cls.bounded_norm:g} itself; "
                              f"leave --clipping-norm unset (or {cls.bounded_norm:g})")

    # ------------------------------------------------------------------ reading and writing
    @classmethod
    def from_mapping(cls, values: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
        """Build from kebab- or snake-case keys; unknown keys and wrong types are errors."""
        base = base or cls()
        known = {f.name for f in fields(cls)}
        changes = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown setting {key!r}; docs/settings.md lists them")
            changes[name] = coerce(key, value, type(getattr(base, name)))
        return dataclasses.replace(base, **changes)

    @classmethod
    def from_toml(cls, path: str | Path, base: RunConfig | None = None) -> RunConfig:
        """Flat keys (what `flwr run --run-config FILE` reads too), or nested under [tool.flwr.app.config]."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read config file {path}: {error}") from None
        # flat (what fedrec writes, and flwr run --run-config reads), or an older run's [tool.flwr.app.config]
        table = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)
        return cls.from_mapping(table, base)

    def to_dict(self, kebab_case: bool = True) -> dict[str, Any]:
        return {(kebab(f.name) if kebab_case else f.name): getattr(self, f.name) for f in fields(self)}


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(cfg: RunConfig) -> None:
    """Refuse a run whose data and model alone (a floor: training needs more) exceed this machine's memory."""
    if cfg.dataset == "synthetic":
        users, items = cfg.synthetic_users, cfg.synthetic_items
        ratings = min(users * items, max(users * items * cfg.synthetic_density, 5 * users))
        data, lower = ratings * 40 + (users + items) * cfg.synthetic_rank * 12, \
            "--synthetic-users, --synthetic-items or --synthetic-density"
        what = f"synthetic data of {users:,} users x {items:,} items"
    else:
        users, items, ratings = KNOWN_SIZES[cfg.dataset]
        data, lower, what = ratings * 40, "nothing: use a smaller data set", cfg.dataset
    needs = {lower: data, "--dim": (users + items) * cfg.resolved().dim * 4 * 2,
             "--negatives": users * cfg.negatives * 8 if cfg.implicit else 0}
    total, memory = sum(needs.values()), _physical_memory()
    if memory and total > memory:
        largest = max(needs, key=needs.get)
        raise ConfigError(f"{what} with these settings needs at least {total / 2**30:,.1f} GB of memory and "
                          f"this machine has {memory / 2**30:.1f} GB; lower {largest}")


# What each kind of run reads: a setting outside it would be silently ignored, so it is refused (flags)
# or reset (config files, whose other settings still apply).
DATA_SETTINGS = frozenset(f.name for f in fields(DataConfig))
CENTRAL_SETTINGS = DATA_SETTINGS | {f.name for f in fields(ModelConfig)} | {
    "server_lr", "strategy", "epochs", "eval_every", "top_k", "out"}
ALGORITHM_SETTINGS = frozenset({f.name for f in fields(ModelConfig)} - {"model"} | {"strategy", "server_lr"})
"""Settings some algorithms read and others do not (each declares which: Algorithm.settings_read)."""


def moot_settings(cfg: RunConfig) -> dict[str, tuple[str, bool]]:
    """Per setting that another one can make moot: (that switch, whether it does in `cfg`)."""
    no_dp, pad, loo = cfg.dp == "none", cfg.update_mode == "padded", cfg.split == "loo"
    moot = {"noise_multiplier": ("dp", no_dp), "target_epsilon": ("dp", no_dp), "target_delta": ("dp", no_dp),
            "accountant": ("dp", no_dp), "max_rounds_per_user": ("dp", cfg.dp not in ("local", "distributed")),
            "reproducible_noise": ("dp", not cfg.guards_uploads),  # nothing private left to repeat
            "pad_ratio": ("update_mode", not pad),
            "robust_bound": ("robust_aggregation", cfg.robust_aggregation == "none"),
            "test_fraction": ("split", cfg.split != "random" and (loo or not cfg.validation)),  # validation: its share
            "negatives": ("split", not loo), "train_negatives": ("split", not loo),
            "data_dir": ("dataset", cfg.dataset == "synthetic"),
            **{name: ("split", not loo) for name in ("recency_items", "recency_decay", "recency_weight")}}
    from fedrec.models.registry import algorithm_class

    reads = algorithm_class(cfg.resolved().model).settings_read
    for name in ALGORITHM_SETTINGS:
        if not moot.get(name, ("", False))[1]:
            moot[name] = ("model", name not in reads)
    for f in fields(cfg):
        if f.name.startswith("secagg_"):
            moot[f.name] = ("secure_aggregation", cfg.secure_aggregation == "none")
        if f.name.startswith("synthetic_"):
            moot[f.name] = ("dataset", cfg.dataset != "synthetic")
    return moot


def applies(cfg: RunConfig, name: str) -> bool:
    """Does setting `name` act in a run with `cfg` (no other setting makes it moot)?"""
    return not moot_settings(cfg).get(name, ("", False))[1]


def ignored_settings(cfg: RunConfig, reads: frozenset | None = None) -> dict[str, str]:
    """Settings changed from their default that a run would not use, each with why: "outside" the
    settings its command reads (`reads`; None: all), or "with --<switch> <value>" that makes it moot."""
    moot = moot_settings(cfg)
    default, out = RunConfig(), {}
    for f in fields(cfg):
        if getattr(cfg, f.name) == getattr(default, f.name):
            continue
        switch, is_moot = moot.get(f.name, ("", False))
        if reads is not None and f.name not in reads:
            out[f.name] = "outside"
        elif is_moot and switch == "model":
            model = cfg.resolved().model
            auto = " (what --model auto runs here)" if cfg.model == "auto" else ""
            out[f.name] = f"with --model {model}{auto}; choose a model that reads it to use it"
        elif is_moot:
            out[f.name] = f"with --{kebab(switch)} {getattr(cfg, switch)}"
    return out


def with_defaults(cfg: RunConfig, names: list[str]) -> RunConfig:
    return dataclasses.replace(cfg, **{n: getattr(RunConfig(), n) for n in names})
