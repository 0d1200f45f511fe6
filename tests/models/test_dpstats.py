"""The private sufficient-statistics algorithm (dpstats): its releases of unequal weight and their accounting,
the bound on what each user adds, full-participation (zero-out) accounting against the server, and the attacks
that back its privacy sentences, each with a positive control."""

from __future__ import annotations

import dataclasses
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrec.audit.sum_recovery import differencing_precision
from fedrec.client.app import app as client_app
from fedrec.datasets import cohort
from fedrec.models.dpstats import DPStats, Plan
from fedrec.privacy import device as device_module
from fedrec.privacy.accountant import PrivacyPlan
from fedrec.privacy.device import DevicePolicy, device_step, new_users
from fedrec.privacy.upload import build_upload
from fedrec.run.build import load_data, make_algorithm
from fedrec.run.config import ConfigError, RunConfig
from fedrec.server.runner import run_server
from fedrec.simulations.inprocess import InProcessGrid


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _cfg(tmp_path, **changes) -> RunConfig:
    base = RunConfig(dataset="synthetic", synthetic_users=120, synthetic_items=60, synthetic_density=0.15,
                     model="dpstats", accountant="rdp", target_delta=1e-4, out=str(tmp_path / "run"))
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------- releases of unequal weight
@settings(max_examples=15, deadline=None)
@given(weights=st.lists(st.floats(0.05, 1.0), min_size=2, max_size=4), target=st.sampled_from([0.5, 1.0, 4.0, 8.0]))
def test_the_composition_of_unequal_rounds_spends_the_target_epsilon(weights, target):
    """z is calibrated once; round r is noised with z / sqrt(w_r); dp-accounting's composition of those rounds
    spends the target (a little under: the calibration stays inside), and is the composition dp-accounting
    computes by itself. RDP here (any weights); PLD, whose calibration takes seconds, on dpstats' own below."""
    _spends_the_target(weights, target, "rdp")


def test_pld_composes_dpstats_own_release_weights_to_the_target():
    """At eps = 8: three releases of unequal weight (PLD's calibration alone takes seconds a target)."""
    _spends_the_target(DPStats.release_weights(8.0), 8.0, "pld")


def _spends_the_target(weights, target: float, accountant: str) -> None:
    w = tuple(x / sum(weights) for x in weights)
    plan = PrivacyPlan("central", 0.0, 1.0, "fixed", 500, 500, 1e-5, accountant, weights=w)
    z = plan.calibrate(target, len(w)) + 1e-3
    plan = dataclasses.replace(plan, noise_multiplier=z)
    spent = plan.epsilon(len(w))
    assert target * 0.97 <= spent <= target
    relation = dp_accounting.NeighboringRelation.REPLACE_SPECIAL
    accountant_ = (pld_privacy_accountant.PLDAccountant(relation) if accountant == "pld"
                   else rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation))
    accountant_.compose(dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(z / math.sqrt(x)) for x in w]))
    assert spent == pytest.approx(accountant_.get_epsilon(1e-5), rel=1e-9)
    assert [plan.round_z(r) for r in (1, 2)] == pytest.approx([z / math.sqrt(w[0]), z / math.sqrt(w[1])])


def test_equal_rounds_with_sampling_account_as_before():
    """MF's plans (no weights, sampled users) compose copies of one event, exactly as dp-accounting does."""
    for sampling, inner, relation in (("poisson", dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(1.1)),
                                       dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE),
                                      ("fixed", dp_event.SampledWithoutReplacementDpEvent(
                                          100_000, 1000, dp_event.GaussianDpEvent(0.55)),
                                       dp_accounting.NeighboringRelation.REPLACE_ONE)):
        plan = PrivacyPlan("central", 1.1, 1.0, sampling, 1000, 100_000, 1e-6, "rdp")
        accountant = rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
        accountant.compose(inner, 40)
        assert plan.epsilon(40) == pytest.approx(accountant.get_epsilon(1e-6), rel=1e-12)
        assert plan.round_z(3) == plan.noise_multiplier and not plan.full_participation


