"""The one config object: every source agrees with it."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from fedrec.run.config import CENTRAL_SETTINGS, ConfigError, RunConfig, ignored_settings
from fedrec.run.rundir import make_run_dir, remove_if_empty, write_config

REPO = Path(__file__).resolve().parents[2]


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


def test_bools_are_not_numbers_and_numbers_are_not_bools():
    for key, value in (("rounds", True), ("lr", False), ("reproducible-noise", 1), ("reproducible-noise", "yes"),
                       ("dataset", 5), ("rounds", float("inf")), ("lr", 10**400)):
        with pytest.raises(ConfigError, match=f"{key}=.* is not a valid"):
            RunConfig.from_mapping({key: value})
    cfg = RunConfig.from_mapping({"reproducible-noise": "True", "rounds": 1e3, "lr": 1, "seed": "7"})
    assert (cfg.reproducible_noise, cfg.rounds, cfg.lr, cfg.seed) == (True, 1000, 1.0, 7)
    with pytest.raises(ConfigError, match="rounds=True is not a valid int"):
        RunConfig(rounds=True).validate()  # the Python API is checked too


@pytest.mark.parametrize("name", [f.name for f in fields(RunConfig) if isinstance(f.default, float)])
def test_every_float_must_be_finite_and_the_message_names_it(name):
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ConfigError, match=f"^{name.replace('_', '-')} must be a finite number"):
            RunConfig(**{name: bad}).validate()


@pytest.mark.parametrize("settings,message", [
    ({"seed": -1}, "seed must be between 0 and 2\\*\\*63 - 1"),
    ({"seed": 2**63}, "seed must be between 0 and 2\\*\\*63 - 1"),
    ({"dim": 10**6}, "dim must be at most 8,192"),
    ({"synthetic_users": 10**10}, "synthetic-users must be at most"),
    ({"train_negatives": 10**5}, "train-negatives must be at most"),
    ({"synthetic_users": 50_000_000, "synthetic_items": 5_000_000},
     "needs at least .* GB of memory .* lower --synthetic"),
    ({"dataset": "ml-25m", "split": "loo", "negatives": 100_000},
     "ml-25m with these settings needs .* lower --negatives"),
    ({"reg_user": -0.5}, "reg-user must be >= 0, or -1 for the default"),
    ({"round_timeout": -1.0}, "round-timeout must be >= 0"),
    ({"min_reply_fraction": 1.01}, "min-reply-fraction must be in \\[0, 1\\]"),
    ({"dropout": 1.0}, "dropout must be in \\[0, 1\\)"),
    ({"robust_bound": 0.0}, "robust-bound must be > 0"),
    ({"checkpoint_every": -1}, "checkpoint-every must be >= 0"),
    ({"target_delta": 1.0}, "target-delta must be in \\(0, 1\\)"),
])
def test_out_of_range_settings_name_their_flag(settings, message, monkeypatch):
    monkeypatch.setattr("fedrec.run.config._physical_memory", lambda: 16 * 2**30)
    with pytest.raises(ConfigError, match=message):
        RunConfig(**settings).validate()


def test_ignored_settings_say_why():
    assert ignored_settings(RunConfig()) == {}
    cfg = RunConfig(target_epsilon=8.0, pad_ratio=2.0, synthetic_users=10, dataset="ml-100k", rounds=5, dp="none")
    assert ignored_settings(cfg) == {"synthetic_users": "with --dataset ml-100k", "target_epsilon": "with --dp none",
                                     "pad_ratio": "with --update-mode dense"}
    assert ignored_settings(cfg, CENTRAL_SETTINGS)["rounds"] == "outside"
    assert ignored_settings(RunConfig(dp="central", target_epsilon=8.0, clipping_norm=0.1)) == {}


def test_saved_config_has_no_out_and_an_absolute_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(dataset="ml-100k", data_dir="data", out="runs/x", resume="runs/y", dim=8)
    write_config(tmp_path, cfg)
    text = (tmp_path / "config.toml").read_text()
    assert "\nout =" not in text and "\nresume =" not in text
    again = RunConfig.from_toml(tmp_path / "config.toml")
    assert again == dataclasses.replace(cfg.resolved(), data_dir=str(tmp_path / "data"), out="", resume="")
    write_config(tmp_path, RunConfig())
    assert RunConfig.from_toml(tmp_path / "config.toml").data_dir == ""  # empty stays empty: $FEDREC_DATA_DIR


def test_run_dir_is_checked_created_and_never_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = make_run_dir(RunConfig(), "central"), make_run_dir(RunConfig(), "central")
    assert first != second and first.parent == second.parent == tmp_path / "runs"  # same second, two directories
    run = make_run_dir(RunConfig(out="a/b"), "federated")
    assert run == tmp_path / "a" / "b" and list(run.iterdir()) == []  # the write probe is gone
    assert make_run_dir(RunConfig(out="a/b"), "federated") == run  # still empty: the runner may check again
    (run / "metrics.csv").write_text("round\n")
    with pytest.raises(ConfigError, match="already holds a run \\(metrics.csv\\); choose a new directory"):
        make_run_dir(RunConfig(out="a/b"), "federated")
    assert make_run_dir(RunConfig(resume="a/b"), "federated") == run  # except to continue it
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="--out f/run cannot be written"):
        make_run_dir(RunConfig(out="f/run"), "central")
    remove_if_empty(make_run_dir(RunConfig(out="x/y/z"), "central"), keep=tmp_path)
    assert not (tmp_path / "x").exists()


def test_the_settings_page_is_the_config_parts():
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    page = runpy.run_path(str(root / "scripts" / "settings_table.py"))["settings_table"]()
    assert (root / "docs" / "settings.md").read_text() == page, \
        "stale docs/settings.md: python scripts/settings_table.py > docs/settings.md"
    for part in ("DataConfig", "ModelConfig", "PrivacyConfig", "ServerConfig", "EngineConfig"):
        assert f"## {part} (" in page


def test_saved_config_is_flat_for_flwr_run_and_nested_files_still_load(tmp_path):
    from flwr.common.config import parse_config_args

    cfg = RunConfig(dataset="synthetic", dim=8, rounds=7, target_delta=1e-6)
    write_config(tmp_path, cfg)
    seen = parse_config_args([str(tmp_path / "config.toml")])  # what `flwr run --run-config FILE` submits
    assert set(seen) == {f.name.replace("_", "-") for f in fields(RunConfig)} - {"out", "resume"}
    assert RunConfig.from_mapping(seen) == cfg.resolved()
    (tmp_path / "old.toml").write_text("# a run directory written before\n[tool.flwr.app.config]\ndim = 4\n")
    assert RunConfig.from_toml(tmp_path / "old.toml").dim == 4
    assert parse_config_args([str(tmp_path / "old.toml")]) == {"tool.flwr.app.config.dim": 4}  # why it is flat now
