"""`fedrec tune` and `compare --tune`: settings chosen on a validation split of the training rows
(Optuna TPE, one budget per side), written to the run directory; the test rows are never used."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedrec.cli import main as cli_module
from fedrec.cli.main import cli
from fedrec.datasets import SyntheticSpec, generate
from fedrec.datasets.shards import node_name, open_shard
from fedrec.experiments.tune import BPMF_SPACE, SEARCH_SPACE, STEP, Budget, defaults, search, space_for, tune
from fedrec.run import build
from fedrec.run.build import SHARDS_ENV, ensure_shards, load_data, num_nodes
from fedrec.run.config import ConfigError, RunConfig
from fedrec.simulations.central import run_central

SMALL = ["--synthetic-users", "60", "--synthetic-items", "40", "--synthetic-density", "0.25"]
FAST = [*SMALL, "--epochs", "6", "--rounds", "6", "--eval-every", "3"]


def _cfg(tmp_path, **changes) -> RunConfig:
    return RunConfig(synthetic_users=60, synthetic_items=40, synthetic_density=0.25, epochs=6, rounds=6, eval_every=3,
                     out=str(tmp_path / "tune"), **changes)


def _rows(split, side: str) -> set:
    rows = getattr(split, side)
    return set(zip(rows.user.tolist(), rows.item.tolist()))


@pytest.mark.parametrize("split", ["random", "loo"])
def test_a_validation_split_is_cut_from_the_training_rows_alone_and_the_devices_hold_the_same(tmp_path, split):
    cfg = _cfg(tmp_path, split=split, negatives=10)
    real, val = load_data(cfg), load_data(dataclasses.replace(cfg, validation=True))
    assert _rows(val, "train") | _rows(val, "test") == _rows(real, "train")
    assert not _rows(val, "train") & _rows(val, "test") and not _rows(val, "test") & _rows(real, "test")
    if split == "loo":  # each user's latest training interaction is its validation positive
        latest = {u: real.train.timestamp[real.train.user == u].max() for u in np.unique(val.test.user)}
        assert all(t == latest[u] for u, t in zip(val.test.user, val.test.timestamp))
    nodes = 3
    shards = ensure_shards(dataclasses.replace(cfg, validation=True), nodes)
    opened = [open_shard(shards / node_name(p)) for p in range(nodes)]
    held = [shard.cohort(np.arange(shard.meta.num_users)) for shard in opened]
    device_test = {(int(c.users[s]), int(i)) for c in held for s, i in zip(c.test_segment, c.test_item)}
    assert device_test == _rows(val, "test")  # the devices score exactly the central trainer's validation rows
    assert build.data_key(cfg) != build.data_key(dataclasses.replace(cfg, validation=True))


def test_tune_writes_chosen_settings_and_every_trial_and_chooses_the_best_validation_trial(tmp_path):
    out = tmp_path / "tune"
    base = _cfg(tmp_path)  # --model auto: BPMF on these plain ratings, so tune searches BPMF's settings
    space = space_for(base)
    assert set(space) == set(BPMF_SPACE)
    result = CliRunner().invoke(cli, ["tune", *FAST, "--tune-trials", "3", "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "tune.json").read_text())
    frame = pd.read_csv(out / "trials.csv")
    assert report["budget"]["trials_per_side"] == 3 and "test rows are never used" in report["validation"]
    assert list(frame["side"]) == ["central"] * 3 + ["federated"] * 3 and len(report["trials"]) == 6
    assert (frame["state"] == "complete").all() and (frame["seconds"] > 0).all()
    for side in ("central", "federated"):
        trials = frame[frame["side"] == side]
        best = trials.loc[trials["val_rmse"].idxmin()]
        chosen = report["chosen"][side]
        assert set(space) | {STEP[side], "val_rmse"} <= set(chosen)
        assert chosen["trial"] == best["trial"] and chosen["val_rmse"] == pytest.approx(best["val_rmse"])
        assert chosen[STEP[side]] in (3, 6)  # the best evaluated step, at most the given maximum
        assert trials.iloc[0][list(space)].to_dict() == defaults(base)  # trial 0: the defaults
        assert trials["dim"].nunique() > 1 or trials["reg_user"].nunique() > 1  # TPE moved away from the defaults
    assert "chosen on validation" in result.output
    assert f"{report['chosen']['federated']['val_rmse']:.4g}" in result.output  # the chosen settings are printed
    assert report["config"]["validation"] is True
    for side in ("central", "federated"):  # each side's choice, ready for --config and scored on the test set
        saved = RunConfig.from_toml(out / f"{side}.toml")
        assert {n: getattr(saved, n) for n in space} == {n: report["chosen"][side][n] for n in space}
        assert getattr(saved, STEP[side]) == report["chosen"][side][STEP[side]] and saved.validation is False
    again = CliRunner().invoke(cli, ["central", "--config", str(out / "central.toml"), "--out", str(tmp_path / "c")])
    assert again.exit_code == 0, again.output


def test_the_space_follows_what_an_algorithm_reads_not_its_name(tmp_path, monkeypatch):
    from fedrec.models import registry
    from fedrec.models.bpmf import BPMF
    from fedrec.models.mf import MF

    class Twin(MF):  # reads what MF reads, under another name: one more choice in MF's space
        name = "twin"

    class Sampler(BPMF):  # reads what BPMF reads: BPMF's space, and the choice between the two
        name = "sampler"

    class Narrow(BPMF):  # reads neither space whole
        name = "narrow"
        settings_read = BPMF.settings_read - {"bpmf_alpha"}

    for cls in (Twin, Sampler, Narrow):
        monkeypatch.setitem(registry.ALGORITHMS, cls.name, cls)
    assert space_for(_cfg(tmp_path, model="twin")) == {**SEARCH_SPACE, "model": ("mf", "svdpp", "fedrecon", "twin")}
    assert space_for(_cfg(tmp_path, model="sampler")) == {**BPMF_SPACE, "model": ("bpmf", "sampler")}
    loo = space_for(_cfg(tmp_path, model="twin", split="loo"))
    assert loo["model"] == ("mf", "svdpp", "twin") and "recency_weight" in loo
    with pytest.raises(ConfigError, match="tune has no search space for --model narrow"):
        space_for(_cfg(tmp_path, model="narrow"))


def test_tpe_is_seeded_and_a_seconds_budget_still_runs_one_trial(tmp_path):
    cfg = _cfg(tmp_path, model="mf").resolved()  # the SGD models' space, where lr is searched
    history = lambda trial_cfg: [{"epoch": 1, "rmse": abs(math.log(trial_cfg.lr / 0.03))}]  # noqa: E731
    first, again = (search("central", cfg, Budget.of(6), history) for _ in range(2))
    assert [t["lr"] for t in first] == [t["lr"] for t in again]
    assert len(search("central", cfg, Budget.of(0, 1e-9), history)) == 1
    diverged = search("central", cfg, Budget.of(2), lambda c: [{"epoch": 1, "rmse": float("nan")}])
    assert [t["state"] for t in diverged] == ["failed", "failed"] and diverged[0]["val_rmse"] is None
    assert Budget.of() == Budget(60, 0.0) and Budget.of(0, 30) == Budget(0, 30)
    assert Budget(0, 30).allows(5, 29) and not Budget(0, 30).allows(5, 31) and not Budget(3, 30).allows(3, 1)


def test_the_recency_weight_is_searched_for_implicit_feedback_only(tmp_path):
    implicit, ratings = _cfg(tmp_path, split="loo", negatives=10).resolved(), _cfg(tmp_path).resolved()
    assert "recency_weight" in space_for(implicit) and "recency_weight" not in space_for(ratings)
    history = lambda trial_cfg: [{"epoch": 1, "hr@10": trial_cfg.recency_weight}]  # noqa: E731
    trials = search("central", implicit, Budget.of(8), history)
    assert trials[0]["recency_weight"] == RunConfig().recency_weight  # trial 0: the default
    assert len({t["recency_weight"] for t in trials}) > 1


def _poisoned(load_split):
    """load_split whose test rows are wrong: other items and mirrored ratings (and negatives)."""
    def load(*args, **kwargs):
        split = load_split(*args, **kwargs)
        test = split.test
        bad = dataclasses.replace(test, item=(test.item + 7) % split.n_items, rating=(6 - test.rating))
        negatives = None if split.test_negatives is None else (split.test_negatives + 3) % split.n_items
        return dataclasses.replace(split, test=bad, test_negatives=negatives, _index={})
    load.cache_clear = load_split.cache_clear
    return load


@pytest.mark.parametrize("split", ["random", "loo"])
def test_poisoned_test_rows_give_identical_tuning(tmp_path, monkeypatch, split):
    cfg = _cfg(tmp_path, split=split, negatives=10)
    monkeypatch.setenv("FEDREC_SHARD_CACHE", str(tmp_path / "clean-shards"))
    clean = tune(cfg, Budget.of(2))
    monkeypatch.setattr(build, "load_split", _poisoned(build.load_split))
    monkeypatch.setenv("FEDREC_SHARD_CACHE", str(tmp_path / "poisoned-shards"))  # the devices cut theirs anew
    poisoned = tune(dataclasses.replace(cfg, out=str(tmp_path / "tune2")), Budget.of(2))
    without_time = [{k: v for k, v in t.items() if k != "seconds"} for t in clean["trials"]]
    assert without_time == [{k: v for k, v in t.items() if k != "seconds"} for t in poisoned["trials"]]
    seen_poisoned = run_central(cfg, write=False).summary["metrics"]  # the poisoning is real: a test run sees it
    monkeypatch.undo()
    assert run_central(cfg, write=False).summary["metrics"] != seen_poisoned


def _write_ml100k(root, test_rating=lambda r: r):
    """An ML-100K-format folder (u.data, u.item, u1.base, u1.test) from small synthetic ratings."""
    ratings = generate(SyntheticSpec(users=50, items=40, density=0.3, seed=1))[0].data
    folder = root / "ml-100k"
    folder.mkdir(parents=True)
    stamps = 880000000 + np.arange(len(ratings))
    rows = np.stack([ratings.user + 1, ratings.item + 1, ratings.rating.astype(int), stamps], 1)
    is_test = np.random.default_rng(0).random(len(rows)) < 0.2
    poisoned = rows[is_test].copy()
    poisoned[:, 2] = [test_rating(r) for r in poisoned[:, 2]]
    for name, part in (("u.data", rows), ("u1.base", rows[~is_test]), ("u1.test", poisoned)):
        (folder / name).write_text("".join("\t".join(map(str, r)) + "\n" for r in part))
    (folder / "u.item").write_text("".join(f"{i}|Movie {i} (1995)|x\n" for i in range(1, 41)), encoding="latin-1")
    return root


def test_a_poisoned_u1_test_file_changes_nothing_in_tuning(tmp_path):
    runs, tested = {}, {}
    for name, flip in (("clean", lambda r: r), ("poisoned", lambda r: 6 - r)):
        data = _write_ml100k(tmp_path / name, flip)
        cfg = RunConfig(dataset="ml-100k", split="u1", data_dir=str(data), epochs=6, rounds=6, eval_every=3,
                        out=str(tmp_path / f"tune-{name}"))
        runs[name] = tune(cfg, Budget.of(2))
        tested[name] = run_central(cfg, write=False).summary["metrics"]["rmse"]
    assert tested["clean"] != tested["poisoned"]  # u1.test differs, and a test-scored run sees it
    without_time = [[{k: v for k, v in t.items() if k != "seconds"} for t in runs[n]["trials"]] for n in runs]
    assert without_time[0] == without_time[1]


def _federated_in_process(cfg: RunConfig):
    """compare's federated side through the in-process grid (the code the engines run, no Ray)."""
    from fedrec.client.app import app as client_app
    from fedrec.server.runner import run_server
    from fedrec.simulations.federated import _environment, check_population
    from fedrec.simulations.inprocess import InProcessGrid

    nodes = num_nodes(cfg, check_population(cfg))
    with _environment({SHARDS_ENV: str(ensure_shards(cfg, nodes))}):
        return run_server(InProcessGrid(client_app, nodes), cfg)


