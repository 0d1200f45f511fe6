"""Attacks on our own privacy claims: noise regeneration from the seed, decoy
regeneration, canary lower bounds on epsilon, and the item-inference audit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from fedrec.audit.attacks import noise_candidates, precision_at_k, roc_auc, seed_attack
from fedrec.audit.audit import run_audit
from fedrec.audit.canary import canary_audit
from fedrec.client.node import load_state, node_data
from fedrec.datasets import SyntheticSpec, cohort, generate
from fedrec.datasets.splits import random_holdout
from fedrec.models import Hyper, ItemParams, UserState
from fedrec.models.device import DevicePolicy, device_step
from fedrec.models.mf import ITEM_BIAS, ITEM_EMB
from fedrec.models.upload import ITEM_INDEX
from fedrec.run import schema
from fedrec.run.build import device_policy, hyper, load_data
from fedrec.run.config import RunConfig
from fedrec.server import privacy as server_privacy
from fedrec.server.directory import NodeDirectory
from fedrec.server.privacy import PrivacyPlan
from fedrec.server.strategy import FedRecStrategy
from fedrec.simulations import canary as canary_module

H = Hyper(dim=6, seed=1, lr=0.2)
SEED, ROUND = 0, 3


@pytest.fixture(scope="module")
def split():
    return random_holdout(generate(SyntheticSpec(users=120, items=150, density=0.1, seed=3))[0], 0.2, 3)


def _device(split, user, policy):
    rows = cohort(split, [user])
    state = UserState.init(np.array([user]), split.n_users, H)
    truth = np.zeros(split.n_items, bool)
    truth[rows.train_item] = True
    return device_step(ItemParams.init(split.n_items, H, 3.0), state, rows, split.n_items, H, policy, ROUND), truth


def _zero_reply(n_items, dim):
    reply = Mock(spec=Message)
    reply.has_error.return_value = False
    reply.metadata.src_node_id = 1
    reply.content = RecordDict({
        schema.ARRAYS: ArrayRecord({schema.ITEM_EMB: Array(np.zeros((n_items, dim), np.float32)),
                                    schema.ITEM_BIAS: Array(np.zeros(n_items, np.float32)),
                                    schema.GLOBAL_BIAS: Array(np.zeros(1, np.float32))}),
        schema.METRICS: MetricRecord({schema.WEIGHT: 1, "loss-sum": 0.0, "num-rows": 1})})
    return reply


@pytest.mark.parametrize("reproducible", [False, True])
def test_a_server_that_knows_the_config_cannot_regenerate_device_noise(split, reproducible):
    """Dense local DP: subtract the noise regenerated from every seed construction the code
    has used. With OS entropy this must fail (AUC near chance); with --reproducible-noise
    the same attacker must win, or it would prove nothing."""
    seed = SEED if reproducible else None
    aucs = []
    for user in range(split.n_users):  # noise far above the signal: only a regenerated noise can expose the rows
        policy = DevicePolicy("dense", clip_norm=0.1, noise_std=5.0, reproducible_seed=seed)
        result, truth = _device(split, user, policy)
        aucs.append(seed_attack(result.upload, 5.0, SEED, ROUND, user, truth)[0])
    if reproducible:
        assert min(aucs) == 1.0
    else:
        assert np.mean(aucs) <= 0.55  # chance is 0.5; the mean over 120 users has a standard error of ~0.008


def test_two_runs_with_the_same_seed_draw_different_device_noise(split):
    policy = DevicePolicy("dense", clip_norm=0.1, noise_std=0.5)
    a, _ = _device(split, 5, policy)
    b, _ = _device(split, 5, policy)
    assert not np.array_equal(a.upload[ITEM_EMB], b.upload[ITEM_EMB])
    np.testing.assert_array_equal(a.update.emb_delta, b.update.emb_delta)  # only the noise differs


def test_central_noise_cannot_be_regenerated_from_the_seed():
    """Zero updates in, so the release is the noise: no stream derived from the seed matches it."""
    n_items, dim = 50, 4
    released = {}
    for reproducible in (False, True):
        cfg = RunConfig(strategy="fedavg", server_lr=1.0, dp="central", noise_multiplier=1.0, clipping_norm=1.0,
                        users_per_round=10, sampling="poisson", seed=SEED, reproducible_noise=reproducible)
        items = ItemParams.init(n_items, Hyper(dim=dim, init_std=0.0), 0.0)
        plan = PrivacyPlan("central", 1.0, 1.0, "poisson", 10, 100, 1e-5, "rdp")
        directory = NodeDirectory(np.array([1], np.uint64), np.array([0]), np.array([100]), 100, n_items, (1.0, 5.0))
        FedRecStrategy(cfg, directory, items, privacy=plan).aggregate_train(1, [_zero_reply(n_items, dim)])
        released[reproducible] = items.emb.numpy().ravel() * 10  # sum / expected users 10 = noise / 10
    for reproducible, noise in released.items():
        matches = [name for name, rng in noise_candidates(SEED, 1, 0)
                   if np.allclose(rng.normal(0.0, 1.0, (n_items, dim)).ravel(), noise, atol=1e-4)]
        assert bool(matches) == reproducible, matches


def test_decoys_cannot_be_regenerated_without_the_secret_key(split):
    user = 7
    decoys = {}
    for run in range(2):
        result, truth = _device(split, user, DevicePolicy("padded", clip_norm=0.1))
        decoys[run] = set(result.upload[ITEM_INDEX].tolist()) - set(np.flatnonzero(truth).tolist())
    assert decoys[0] != decoys[1]  # fresh per run: nothing about the seed predicts them
    repro = [set(_device(split, user, DevicePolicy("padded", clip_norm=0.1, reproducible_seed=SEED))[0]
                 .upload[ITEM_INDEX].tolist()) for _ in range(2)]
    assert repro[0] == repro[1]


def test_canary_audit_without_dp_proves_a_large_epsilon():
    row = canary_audit("none", None, n_items=1000, dim=15, rounds=10, rate=0.5, clip=0.1, delta=1e-5)
    assert row["epsilon_lower"] > 6 and row["confidence"] == 0.95 and row["epsilon"] is None


@pytest.mark.parametrize("mode,sampling,z",
                         [("central", "poisson", 1.2), ("central", "fixed", 3.0), ("local", "poisson", 8.0)])
def test_canary_lower_bound_stays_below_the_accountants_epsilon(mode, sampling, z):
    plan = PrivacyPlan(mode, z, 0.1, sampling, 100, 1000, 1e-5, "rdp", max_rounds=5 if mode == "local" else 0)
    row = canary_audit(mode, plan, n_items=1000, dim=15, rounds=10, rate=0.1, clip=0.1, delta=1e-5)
    assert 0.3 < row["epsilon"] < 4 and row["epsilon"] == plan.guarantee(10)
    assert row["epsilon_lower"] <= row["epsilon"]


@pytest.mark.parametrize("bug", ["noise", "clipping"])
def test_canary_audit_catches_a_privacy_bug(monkeypatch, bug):
    """The audit has teeth: with noise 10x smaller than the plan says, or clipping that does
    not bind, the proven lower bound exceeds the accountant's epsilon."""
    if bug == "noise":
        real = server_privacy.add_central_noise
        monkeypatch.setattr(canary_module, "add_central_noise",
                            lambda total, plan, rng: real(
                                total, dataclasses.replace(plan, noise_multiplier=plan.noise_multiplier / 10), rng))
    else:
        monkeypatch.setattr(canary_module, "clip_per_user", lambda u, dq, db, mu, c: (dq, db, mu, None))
    plan = PrivacyPlan("central", 0.0, 0.1, "poisson", 100, 1000, 1e-5, "rdp")
    plan = dataclasses.replace(plan, noise_multiplier=plan.calibrate(1.0, 10))
    row = canary_audit("central", plan, n_items=1000, dim=15, rounds=10, rate=0.1, clip=0.1, delta=1e-5)
    assert row["epsilon_lower"] > row["epsilon"]


