"""Differential privacy: accounting against dp-accounting itself, the noise actually
added, clipping, configuration rules, reproducibility, and the budget stop."""

from __future__ import annotations

import dataclasses
import itertools

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from flwr.supercore.task_identity import TaskIdentity
from scipy import stats
from typer.testing import CliRunner

from fedrec.cli.main import cli
from fedrec.client.app import app as client_app
from fedrec.datasets import SyntheticSpec, cohort, generate
from fedrec.datasets.splits import random_holdout
from fedrec.privacy.accountant import PrivacyPlan
from fedrec.privacy.device import device_step, new_users
from fedrec.privacy.policy import DevicePolicy
from fedrec.run import schema
from fedrec.run.config import ConfigError, RunConfig
from fedrec.server.runner import privacy_plan, run_server
from fedrec.simulations.inprocess import InProcessGrid

from ..conftest import federation, mf_algorithm, mf_reply


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _rdp(event, rounds, delta, relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE):
    accountant = rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


def test_epsilon_matches_an_independent_dp_accounting_computation():
    poisson = PrivacyPlan("central", 1.1, 1.0, "poisson", 1000, 100_000, 1e-6, "rdp")
    expected = _rdp(dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(1.1)), 50, 1e-6)
    assert poisson.epsilon(50) == pytest.approx(expected, rel=1e-9)
    fixed = dataclasses.replace(poisson, sampling="fixed")
    expected = _rdp(dp_event.SampledWithoutReplacementDpEvent(100_000, 1000, dp_event.GaussianDpEvent(0.55)), 50, 1e-6,
                    dp_accounting.NeighboringRelation.REPLACE_ONE)
    assert fixed.epsilon(50) == pytest.approx(expected, rel=1e-9)
    local = dataclasses.replace(poisson, mode="local", noise_multiplier=8.0)
    expected = _rdp(dp_event.GaussianDpEvent(4.0), 7, 1e-6, dp_accounting.NeighboringRelation.REPLACE_ONE)
    assert local.epsilon(7) == pytest.approx(expected, rel=1e-9)
    assert dataclasses.replace(poisson, accountant="pld").epsilon(50) < poisson.epsilon(50)  # PLD is tighter


def test_epsilon_reported_by_a_run_agrees_with_dp_accounting(small_cfg):
    cfg = dataclasses.replace(small_cfg, dp="central", clipping_norm=0.5, noise_multiplier=1.3, users_per_round=15,
                              sampling="poisson", target_delta=1e-4, rounds=5)
    outcome = run_server(InProcessGrid(client_app, 2), cfg)
    privacy = outcome.summary["privacy"]
    expected = _rdp(dp_event.PoissonSampledDpEvent(15 / 60, dp_event.GaussianDpEvent(1.3)), 5, 1e-4)
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert privacy["unit"] == "user" and privacy["sampling_rate"] == pytest.approx(0.25)
    eps = [row["epsilon"] for row in outcome.history]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(expected, rel=1e-9)


def test_calibrated_noise_meets_the_target(small_cfg):
    cfg = dataclasses.replace(small_cfg, dp="central", clipping_norm=1.0, target_epsilon=4.0, users_per_round=10,
                              sampling="poisson", rounds=20).resolved()
    cfg, plan = privacy_plan(cfg, 60)
    assert cfg.noise_multiplier == plan.noise_multiplier > 0
    assert 3.9 < plan.epsilon(20) <= 4.0


