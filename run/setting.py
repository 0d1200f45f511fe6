"""How a setting is declared, once for every part of the run's config (datasets/config.py, models/config.py,
privacy/config.py, server/config.py, simulations/config.py): a default, its help, its help panel, its
allowed values. Plain Python, no fedrec imports: every layer may declare its part with it, and the
command line reads its options from the declarations without loading numpy or torch."""

from __future__ import annotations

import math
import numbers
from dataclasses import field, fields
from typing import Any


class ConfigError(ValueError):
    """A bad setting; the message says which and what to do."""


# Each setting's help panel on the command line.
GROUPS = ("Data", "Synthetic data", "Model", "Training", "Privacy", "Reliability", "Engine", "Output")


def setting(group: str, default: Any, help: str, choices: tuple | None = None, internal: bool = False) -> Any:
    """A setting's field: `internal` ones are set by fedrec itself (e.g. in the settings tune writes) and
    left out of --help."""
    assert group in GROUPS
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "internal": internal})


def kebab(name: str) -> str:
    return name.replace("_", "-")


def check_values(part) -> None:
    """Each value of a part on its own: its type, finite, one of its choices."""
    for f in fields(part):
        value = getattr(part, f.name)
        if not is_kind(value, type(f.default)):  # e.g. rounds=True: a bool is not a count
            raise ConfigError(f"{kebab(f.name)}={value!r} is not a valid {type(f.default).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{kebab(f.name)} must be a finite number (got {value})")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{kebab(f.name)}={value!r} is not valid; choose one of {', '.join(choices)}")


def check_signs(part, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    for name in positive:
        if getattr(part, name) <= 0:
            raise ConfigError(f"{kebab(name)} must be > 0 (got {getattr(part, name)})")
    for name in non_negative:
        if getattr(part, name) < 0:
            raise ConfigError(f"{kebab(name)} must be >= 0 (got {getattr(part, name)})")


def check_limits(part, limits: dict[str, float]) -> None:
    """Upper bounds no real run reaches; beyond them a run would exhaust memory or time before failing."""
    for name, most in limits.items():
        if getattr(part, name) > most:
            raise ConfigError(f"{kebab(name)} must be at most {most:,} (got {getattr(part, name):,}); "
                              "a larger value would exhaust memory or time long before it helps")


def is_kind(value: Any, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):
        return isinstance(value, bool) and kind is bool
    if kind is int:
        return isinstance(value, numbers.Integral)
    return isinstance(value, numbers.Real if kind is float else kind)


def coerce(key: str, value: Any, kind: type) -> Any:
    """A TOML or flag value as the field's type; never a bool as a number, nor a number as a bool."""
    bad = ConfigError(f"{key}={value!r} is not a valid {kind.__name__}")
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text not in ("true", "false"):
                raise bad
            return text == "true"
        try:
            value = int(text) if kind is int else float(text)
        except ValueError:
            raise bad from None
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # 1e3 in a TOML file is a whole number
    if not is_kind(value, kind):
        raise bad
    try:
        return kind(value)
    except OverflowError:  # an int too large for a float
        raise bad from None