def test_auc_and_precision_known_answers():
    truth = np.array([True, False, True, False])
    assert roc_auc(np.array([0.9, 0.1, 0.8, 0.2]), truth) == 1.0
    assert roc_auc(np.array([0.1, 0.9, 0.2, 0.8]), truth) == 0.0
    assert roc_auc(np.ones(4), truth) == 0.5
    assert precision_at_k(np.array([0.9, 0.1, 0.8, 0.2]), truth, 2) == 1.0


def test_audit_report_reads_attacks_against_the_prior(small_cfg):
    cfg = dataclasses.replace(small_cfg, synthetic_users=300, synthetic_items=120, clipping_norm=0.1,
                              users_per_round=30, sampling="poisson", epochs=10, rounds=10)
    report = run_audit(cfg, targets=15, log=None, epsilons=[2.0])
    rows = {(r["attacker"], r["observer"], r.get("mode"), r["dp"]): r for r in report["results"]
            if r["secure_aggregation"] == "none" or r["dp"] == "distributed"}
    prior = rows[("prior", "none", "-", "none")]["auc"]
    masked = {r["attacker"]: r for r in report["results"] if r["secure_aggregation"] == "secagg+"
              and r["observer"] == "upload"}
    assert masked["norm"]["auc"] < 0.65  # SecAgg+: what the server holds of one upload says nothing
    assert rows[("direction", "aggregate", "dense", "distributed")]["auc"] < prior + 0.1
    assert 0.6 < prior < 0.95  # popularity alone says something: attacks are read against it
    for attacker in ("norm", "direction"):
        assert rows[(attacker, "upload", "dense", "none")]["auc"] == 1.0
        assert rows[(attacker, "aggregate", "dense", "none")]["auc"] == 1.0
    assert rows[("norm", "upload", "padded", "none")]["precision_at_k"] < 0.9
    for observer, dp in (("upload", "local"), ("aggregate", "central")):
        row = rows[("direction", observer, "dense", dp)]
        assert row["epsilon"] <= 2.0 + 1e-6 and row["auc"] < prior + 0.1
    assert rows[("seed", "upload", "dense", "local")]["auc"] < 0.65
    canaries = [r for r in report["results"] if r["attacker"] == "canary"]
    assert {r["dp"] for r in canaries} == {"none", "central", "local", "distributed"}
    assert all(r["epsilon_lower"] <= r["epsilon"] for r in canaries if r["epsilon"] is not None)
    written = json.loads((Path(report["run_dir"]) / "audit.json").read_text())
    assert all("attacker" in r for r in written["results"])


