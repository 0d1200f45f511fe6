"""The one config object: every source agrees with it."""

from __future__ import annotations

import tomllib
from dataclasses import fields

import pytest

from pathlib import Path

from fedrec.common.config import ConfigError, RunConfig

REPO = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_setting_with_its_default():
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(table) == {f.name.replace("_", "-") for f in fields(RunConfig)}  # flwr run rejects unknown keys
    assert RunConfig.from_mapping(table) == RunConfig()


def test_every_field_is_documented():
    assert all(f.metadata.get("help") for f in fields(RunConfig))


def test_unknown_keys_and_wrong_types_are_errors():
    with pytest.raises(ConfigError, match="unknown setting 'roundz'"):
        RunConfig.from_mapping({"roundz": 3})
    with pytest.raises(ConfigError, match="rounds=2.5 is not a valid int"):
        RunConfig.from_mapping({"rounds": 2.5})
    assert RunConfig.from_mapping({"users-per-round": "7"}).users_per_round == 7
