"""What a DP run releases: only covered quantities, or ones listed as not covered."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pandas as pd
import pytest
from flwr.supercore.task_identity import TaskIdentity

from fedrec.client.app import app as client_app
from fedrec.privacy.accountant import PrivacyPlan
from fedrec.privacy.ledger import is_evaluation, listed_locations
from fedrec.run import schema
from fedrec.run.config import RunConfig
from fedrec.server.runner import run_server
from fedrec.simulations.inprocess import InProcessGrid

from ..conftest import federation


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.mark.parametrize("dp", ["central", "local"])
def test_a_dp_run_releases_only_what_its_ledger_lists(small_cfg, caplog, dp):
    cfg = dataclasses.replace(small_cfg, dp=dp, clipping_norm=0.3, noise_multiplier=2.0, users_per_round=20,
                              sampling="poisson", rounds=4, eval_every=2)
    grid = InProcessGrid(client_app, 60)  # one user per node: replies count users
    with caplog.at_level(logging.INFO, logger="flwr"):
        outcome = run_server(grid, cfg)
    frame = pd.read_csv(outcome.run_dir / "metrics.csv")
    assert set(frame.columns) - {"round", "epsilon"} and all(is_evaluation(c) for c in frame.columns
                                                              if c not in ("round", "epsilon"))
    assert not (outcome.run_dir / "audit.jsonl").exists()  # the per-reply log counts participants
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    assert not {"bytes_up", "bytes_down", "wall_seconds"} & set(summary)
    releases = summary["privacy"]["releases"]
    assert releases["evaluation metrics (RMSE/MAE or HR/NDCG/Recall; metrics.csv, summary.json, plot, Flower log)"][
        "status"] == "not covered"
    assert releases["per-reply upload log (audit.jsonl)"]["status"] == "not released"
    assert summary["privacy"]["reproducible_noise"] is False and "DP" in summary["privacy"]["guarantee"]
    train_replies = [r for r in grid.replies if schema.ARRAYS in r.content]
    if dp == "local":  # the server is the adversary: nothing un-noised beyond the count of users trained
        assert train_replies and all(set(r.content[schema.METRICS].keys()) == {schema.WEIGHT} for r in train_replies)
    messages = [r.getMessage() for r in caplog.records]
    assert messages and not [m for m in messages if "Received" in m or "train-loss" in m or "'users'" in m]


@pytest.mark.parametrize("dp", ["central", "local", "distributed"])
def test_the_ledger_lists_everything_a_dp_run_writes(small_cfg, dp):
    """Every file in the run directory, every summary.json key and every metrics.csv column of a DP
    run is named by an entry of its ledger (evaluation metrics and plots by their entry's pattern)."""
    cfg = dataclasses.replace(small_cfg, dp=dp, clipping_norm=0.3, target_epsilon=8.0, users_per_round=20,
                              rounds=2, eval_every=2, secure_aggregation="secagg+" if dp == "distributed" else "none")
    outcome = run_server(InProcessGrid(client_app, 6), cfg)
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    listed = listed_locations(summary["privacy"]["releases"])
    itemized = {"summary.json", "metrics.csv"}  # checked key by key and column by column
    written = {p.name for p in outcome.run_dir.iterdir()} - itemized | {f"summary.json:{k}" for k in summary} | {
        f"metrics.csv:{c}" for c in pd.read_csv(outcome.run_dir / "metrics.csv").columns}
    patterns = {"metrics.csv:<evaluation metrics>": lambda w: w.startswith("metrics.csv:") and is_evaluation(
        w.split(":")[1]), "<metric>.png": lambda w: w.endswith(".png")}
    unlisted = {w for w in written - listed if not any(p in listed and match(w) for p, match in patterns.items())}
    assert not unlisted, f"written but not in the ledger: {sorted(unlisted)}"


def test_a_non_private_run_keeps_its_diagnostics(small_cfg):
    outcome = run_server(InProcessGrid(client_app, 2), dataclasses.replace(small_cfg, rounds=2, eval_every=2))
    frame = pd.read_csv(outcome.run_dir / "metrics.csv")
    assert {"users_sampled", "train_loss", "bytes_up", "seconds"} <= set(frame.columns)
    assert (outcome.run_dir / "audit.jsonl").stat().st_size > 0


def test_reproducible_noise_says_the_run_is_not_private(small_cfg):
    cfg = dataclasses.replace(small_cfg, dp="central", clipping_norm=0.3, noise_multiplier=1.0, rounds=2,
                              reproducible_noise=True)
    privacy = run_server(InProcessGrid(client_app, 2), cfg).summary["privacy"]
    assert privacy["reproducible_noise"] is True
    assert privacy["against_server"].startswith("none") and privacy["against_readers"].startswith("none")


def test_an_empty_poisson_round_still_adds_noise_and_counts():
    """Skipping the noise when nobody was sampled would tell that nobody was."""
    n_items, dim = 30, 4
    cfg = RunConfig(strategy="fedavg", server_lr=1.0, dp="central", noise_multiplier=1.0, clipping_norm=1.0,
                    users_per_round=5, sampling="poisson")
    plan = PrivacyPlan("central", 1.0, 1.0, "poisson", 5, 100, 1e-5, "rdp")
    fed = federation(cfg, n_items, dim, 100, plan, init_std=0.0)
    assert fed.aggregate_train(1, [])  # the model moved: by the noise alone
    assert np.abs(fed.state.model()["item-emb"]).max() > 0 and fed.rounds_trained == 1
    assert fed.epsilon == pytest.approx(plan.epsilon(1))


def test_padded_replies_do_not_count_the_real_rows(small_cfg):
    """num-rows would tell the server how many uploaded rows are real, undoing the decoys."""
    grid = InProcessGrid(client_app, 60)
    run_server(grid, dataclasses.replace(small_cfg, update_mode="padded", rounds=1, eval_every=1))
    train = [r for r in grid.replies if schema.ARRAYS in r.content]
    assert train and all(set(r.content[schema.METRICS].keys()) == {schema.WEIGHT} for r in train)


def test_the_distributed_dp_ledger_says_the_unmasked_sum_tells_how_many_users_were_held_back():
    from fedrec.privacy.ledger import release_ledger

    entry = release_ledger("distributed")["count of users trained per round (a coordinate of the unmasked sum)"]
    assert entry["status"] == "not covered" and "held back" in entry["why"] and "not which" in entry["why"]
    assert not [k for k in release_ledger("central") if k.startswith("count of users trained")]


def test_settings_chosen_by_tune_are_listed_as_not_covered(small_cfg):
    from fedrec.experiments.tune import apply

    chosen = apply(small_cfg, "federated", {"dim": 8, "reg_user": 0.1, "reg_item": 0.2, "reg_bias": 0.01, "lr": 0.05,
                                            "server_lr": 0.05, "model": "mf", "rounds": 2})
    assert chosen.tuned  # what fedrec tune writes into central.toml / federated.toml
    cfg = dataclasses.replace(chosen, dp="central", clipping_norm=0.3, noise_multiplier=2.0, eval_every=2)
    outcome = run_server(InProcessGrid(client_app, 3), cfg)
    entry = json.loads((outcome.run_dir / "summary.json").read_text())["privacy"]["releases"][
        "config.toml and summary.json settings"]
    assert entry["status"] == "not covered" and "fedrec tune" in entry["why"]
    from fedrec.privacy.ledger import release_ledger
    assert release_ledger("central")["config.toml and summary.json settings"]["status"] == "covered"