def test_server_noise_has_the_configured_std():
    """Zero updates in: what comes out is the noise divided by the expected user count.
    Two-sided chi-square test on 64,000 coordinates; false-alarm rate 1e-6."""
    n_items, dim, z, clip, expected_users = 2000, 31, 1.7, 0.8, 50
    cfg = RunConfig(strategy="fedavg", server_lr=1.0, dp="central", noise_multiplier=z, clipping_norm=clip,
                    users_per_round=expected_users, sampling="poisson", seed=5)
    plan = PrivacyPlan("central", z, clip, "poisson", expected_users, 1000, 1e-5, "rdp")
    fed = federation(cfg, n_items, dim, 1000, plan, init_std=0.0)
    fed.state.params["global-bias"].zero_()
    fed.aggregate_train(1, [mf_reply(48, n_items, dim)])
    model = fed.state.model()
    noise = np.concatenate([model["item-emb"].ravel(), model["item-bias"]]).astype(np.float64)
    sigma = z * clip / expected_users
    n = len(noise)
    statistic = (noise**2).sum() / sigma**2  # chi-square with n degrees of freedom (mean known: 0)
    assert stats.chi2.ppf(0.5e-6, n) < statistic < stats.chi2.ppf(1 - 0.5e-6, n)
    assert abs(noise.mean()) < 6 * sigma / np.sqrt(n)


def test_every_users_upload_norm_is_at_most_the_clipping_norm(small_cfg):
    cfg = dataclasses.replace(small_cfg, clipping_norm=0.05, rounds=2, eval_every=2)
    grid = InProcessGrid(client_app, 60)  # one user per node: each reply is one user's update
    run_server(grid, cfg)
    norms = []
    for reply in grid.replies:
        if schema.ARRAYS in reply.content:
            record = reply.content[schema.ARRAYS]
            norms.append(np.sqrt(sum((record[k].numpy().astype(np.float64) ** 2).sum() for k in record.keys())))
    assert len(norms) == 120 and max(norms) <= 0.05 * (1 + 1e-5)
    assert np.median(norms) == pytest.approx(0.05, rel=1e-4)  # most users were clipped: C binds


@pytest.mark.parametrize("settings,message", [
    (dict(dp="central", clipping_norm=1.0), "needs --noise-multiplier > 0 or --target-epsilon"),
    (dict(dp="central", noise_multiplier=1.0, model="mf"), "needs --clipping-norm > 0"),
    (dict(dp="local", noise_multiplier=1.0, clipping_norm=0.0), "needs --clipping-norm > 0"),
    (dict(dp="none", noise_multiplier=1.0), "dp is 'none'"),
    (dict(dp="central", noise_multiplier=1.0, clipping_norm=1.0, target_delta=1.0), "target-delta"),
])
def test_non_private_settings_are_rejected_unless_dp_is_none(settings, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**settings).validate()
    RunConfig(dp="none", clipping_norm=1.0).validate()  # clipping alone is allowed


_RUN_DIRS = itertools.count()


def _central_dp_items(cfg, **changes):
    cfg = dataclasses.replace(cfg, **{"dp": "central", "clipping_norm": 0.3, "noise_multiplier": 0.8,
                                      "users_per_round": 20, "sampling": "poisson", "rounds": 3, **changes})
    cfg = dataclasses.replace(cfg, out=f"{cfg.out}-{next(_RUN_DIRS)}")  # a run directory is never reused
    return {k: torch.as_tensor(v) for k, v in run_server(InProcessGrid(client_app, 2), cfg).model.items()}


def test_reproducible_noise_repeats_a_dp_run_for_a_seed(small_cfg):
    a = _central_dp_items(small_cfg, reproducible_noise=True)
    b = _central_dp_items(small_cfg, reproducible_noise=True)
    c = _central_dp_items(small_cfg, reproducible_noise=True, seed=9)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert not torch.allclose(a["item-emb"], c["item-emb"])


def test_dp_noise_is_fresh_by_default_even_for_the_same_seed(small_cfg):
    # The seed is public (config.toml, summary.json): noise derived from it would hide nothing.
    # Everyone takes part each round, so only the noise can tell the two runs apart.
    a, b = _central_dp_items(small_cfg, users_per_round=0), _central_dp_items(small_cfg, users_per_round=0)
    assert not torch.allclose(a["item-emb"], b["item-emb"])


@pytest.mark.parametrize("settings,message", [
    (dict(dp="local", update_mode="sparse"), "use --update-mode dense"),
    (dict(dp="local", update_mode="padded"), "use --update-mode dense"),
    (dict(dp="central", accountant="pld", sampling="fixed", users_per_round=10), "use --sampling poisson"),
])
def test_settings_whose_guarantee_would_be_false_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(noise_multiplier=1.0, clipping_norm=0.1, **settings).validate()


