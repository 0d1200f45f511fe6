"""Attacks on our own privacy claims: noise regeneration from the seed, decoy
regeneration, canary lower bounds on epsilon through the real pipeline, and the
item-inference audit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from fedrec.audit.attacks import noise_candidates, precision_at_k, roc_auc, seed_attack
from fedrec.audit.audit import run_audit
from fedrec.audit.canary import canary_audit
from fedrec.audit.secure_views import masked_views
from fedrec.client.node import load_state, node_data
from fedrec.datasets import SyntheticSpec, cohort, generate
from fedrec.datasets.splits import random_holdout
from fedrec.models.defaults import Hyper
from fedrec.models.factors import GLOBAL_BIAS, ITEM_BIAS, ITEM_EMB
from fedrec.models.mf import MF
from fedrec.models.randomness import private_rng
from fedrec.privacy import device as device_module
from fedrec.privacy import upload as upload_module
from fedrec.privacy.accountant import PrivacyPlan
from fedrec.privacy.clip import clip
from fedrec.privacy.device import device_step, new_users
from fedrec.privacy.noise import add_central_noise
from fedrec.privacy.policy import DevicePolicy
from fedrec.privacy.upload import ITEM_INDEX
from fedrec.run.build import hyper, load_data, make_algorithm
from fedrec.run.config import ConfigError, RunConfig
from fedrec.run.device_config import DeviceConfig
from fedrec.server import federation as federation_module
from fedrec.server.federation import Federation

from ..conftest import federation, mf_reply

H = Hyper(dim=6, seed=1, lr=0.2)
SEED, ROUND = 0, 3


@pytest.fixture(scope="module")
def split():
    return random_holdout(generate(SyntheticSpec(users=120, items=150, density=0.1, seed=3))[0], 0.2, 3)


def _device(split, user, policy):
    algorithm = MF(H, split.n_items, split.rating_scale)
    rows = cohort(split, [user])
    state = new_users(algorithm, rows.users, split.n_users, DevicePolicy())  # seeded: the same vector every run
    truth = np.zeros(split.n_items, bool)
    truth[rows.train_item] = True
    shared = algorithm.init_server("fedavg", 1.0).broadcast()
    return device_step(algorithm, shared, state, rows, ROUND, policy, H.seed), truth


@pytest.mark.parametrize("reproducible", [False, True])
def test_a_server_that_knows_the_config_cannot_regenerate_device_noise(split, reproducible):
    """Dense local DP: subtract the noise regenerated from every seed construction the code
    has used. With OS entropy this must fail (AUC near chance); with --reproducible-noise
    the same attacker must win, or it would prove nothing."""
    seed = SEED if reproducible else None
    statistics = MF(H, split.n_items, split.rating_scale).statistics()
    aucs = []
    for user in range(split.n_users):  # noise far above the signal: only a regenerated noise can expose the rows
        policy = DevicePolicy("dense", clipping_norm=0.1, noise_std=5.0, reproducible_seed=seed)
        result, truth = _device(split, user, policy)
        aucs.append(seed_attack(result.upload, statistics, 5.0, SEED, ROUND, user, truth)[0])
    if reproducible:
        assert min(aucs) == 1.0
    else:
        assert np.mean(aucs) <= 0.55  # chance is 0.5; the mean over 120 users has a standard error of ~0.008


def test_two_runs_with_the_same_seed_draw_different_device_noise(split):
    policy = DevicePolicy("dense", clipping_norm=0.1, noise_std=0.5)
    a, _ = _device(split, 5, policy)
    b, _ = _device(split, 5, policy)
    assert not np.array_equal(a.upload[ITEM_EMB], b.upload[ITEM_EMB])
    torch.testing.assert_close(a.sums.arrays[ITEM_EMB], b.sums.arrays[ITEM_EMB], rtol=0, atol=0)  # only the noise


def test_central_noise_cannot_be_regenerated_from_the_seed():
    """Zero updates in, so the release is the noise: no stream derived from the seed matches it."""
    n_items, dim = 50, 4
    released = {}
    for reproducible in (False, True):
        cfg = RunConfig(strategy="fedavg", server_lr=1.0, dp="central", noise_multiplier=1.0, clipping_norm=1.0,
                        users_per_round=10, sampling="poisson", seed=SEED, reproducible_noise=reproducible)
        plan = PrivacyPlan("central", 1.0, 1.0, "poisson", 10, 100, 1e-5, "rdp")
        fed = federation(cfg, n_items, dim, 100, plan, init_std=0.0)
        fed.begin_round(1)
        fed._sent = {1: 10}
        fed.aggregate_train(1, [mf_reply(10, n_items, dim)])
        released[reproducible] = fed.state.model()[ITEM_EMB].ravel() * 10  # sum / expected users 10 = noise / 10
    for reproducible, noise in released.items():
        matches = [name for name, rng in noise_candidates(SEED, 1, 0)
                   if np.allclose(rng.normal(0.0, 1.0, (n_items, dim)).ravel(), noise, atol=1e-4)]
        assert bool(matches) == reproducible, matches


def test_decoys_cannot_be_regenerated_without_the_secret_key(split):
    user = 7
    decoys = {}
    for run in range(2):
        result, truth = _device(split, user, DevicePolicy("padded", clipping_norm=0.1))
        decoys[run] = set(result.upload[ITEM_INDEX].tolist()) - set(np.flatnonzero(truth).tolist())
    assert decoys[0] != decoys[1]  # fresh per run: nothing about the seed predicts them
    repro = [set(_device(split, user, DevicePolicy("padded", clipping_norm=0.1, reproducible_seed=SEED))[0]
                 .upload[ITEM_INDEX].tolist()) for _ in range(2)]
    assert repro[0] == repro[1]


# ---------------------------------------------------------------- canaries, through the real server and ClientApp
AUDITED = dict(n_items=150, population=1000)  # the audited data: MF at K=19 has 150 x 20 per-item coordinates


def _canary_cfg(dp: str, **changes) -> RunConfig:
    """Central and distributed DP: 5 rounds sampling a fifth of the users (Poisson), epsilon 1; local DP: one
    round of every user, epsilon 2 (each local canary costs a ClientApp call)."""
    cfg = RunConfig(model="mf", dim=19, clipping_norm=0.1, rounds=5, users_per_round=200, sampling="poisson", dp=dp,
                    target_epsilon=0.0 if dp == "none" else 1.0,
                    secure_aggregation="secagg+" if dp == "distributed" else "none")
    if dp == "local":
        cfg = dataclasses.replace(cfg, rounds=1, users_per_round=0, target_epsilon=2.0)
    return dataclasses.replace(cfg, **changes)


def _canaries(dp: str, local_canaries: int = 300, **changes) -> dict:
    return canary_audit(_canary_cfg(dp, **changes), canaries=local_canaries if dp == "local" else 3000, **AUDITED)


def test_canary_audit_without_dp_proves_a_large_epsilon():
    row = _canaries("none")
    assert row["epsilon_lower"] > 3 and row["confidence"] == 0.95 and row["epsilon"] is None
    assert row["canaries"] == 3000 and row["observer"] == "aggregate"


# fixed-size sampling: z by hand (calibrating its replace-one accountant takes tens of seconds)
FIXED = {"sampling": "fixed", "noise_multiplier": 5.0, "target_epsilon": 0.0}


@pytest.mark.parametrize("dp,changes", [("central", {}), ("central", FIXED), ("local", {}), ("distributed", {})])
def test_canary_lower_bound_stays_below_the_accountants_epsilon(dp, changes):
    row = _canaries(dp, **changes)
    if changes:
        assert 0.3 < row["epsilon"] < 4
    else:
        assert row["epsilon"] == pytest.approx(_canary_cfg(dp).target_epsilon, rel=1e-2)
    assert row["epsilon_lower"] <= row["epsilon"]
    assert row["observer"] == ("upload" if dp == "local" else "aggregate")
    assert row["relation"] == ("replace-one" if dp == "local" or changes else "add-remove")
    assert row["secure_aggregation"] == ("secagg+" if dp == "distributed" else "none")


def _noise_skipped_in_round_2(real):
    def noise(self, server_round, total, users):
        return (total, float(self.privacy.sample_size)) if server_round == 2 else real(self, server_round, total, users)
    return noise


def _noise_for_the_mean(self, server_round, total, users):
    """Noise sized for the mean (std over the round's users) added to the sum."""
    rng = private_rng("central-noise")
    return add_central_noise(total, self.privacy.noise_std / max(users, 1.0), rng), float(self.privacy.sample_size)


@pytest.mark.parametrize("bug", ["skipped in one round", "divided by the users"])
def test_the_canary_audit_catches_a_server_that_noises_wrongly(monkeypatch, bug):
    """The acceptance test: the Federation's noise step with a bug (no noise in round 2 of 5, or noise divided by
    the round's count of users), the accountant unaware of it: the proven lower bound exceeds its epsilon."""
    buggy = _noise_skipped_in_round_2(Federation.noise) if bug == "skipped in one round" else _noise_for_the_mean
    monkeypatch.setattr(Federation, "noise", buggy)
    row = _canaries("central")
    assert row["epsilon_lower"] > row["epsilon"] == pytest.approx(1.0, rel=1e-2)


def _tenth(real):
    return lambda arrays, std, *rest: real(arrays, std / 10, *rest)


@pytest.mark.parametrize("dp,bug", [("central", "noise"), ("local", "noise"), ("distributed", "noise"),
                                    ("central", "clipping")])
def test_the_canary_attack_works_where_the_noise_is_cut_or_clipping_loosened(monkeypatch, dp, bug):
    """Positive controls for the attack itself: the noise cut tenfold where it is added (the server's sum, or each
    device's upload and share), or devices clipping at 10 C, while the accountant is told the original z and C."""
    if bug == "clipping":
        monkeypatch.setattr(device_module, "clip", lambda contributions, c: clip(contributions, 10 * c))
    elif dp == "central":
        monkeypatch.setattr(federation_module, "add_central_noise", _tenth(federation_module.add_central_noise))
    else:
        monkeypatch.setattr(upload_module, "add_device_noise", _tenth(upload_module.add_device_noise))
    row = _canaries(dp, local_canaries=400)  # the most a local audit has: a bound up to ~3.3 (epsilon 2 here)
    assert row["epsilon_lower"] > row["epsilon"] == pytest.approx(_canary_cfg(dp).target_epsilon, rel=1e-2)


def test_the_canary_audit_refuses_an_algorithm_that_admits_no_dp():
    with pytest.raises(ConfigError, match="Bayesian MF by Gibbs sampling refuses"):
        canary_audit(_canary_cfg("central", model="bpmf"), canaries=100, **AUDITED)


def test_auc_and_precision_known_answers():
    truth = np.array([True, False, True, False])
    assert roc_auc(np.array([0.9, 0.1, 0.8, 0.2]), truth) == 1.0
    assert roc_auc(np.array([0.1, 0.9, 0.2, 0.8]), truth) == 0.0
    assert roc_auc(np.ones(4), truth) == 0.5
    assert precision_at_k(np.array([0.9, 0.1, 0.8, 0.2]), truth, 2) == 1.0


def test_audit_report_reads_attacks_against_the_prior(small_cfg):
    cfg = dataclasses.replace(small_cfg, synthetic_users=300, synthetic_items=120, clipping_norm=0.1,
                              users_per_round=30, sampling="poisson", epochs=10, rounds=10)
    report = run_audit(cfg, targets=15, log=None, epsilons=[2.0], canaries=50)
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


def test_the_audit_refuses_an_algorithm_whose_update_its_attackers_cannot_read(small_cfg):
    cfg = dataclasses.replace(small_cfg, model="bpmf")  # with --clipping-norm, the config itself refuses it
    with pytest.raises(ConfigError, match="factor family's update"):
        run_audit(cfg, targets=5, log=None)
    assert not Path(cfg.out).exists()  # nothing half-written


def test_under_secagg_the_server_holds_of_one_device_a_vector_that_hides_its_rated_rows(small_cfg):
    """What fedrec.audit.secure_views reads: each device's masked vector, by statistic name. A plain dense
    upload is exactly zero on the rows its user did not rate (positive control); the masked one is not."""
    cfg = dataclasses.replace(small_cfg, clipping_norm=0.1).resolved()
    split = load_data(cfg)
    algorithm = make_algorithm(cfg, split.n_items, split.rating_scale)
    model = algorithm.init_server(cfg.strategy, cfg.server_lr).broadcast()
    users = np.arange(4)
    views = masked_views(cfg, algorithm, model, users, split.n_users, round_=1)
    assert set(views) == set(users.tolist())
    for user, view in views.items():
        rows = cohort(split, [user])
        unrated = ~np.isin(np.arange(split.n_items), rows.train_item)
        assert list(view) == [*algorithm.statistics(), "user-count"]
        assert view[ITEM_EMB].shape == (split.n_items, cfg.dim)
        plain = device_step(algorithm, model, new_users(algorithm, rows.users, split.n_users, DevicePolicy()), rows, 1,
                            DevicePolicy(clipping_norm=0.1), cfg.seed).upload
        assert not plain[ITEM_EMB][unrated].any()  # what the server would read without SecAgg+
        assert np.abs(view[ITEM_EMB][unrated]).mean() > 0.1  # masked: spread over many times C


def test_the_secure_views_read_the_data_the_run_names(shared_data, tmp_path, monkeypatch):
    """The in-process devices of `fedrec audit` open the run's --data-dir (their node config, as in a
    deployment), not the default cache: the device's part of the config carries no path. Without that
    every device downloaded MovieLens into ~/.cache and the audit died on an error reply."""
    import fedrec.datasets.download as download

    monkeypatch.setenv("FEDREC_DATA_DIR", str(tmp_path / "nothing-here"))
    monkeypatch.setattr(download, "_fetch", lambda *a, **k: pytest.fail("a device tried to download the data"))
    cfg = RunConfig(dataset="ml-100k", split="u1", data_dir=str(shared_data), model="mf", dim=4, clipping_norm=0.1,
                    out=str(tmp_path / "run")).resolved()
    split = load_data(cfg)
    algorithm = make_algorithm(cfg, split.n_items, split.rating_scale)
    model = algorithm.init_server(cfg.strategy, cfg.server_lr).broadcast()
    views = masked_views(cfg, algorithm, model, np.arange(3), split.n_users, round_=1)
    assert sorted(views) == [0, 1, 2]


def test_decoys_imply_ratings_as_plausible_as_real_ones():
    """The attack a reviewer ran on padded uploads: given the user's vector, solve each row
    for its loss gradient and keep rows whose implied rating is a whole star. Decoys are
    trained on one of the user's own ratings, so they pass the test as often as real rows."""
    cfg = RunConfig(dataset="synthetic", synthetic_users=200, synthetic_items=300, synthetic_density=0.05, dim=8,
                    update_mode="padded", pad_ratio=2.0, clipping_norm=0.05).resolved().validate()
    split, h = load_data(cfg), hyper(cfg)
    algorithm = make_algorithm(cfg, split.n_items, split.rating_scale)
    shared = algorithm.init_server(cfg.strategy, cfg.server_lr).broadcast()
    flagged = {True: [], False: []}
    for user in range(30):
        rows = cohort(split, [user])
        state = new_users(algorithm, rows.users, split.n_users, DevicePolicy())  # the attacker is given this vector
        upload = device_step(algorithm, shared, state, rows, 1, cfg.device_policy(cfg.seed), cfg.seed).upload
        p = state["emb"][0].double().numpy()
        index, dq = upload[ITEM_INDEX], upload[ITEM_EMB].astype(np.float64)
        db = upload[ITEM_BIAS].astype(np.float64).reshape(-1)
        q = shared[ITEM_EMB].astype(np.float64)[index]
        coef = np.array([np.linalg.lstsq(np.stack([q[j], p], 1), dq[j], rcond=None)[0] for j in range(len(index))])
        scale = np.median(coef[:, 0] / (-2 * h.lr * h.reg_item))
        implied = float(shared[GLOBAL_BIAS][0]) + q @ p - db / (-h.lr * scale) / 2
        whole = np.abs(implied - np.rint(implied)) < 1e-3
        real = np.isin(index, rows.train_item)
        flagged[True] += whole[real].tolist()
        flagged[False] += whole[~real].tolist()
    assert np.mean(flagged[True]) > 0.9  # the attack works on real rows...
    assert np.mean(flagged[False]) > 0.9  # ...and on decoys just as well: it separates nothing


def test_private_runs_start_each_user_from_a_vector_the_server_cannot_know(small_cfg):
    hosting = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 12},
                      state=RecordDict(), run_config={})
    node = node_data(DeviceConfig.of(small_cfg.resolved()), hosting)  # users 0..4 of 60
    seeded = node.algorithm.new_users(np.arange(5), small_cfg.synthetic_users, None)["emb"]

    def start(cfg):
        context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        return load_state(context, node, cfg.device_policy(cfg.seed), {}, 0)["emb"]

    np.testing.assert_array_equal(start(small_cfg), seeded)  # non-private runs repeat exactly
    for private in (dict(update_mode="padded"), dict(dp="central", clipping_norm=0.1, noise_multiplier=1.0)):
        cfg = dataclasses.replace(small_cfg, **private)
        first, second = start(cfg), start(cfg)
        assert not np.allclose(first, seeded) and not np.allclose(first, second)
    np.testing.assert_array_equal(start(dataclasses.replace(small_cfg, update_mode="padded", reproducible_noise=True)),
                                  seeded)