def test_compare_tune_runs_each_side_with_its_own_chosen_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(cli_module, "run_federated_cli", _federated_in_process)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(cli, ["compare", *FAST, "--tune", "--tune-trials", "3", "--out", str(out)],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "tune.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tuned"] == report["chosen"] and "chosen on validation" in result.output
    for side in ("central", "federated"):
        chosen = report["chosen"][side]
        config = tomllib.loads((out / side / "config.toml").read_text())
        space = space_for(_cfg(tmp_path))
        assert {n: config[n.replace("_", "-")] for n in space} == {n: chosen[n] for n in space}
        assert config[STEP[side]] == chosen[STEP[side]] and config["validation"] is False  # scored on the test set


@pytest.mark.parametrize("args,expected", [
    (["tune", "--tune-trials", "-1"], "--tune-trials and --tune-seconds must be >= 0"),
    (["tune", "--tune-seconds", "nan"], "--tune-trials and --tune-seconds must be >= 0"),
    (["tune", "--tune-trials", "two"], "'--tune-trials'"),
    (["tune", "--dim", "16"], "--dim does not apply to tune"),
    (["tune", "--dp", "central"], "--dp does not apply to tune"),
    (["compare", "--tune-trials", "3"], "--tune-trials and --tune-seconds apply with --tune"),
    (["compare", "--tune", "--users-per-round", "30", "--lr", "0.1"], "--lr: --tune chooses it; drop it or drop"),
    (["compare", "--tune", "--bpmf-alpha", "2"], "--bpmf-alpha: --tune chooses it; drop it or drop --tune"),
    (["compare", "--tune", "--dp", "central", "--clipping-norm", "0.1", "--noise-multiplier", "1"],
     "--tune does not run with --dp central"),
])
def test_bad_tuning_input_is_one_line_and_exit_2(in_tmp, args, expected):
    result = CliRunner().invoke(cli, [*args, *SMALL])
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert expected in output and "Traceback" not in output and len(output.splitlines()) == 1, output
    assert not list(in_tmp.glob("runs/*/*"))  # nothing left behind


def test_the_library_refuses_dp(tmp_path):
    with pytest.raises(ConfigError, match="--tune does not run with --dp local"):
        tune(_cfg(tmp_path, dp="local", clipping_norm=0.1, noise_multiplier=1.0), Budget.of(1))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.engine
def test_compare_tune_through_the_simulation_engine(tmp_path):
    out = tmp_path / "cmp"
    result = CliRunner().invoke(cli, ["compare", *FAST, "--tune", "--tune-trials", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    chosen = json.loads((out / "tune.json").read_text())["chosen"]["federated"]
    assert json.loads((out / "federated" / "summary.json").read_text())["rounds"] == chosen["rounds"]