def test_pld_with_poisson_sampling_and_dense_local_dp_are_accepted():
    RunConfig(dp="central", accountant="pld", sampling="poisson", noise_multiplier=1.0, clipping_norm=0.1).validate()
    RunConfig(dp="local", update_mode="dense", noise_multiplier=1.0, clipping_norm=0.1).validate()


def test_cli_refuses_local_dp_with_sparse_uploads_in_one_line():
    result = CliRunner().invoke(cli, ["simulate", "--dp", "local", "--update-mode", "sparse", "--clipping-norm", "0.1",
                                      "--noise-multiplier", "1"])
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert len(output.splitlines()) == 1 and "--update-mode dense" in output and "Traceback" not in output


def test_device_enforces_its_participation_cap():
    """A device counts its own rounds: past `max_rounds` its user trains and contributes
    nothing, whatever the server asks."""
    split = random_holdout(generate(SyntheticSpec(users=20, items=30, density=0.3, seed=4))[0], 0.2, 4)
    algorithm = mf_algorithm(split.n_items, 4, local_epochs=2, seed=1)  # 2 Adam steps per round: the cap counts rounds
    policy = DevicePolicy(max_rounds=2, noise_std=0.5, clipping_norm=0.1, reproducible_seed=None)
    model = algorithm.init_server("fedavg", 1.0).broadcast()
    state = new_users(algorithm, np.array([3]), split.n_users, policy)
    results = []
    for round_ in (1, 2, 3):
        results.append(device_step(algorithm, model, state, cohort(split, [3]), round_, policy, seed=1))
        state = results[-1].state
    assert [r.took_part.tolist() for r in results] == [[True], [True], [False]]
    assert all(float(r.sums.arrays["item-emb"].abs().sum()) > 0 for r in results[:2])
    capped = results[2].sums
    assert capped.num_users == 0 and capped.num_rows == 0
    for delta in capped.arrays.values():
        assert float(delta.abs().sum()) == 0
    torch.testing.assert_close(results[2].state["emb"], results[1].state["emb"], rtol=0, atol=0)  # no training


def test_budget_stop_ends_training_before_the_target_is_exceeded(small_cfg):
    cfg = dataclasses.replace(small_cfg, dp="central", clipping_norm=0.3, noise_multiplier=0.9, target_epsilon=6.0,
                              users_per_round=30, sampling="poisson", rounds=40, eval_every=5, target_delta=1e-3)
    outcome = run_server(InProcessGrid(client_app, 2), cfg)
    done = outcome.summary["privacy"]["rounds"]
    plan = PrivacyPlan("central", 0.9, 0.3, "poisson", 30, 60, 1e-3, "rdp")
    assert 0 < done < 40 and "stopped_early" in outcome.summary
    assert plan.epsilon(done) <= 6.0 < plan.epsilon(done + 1)
    assert outcome.summary["privacy"]["epsilon"] <= 6.0
    assert "rmse" in outcome.summary["metrics"]  # the model as it stands is still evaluated


def test_local_dp_reports_per_round_and_composed_epsilon(small_cfg):
    cfg = dataclasses.replace(small_cfg, dp="local", clipping_norm=0.2, noise_multiplier=6.0, users_per_round=30,
                              rounds=4)
    privacy = run_server(InProcessGrid(client_app, 2), cfg).summary["privacy"]
    plan = PrivacyPlan("local", 6.0, 0.2, "fixed", 30, 60, cfg.target_delta, "rdp")
    assert privacy["epsilon_per_round"] == pytest.approx(plan.epsilon(1))
    assert 1 <= privacy["max_rounds_per_user"] <= 4
    assert privacy["epsilon_at_cap"] == pytest.approx(plan.epsilon(privacy["max_rounds_per_user"]))
    # the most active user's rounds, at most the cap (sampling is private: ~2% of runs leave every user below it)
    composed = [plan.epsilon(k) for k in range(1, privacy["max_rounds_per_user"] + 1)]
    assert min(abs(privacy["epsilon"] - e) for e in composed) <= 1e-9 * composed[-1]