def test_each_block_gets_its_share_of_the_budget():
    """Scaling a block to bound sqrt(share / round's share) and noising the round with z_r leaves that block
    with the noise multiplier z / sqrt(share), as if it were a release of its own."""
    for epsilon in (1.0, 4.0, 8.0):
        plan = Plan.of(epsilon)
        total = sum(plan.shares.values())
        for round_, blocks in enumerate(plan.rounds):
            z_r = 1.0 / math.sqrt(plan.weights()[round_])
            for block in blocks:
                bound = 1.7  # any: the scale undoes it
                assert z_r / (plan.scale(block, bound) * bound) == pytest.approx(
                    1.0 / math.sqrt(plan.shares[block] / total))


# ---------------------------------------------------------------- what each user adds
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ratings=st.lists(st.lists(st.sampled_from([1.0, 2.0, 3.0, 4.0, 5.0]), min_size=1, max_size=40),
                        min_size=1, max_size=6),
       round_=st.integers(1, 3), epsilon=st.sampled_from([0.0, 1.0, 2.0, 8.0]),
       clips=st.tuples(st.floats(0.25, 3.0), st.floats(0.04, 0.5)))
def test_each_users_scaled_statistics_stay_within_C(ratings, round_, epsilon, clips):
    """The bound DP rests on, on what is actually summed: every user's scaled blocks of any round, whatever its
    ratings and the clips the server set, have norm at most C = 1 before clipping (clipping changes nothing)."""
    from fedrec.datasets.partition import CohortData
    from fedrec.models.defaults import Hyper

    n_items = 50
    algorithm = DPStats(Hyper(model="dpstats", epsilon=epsilon), n_items, (1.0, 5.0))
    seg = np.concatenate([np.full(len(r), u) for u, r in enumerate(ratings)])
    item = np.concatenate([np.random.default_rng(u).permutation(n_items)[:len(r)] for u, r in enumerate(ratings)])
    empty = np.zeros(0, np.int64)
    rows = CohortData(np.arange(len(ratings)), seg, item, np.concatenate(ratings), empty, empty, np.zeros(0), None)
    shared = algorithm.init_server().broadcast()
    shared["clip"] = np.array(clips, np.float32)
    shared["item-bias"] = np.random.default_rng(1).normal(0, 1, n_items).astype(np.float32)
    _, contributions = algorithm.train({k: np.asarray(v) for k, v in shared.items()}, {}, rows, round_, None)
    assert float(contributions.user_norms().max()) <= DPStats.bounded_norm * (1 + 1e-6)


# ---------------------------------------------------------------- runs
def test_a_full_participation_distributed_run_holds_its_epsilon_against_the_server(tmp_path, monkeypatch):
    used = []  # each device's noise share, in the order the nodes built their uploads (3 nodes a round)

    def recording(sums, statistics, mode, noise_std=0.0, rng=None):
        used.append(noise_std)
        return build_upload(sums, statistics, mode, noise_std, rng)

    monkeypatch.setattr(device_module, "build_upload", recording)
    cfg = _cfg(tmp_path, dp="distributed", secure_aggregation="secagg+", target_epsilon=2.0)
    summary = run_server(InProcessGrid(client_app, 3), cfg).summary
    privacy = summary["privacy"]
    weights = DPStats.release_weights(2.0)
    assert summary["rounds"] == len(weights) == 2 and privacy["release_weights"] == pytest.approx(list(weights))
    assert privacy["epsilon_against_server"] == privacy["epsilon"] <= 2.0
    assert privacy["neighbouring_relation"].startswith("zero-out") and privacy["clipping_norm"] >= 1.0
    assert "chooses nobody" in privacy["against_server"]
    # each round's noise share follows its own z_r = z / sqrt(w_r)
    assert len(used) == 6 and len(set(used[:3])) == len(set(used[3:])) == 1 and used[0] > 0
    assert used[0] / used[3] == pytest.approx(math.sqrt(weights[1] / weights[0]), rel=1e-6)
    assert summary["metrics"]["rmse"] < 1.5


def test_settings_dpstats_cannot_honour_are_refused(tmp_path):
    for changes, message in ((dict(users_per_round=30), "refuses --users-per-round"),
                             (dict(dp="central", target_epsilon=1.0, clipping_norm=0.5), "leave --clipping-norm unset"),
                             (dict(update_mode="padded"), "refuses --update-mode padded")):
        with pytest.raises(ConfigError, match=message):
            _cfg(tmp_path, **changes).resolved().validate()
    with pytest.raises(ConfigError, match="refuses --dp local"):
        run_server(InProcessGrid(client_app, 2), _cfg(tmp_path, dp="local", target_epsilon=4.0))
    assert RunConfig(dp="local", target_epsilon=4.0, clipping_norm=0.1).resolved().model == "mf"  # --model auto