def test_decoys_imply_ratings_as_plausible_as_real_ones():
    """The attack a reviewer ran on padded uploads: given the user's vector, solve each row
    for its loss gradient and keep rows whose implied rating is a whole star. Decoys are
    trained on one of the user's own ratings, so they pass the test as often as real rows."""
    cfg = RunConfig(dataset="synthetic", synthetic_users=200, synthetic_items=300, synthetic_density=0.05, dim=8,
                    update_mode="padded", pad_ratio=2.0, clipping_norm=0.05).resolved().validate()
    split, h = load_data(cfg), hyper(cfg)
    items = ItemParams.init(split.n_items, h, 3.5)
    flagged = {True: [], False: []}
    for user in range(30):
        rows = cohort(split, [user])
        state = UserState.init(np.array([user]), split.n_users, h)  # the attacker is given this vector
        upload = device_step(items, state, rows, split.n_items, h, device_policy(cfg), 1).upload
        p = state.emb[0].double().numpy()
        index, dq, db = upload[ITEM_INDEX], upload[ITEM_EMB].astype(np.float64), upload[ITEM_BIAS].astype(np.float64)
        q = items.emb.double().numpy()[index]
        coef = np.array([np.linalg.lstsq(np.stack([q[j], p], 1), dq[j], rcond=None)[0] for j in range(len(index))])
        scale = np.median(coef[:, 0] / (-2 * h.lr * h.reg_item))
        implied = items.global_bias.item() + q @ p - db / (-h.lr * scale) / 2
        whole = np.abs(implied - np.rint(implied)) < 1e-3
        real = np.isin(index, rows.train_item)
        flagged[True] += whole[real].tolist()
        flagged[False] += whole[~real].tolist()
    assert np.mean(flagged[True]) > 0.9  # the attack works on real rows...
    assert np.mean(flagged[False]) > 0.9  # ...and on decoys just as well: it separates nothing


def test_private_runs_start_each_user_from_a_vector_the_server_cannot_know(small_cfg):
    hosting = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 12},
                      state=RecordDict(), run_config={})
    node = node_data(small_cfg, hosting)  # users 0..4 of 60
    seeded = UserState.init(np.arange(5), small_cfg.synthetic_users, hyper(small_cfg)).emb

    def start(cfg):
        context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        return load_state(context, node, cfg, {}, 0).emb

    np.testing.assert_array_equal(start(small_cfg), seeded)  # non-private runs repeat exactly
    for private in (dict(update_mode="padded"), dict(dp="central", clipping_norm=0.1, noise_multiplier=1.0)):
        cfg = dataclasses.replace(small_cfg, **private)
        first, second = start(cfg), start(cfg)
        assert not np.allclose(first, seeded) and not np.allclose(first, second)
    np.testing.assert_array_equal(start(dataclasses.replace(small_cfg, update_mode="padded", reproducible_noise=True)),
                                  seeded)