def test_federated_dpstats_without_noise_equals_its_prototype_rule(tmp_path):
    """Without DP the server's sums are exact: mu is the users' mean of their mean ratings."""
    cfg = _cfg(tmp_path)
    outcome = run_server(InProcessGrid(client_app, 2), cfg)
    split = load_data(cfg.resolved())
    means = np.bincount(split.train.user, split.train.rating) / np.bincount(split.train.user)
    assert outcome.model["global-bias"][0] == pytest.approx(np.clip(means - 3, -2, 2).mean() + 3, rel=1e-5)


# ---------------------------------------------------------------- attacks
def test_sum_recovery_fails_on_dpstats_under_distributed_dp_and_works_without_noise(tmp_path):
    """A server that knows every other user's ratings subtracts their statistics from the first round's SecAgg+
    sum: without noise it reads exactly which items each target rated (positive control); under distributed DP
    at epsilon 4 its claims, pooled over 10 targets, are about as good as guesses (chance: about the share of
    items a user rated, about 0.1 here; the bound leaves over 6 standard deviations)."""
    targets = list(range(10))
    plain = _cfg(tmp_path, secure_aggregation="secagg+")
    precision, claims = differencing_precision(plain, targets)
    assert precision == 1.0 and claims >= 50
    private = dataclasses.replace(plain, dp="distributed", target_epsilon=4.0, out=str(tmp_path / "private"))
    precision, claims = differencing_precision(private, targets)
    assert precision <= 0.35, (precision, claims)


def test_dpstats_device_step_adds_only_the_declared_statistics():
    cfg = RunConfig(dataset="synthetic", synthetic_users=30, synthetic_items=25, synthetic_density=0.3,
                    model="dpstats").resolved()
    split = load_data(cfg)
    algorithm = make_algorithm(cfg, split.n_items, split.rating_scale)
    policy = DevicePolicy(clipping_norm=1.0)
    users = np.arange(10)
    result = device_step(algorithm, algorithm.init_server().broadcast(), new_users(algorithm, users, 30, policy),
                         cohort(split, users), 1, policy, 0)
    assert set(result.upload) == {"item-weight", "item-offset", "globals"}
    assert not result.upload["item-offset"].any()  # round 1 releases weights and the globals only
    assert result.upload["globals"][1] > 0


# ---------------------------------------------------------------- canaries, through the real server and ClientApp
def _canaries(dp: str) -> dict:
    """dpstats' rounds (2 at epsilon 2, unequal weights), every user in each, zero-out; 3,000 canaries."""
    from fedrec.audit.canary import canary_audit

    cfg = RunConfig(model="dpstats", dp=dp, target_epsilon=2.0, accountant="rdp",
                    secure_aggregation="secagg+" if dp == "distributed" else "none")
    return canary_audit(cfg, n_items=1500, population=943, canaries=3000)


@pytest.mark.parametrize("dp", ["central", "distributed"])
def test_the_canary_bound_on_dpstats_stays_below_its_epsilon(dp):
    row = _canaries(dp)
    assert row["epsilon"] == pytest.approx(2.0, rel=1e-2) and row["rounds"] == 2 and row["relation"] == "zero-out"
    assert row["epsilon_lower"] <= row["epsilon"]


@pytest.mark.parametrize("dp", ["central", "distributed"])
def test_the_canary_bound_on_dpstats_exceeds_its_epsilon_when_the_noise_is_cut_tenfold(monkeypatch, dp):
    """Positive control: the noise cut tenfold where it is added (the server's sum, or each device's share) while
    the accountant is told the original z: the proven bound passes the reported epsilon."""
    from fedrec.privacy import upload as upload_module
    from fedrec.server import federation as federation_module

    if dp == "central":
        real = federation_module.add_central_noise
        monkeypatch.setattr(federation_module, "add_central_noise",
                            lambda arrays, std, rng: real(arrays, std / 10, rng))
    else:
        real = upload_module.add_device_noise
        monkeypatch.setattr(upload_module, "add_device_noise", lambda arrays, std, *rest: real(arrays, std / 10, *rest))
    row = _canaries(dp)
    assert row["epsilon_lower"] > row["epsilon"] == pytest.approx(2.0, rel=1e-2)
