"""BPMF (--model bpmf): the device's draws follow the exact conditional, the statistics the
server sums rebuild the items' conditional, each user's statistics are clipped on what is
summed, one plain upload gives the user's vector away (why it needs SecAgg+ or DP), and a
whole federated run equals its central twin."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Array

from fedrec.client.app import app as client_app
from fedrec.datasets import SyntheticSpec, cohort, generate
from fedrec.datasets.splits import random_holdout
from fedrec.models.bpmf import (
    BPMF,
    ITEM_GRAM,
    ITEM_RHS,
    BPMFContributions,
    _batch,
    draw_items,
    draw_key,
    draw_users,
)
from fedrec.models.defaults import Hyper
from fedrec.models.factors import ItemParams
from fedrec.models.mf import MF
from fedrec.privacy.device import device_step, new_users
from fedrec.privacy.policy import DevicePolicy
from fedrec.privacy.upload import scatter
from fedrec.run.config import ConfigError
from fedrec.server.runner import run_server
from fedrec.simulations.central import run_central
from fedrec.simulations.inprocess import InProcessGrid

DIM = 3
SPLIT = random_holdout(generate(SyntheticSpec(users=50, items=30, density=0.3, seed=7))[0], 0.2, 7)


def _items(n_items: int, seed: int = 1, scale: float = 0.7) -> ItemParams:
    gen = torch.Generator().manual_seed(seed)
    return ItemParams(torch.randn(n_items, DIM, generator=gen) * scale, torch.randn(n_items, generator=gen) * 0.3,
                      torch.tensor([3.0]))


def _bpmf(hyper: Hyper, split=SPLIT) -> BPMF:
    return BPMF(hyper, split.n_items, split.rating_scale)


def _step(algorithm, users, round_, policy=None, rows=None):
    """A device round of `users` from a fresh start against the algorithm's starting items."""
    policy = policy or DevicePolicy()
    rows = rows if rows is not None else cohort(SPLIT, np.asarray(users))
    shared = algorithm.init_server("fedavg", 1.0).broadcast()
    return device_step(algorithm, shared, new_users(algorithm, np.asarray(users), SPLIT.n_users, policy), rows, round_,
                       policy, algorithm.settings.seed)


def test_a_users_draws_follow_its_exact_conditional():
    hyper = Hyper(model="bpmf", dim=DIM, reg_user=2.0, reg_bias=0.5, bpmf_alpha=1.5)
    items = _items(6)
    item = torch.tensor([0, 2, 3, 5])
    rating = torch.tensor([4.0, 2.0, 5.0, 3.0], dtype=torch.float64)
    g = torch.cat([items.emb[item].double(), torch.ones(4, 1, dtype=torch.float64)], dim=1)
    precision = torch.diag(torch.tensor([2.0] * DIM + [0.5], dtype=torch.float64)) + 1.5 * g.T @ g
    cov = torch.linalg.inv(precision)
    mean = cov @ (1.5 * g.T @ (rating - 3.0 - items.bias[item].double()))
    draws = torch.stack([draw_users(items, torch.zeros(4, dtype=torch.long), item, rating, np.array([9]), hyper,
                                    key)[0] for key in range(4000)])
    torch.testing.assert_close(draws.mean(0), mean, atol=4 * float(cov.diagonal().max().sqrt()) / 63, rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), cov, atol=0.1 * float(cov.diagonal().max()), rtol=0)
    model = items.tensors()  # what a device (or the demo page) scores with
    fit = BPMF(hyper, 6, (1.0, 5.0)).fit_user(model, item.numpy(), rating.numpy())
    torch.testing.assert_close(torch.cat([fit.emb[0], fit.bias]).double(), mean, atol=1e-5, rtol=0)


def test_the_summed_statistics_rebuild_the_items_that_explain_the_ratings():
    """Ratings generated exactly by known items: with a tiny noise variance the item draw from the
    summed uploads of all users is those items (every packed column is used, and used right)."""
    hyper = Hyper(model="bpmf", dim=DIM, bpmf_alpha=1e6)
    n_users, n_items = 40, 8
    truth = _items(n_items, seed=2)
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(n_users, DIM, generator=gen), torch.randn(n_users, 1, generator=gen) * 0.2], 1).double()
    segment = torch.arange(n_users).repeat_interleave(n_items)
    item = torch.arange(n_items).repeat(n_users)
    rating = (3.0 + x[segment, DIM] + truth.bias[item].double()
              + (x[segment, :DIM] * truth.emb[item].double()).sum(1))
    bpmf = BPMF(hyper, n_items, (1.0, 5.0))
    statistics = BPMFContributions(_batch(_items(n_items, seed=5), segment, item, rating, n_users), x, hyper)
    sums = statistics.summed(torch.ones(n_users, dtype=torch.float64), bpmf.statistics(), n_items)
    drawn = draw_items(_items(n_items, seed=5), sums[ITEM_GRAM], sums[ITEM_RHS], hyper, np.random.default_rng(0))
    torch.testing.assert_close(drawn.emb, truth.emb, atol=2e-3, rtol=0)
    torch.testing.assert_close(drawn.bias, truth.bias, atol=2e-3, rtol=0)


@pytest.mark.parametrize("scale", [50.0, 1e20])
def test_indefinite_or_huge_sums_give_finite_items_not_a_crash(scale):
    """Red-team finding: one hostile reply of ~1e20 (finite float32, accepted without clipping) made the
    Cholesky factor of an item's precision fail and the server crash; the draw now works in the eigenbasis."""
    hyper = Hyper(model="bpmf", dim=DIM)
    gen = torch.Generator().manual_seed(4)
    widths = BPMF(hyper, 10, (1.0, 5.0)).statistics()
    gram = torch.randn(10, widths[ITEM_GRAM].width, generator=gen, dtype=torch.float64) * scale  # no signal
    rhs = torch.randn(10, widths[ITEM_RHS].width, generator=gen, dtype=torch.float64) * scale
    drawn = draw_items(_items(10), gram, rhs, hyper, np.random.default_rng(1))
    assert torch.isfinite(drawn.emb).all() and torch.isfinite(drawn.bias).all()


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_each_users_statistics_are_clipped_and_a_cohort_sums_them(mode):
    bpmf = _bpmf(Hyper(model="bpmf", dim=DIM, seed=3))
    clip = 2.0
    policy = DevicePolicy(update_mode=mode, clipping_norm=clip)
    singles, clipped = [], 0
    for user in range(8):
        result = _step(bpmf, [user], 4, policy)
        dense = scatter(result.upload, bpmf.statistics(), SPLIT.n_items)
        norm = float(np.sqrt(sum((a.astype(np.float64) ** 2).sum() for a in dense.values())))
        assert norm <= clip * (1 + 1e-5)
        np.testing.assert_allclose(norm, min(float(result.sums.norms[0][0]), clip), rtol=1e-4)
        clipped += float(result.sums.norms[0][0]) > clip
        rated = cohort(SPLIT, np.array([user])).train_item
        assert set(np.flatnonzero(np.abs(dense[ITEM_GRAM]).sum(1))) == set(rated.tolist())
        singles.append(dense)
    assert clipped >= 2  # the bound is exercised
    together = _step(bpmf, np.arange(8), 4, policy)
    for key, value in scatter(together.upload, bpmf.statistics(), SPLIT.n_items).items():
        np.testing.assert_allclose(value, sum(s[key] for s in singles), atol=1e-6 * clip, err_msg=key)


def test_one_plain_upload_gives_the_users_vector_and_residuals_away():
    """docs/privacy.md's warning, attacked: without SecAgg+ or DP the server reads (p_u, 1) off the last
    column of any uploaded g g^T, and alpha (r - mu - b_u) off the item-bias column."""
    hyper = Hyper(model="bpmf", dim=DIM, seed=3)
    bpmf = _bpmf(hyper)
    items = ItemParams.from_arrays(bpmf.init_server().broadcast())
    rows = cohort(SPLIT, np.array([5]))
    upload = _step(bpmf, [5], 21, DevicePolicy(update_mode="sparse")).upload
    upper = np.triu_indices(DIM + 1)
    last_column = [k for k, (i, j) in enumerate(zip(*upper)) if j == DIM]  # entries (0..DIM, DIM)
    row = upload[ITEM_GRAM][0]
    vector = row[last_column][:DIM] / row[last_column][DIM]  # alpha p_u / alpha
    drawn = draw_users(items, torch.zeros(len(rows.train_item), dtype=torch.long), torch.as_tensor(rows.train_item),
                       torch.as_tensor(rows.train_rating, dtype=torch.float64), rows.users, hyper,
                       draw_key(hyper.seed, 21))[0]
    np.testing.assert_allclose(vector, drawn[:DIM].numpy(), rtol=1e-4, atol=1e-5)
    order = np.argsort(rows.train_item)
    residual = upload[ITEM_RHS][:, DIM] / hyper.bpmf_alpha  # r - mu - b_u, one per rated item
    np.testing.assert_allclose(residual, rows.train_rating[order] - 3.0 - float(drawn[DIM]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("settings,message", [
    ({"split": "loo"}, "models ratings"), ({"update_mode": "padded"}, "no decoys"),
    ({"users_per_round": 10}, "every user"), ({"sampling": "poisson"}, "every user"),
    ({"dp": "central", "clipping_norm": 1.0, "noise_multiplier": 1.0}, "does not hold up to DP noise"),
    ({"secure_aggregation": "secagg+", "clipping_norm": 1.0}, "reads users off it")])
def test_settings_bpmf_cannot_honour_are_refused(small_cfg, settings, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(small_cfg, model="bpmf", **settings).validate()


def test_federated_bpmf_equals_central_and_scores_with_the_mean_of_its_draws(small_cfg):
    # 30 rounds: a draw that hung on float rounding (eigenvector signs) once split the two chains
    cfg = dataclasses.replace(small_cfg, model="bpmf", rounds=30, epochs=30, burn_in=3, eval_every=15)
    federated = run_server(InProcessGrid(client_app, 3), cfg)
    central = run_central(dataclasses.replace(cfg, out=cfg.out + "-central"))
    assert federated.summary["metrics"]["rmse"] == pytest.approx(central.summary["metrics"]["rmse"], rel=1e-4)
    for name, value in federated.model.items():
        torch.testing.assert_close(torch.as_tensor(value), torch.as_tensor(central.result.model[name]), rtol=1e-3,
                                   atol=1e-4)
    # What is evaluated is the mean of draws 4..30; with burn-in 30 it would be the last draw alone (the
    # algorithm itself: a run caps its burn-in at half its rounds, run/build.burn_in).
    from fedrec.models.central import train_central
    from fedrec.run.build import hyper, load_data

    split = load_data(cfg)
    rows = cohort(split, np.arange(split.n_users))
    averaged, last = (train_central(BPMF(dataclasses.replace(hyper(cfg), burn_in=b), split.n_items,
                                         split.rating_scale), rows, split.n_users, 30, eval_every=30)
                      for b in (3, 30))
    assert averaged.metrics["rmse"] < last.metrics["rmse"] - 1e-3


def test_a_cohort_drawn_a_chunk_at_a_time_gives_the_same_state_and_sums(monkeypatch):
    import fedrec.models.train as training

    bpmf = _bpmf(Hyper(model="bpmf", dim=DIM, seed=3, burn_in=0))
    policy = DevicePolicy(clipping_norm=2.0)
    whole = _step(bpmf, np.arange(11), 5, policy)
    monkeypatch.setattr(training, "USERS_PER_CHUNK", 3)
    chunked = _step(bpmf, np.arange(11), 5, policy)
    for name, value in whole.state.items():
        torch.testing.assert_close(chunked.state[name], value)
    for key, value in whole.upload.items():
        np.testing.assert_allclose(chunked.upload[key], value, rtol=1e-6, atol=1e-6, err_msg=key)
    torch.testing.assert_close(torch.cat(chunked.sums.norms), torch.cat(whole.sums.norms))


@pytest.mark.parametrize("settings,model", [
    ({}, "bpmf"), ({"split": "loo"}, "mf"), ({"users_per_round": 10}, "mf"), ({"sampling": "poisson"}, "mf"),
    ({"dp": "central", "clipping_norm": 1.0, "noise_multiplier": 1.0}, "mf"), ({"update_mode": "padded"}, "mf"),
    ({"secure_aggregation": "secagg+", "clipping_norm": 1.0}, "mf"), ({"robust_aggregation": "none"}, "bpmf"),
    ({"clipping_norm": 0.05}, "mf")])
def test_auto_runs_bpmf_only_where_it_applies(small_cfg, settings, model):
    cfg = dataclasses.replace(small_cfg, model="auto", dim=-1, reg_user=-1.0, **settings).resolved().validate()
    assert cfg.model == model
    assert cfg.dim == (10 if model == "bpmf" else 32)
    assert cfg.reg_user == (10.0 if model == "bpmf" else (0.01 if cfg.implicit else 0.1))


def test_a_plain_first_round_mf_upload_gives_the_users_vector_and_ratings_away_too():
    """Why BPMF's plain upload is not a step back (docs/privacy.md): with one local epoch, an MF item row's change
    is -lr (2 reg q_i + 2 err_i p_u) and its bias change -lr (2 err_i + 2 reg b_i), so the server divides
    out p_u and err_i; in a user's first round b_u = 0, so every rating follows exactly."""
    hyper = Hyper(model="mf", dim=4, lr=0.05, seed=3)
    mf = MF(hyper, SPLIT.n_items, SPLIT.rating_scale)
    shared = mf.init_server().broadcast()
    shared["item-bias"][:] = np.random.default_rng(0).normal(0, 0.3, SPLIT.n_items)
    rows = cohort(SPLIT, np.array([5]))
    policy = DevicePolicy(update_mode="sparse", private_randomness=True)  # a private start
    state = new_users(mf, np.array([5]), SPLIT.n_users, policy)
    upload = device_step(mf, shared, state, rows, 1, policy, hyper.seed).upload
    index = upload["item-index"]
    q, b = shared["item-emb"][index].astype(np.float64), shared["item-bias"][index].astype(np.float64)
    err = (-upload["item-bias"][:, 0] / hyper.lr - 2 * hyper.reg_bias * b) / 2
    err_p = (-upload["item-emb"] / hyper.lr - 2 * hyper.reg_item * q) / 2
    vector = np.median(err_p / err[:, None], axis=0)
    np.testing.assert_allclose(vector, state["emb"][0].numpy(), rtol=1e-3, atol=1e-4)
    ratings = 3.0 + b + q @ vector - err
    order = np.argsort(rows.train_item)
    np.testing.assert_allclose(ratings, rows.train_rating[order], atol=1e-3)


class _RightHandSideOnly(InProcessGrid):
    """Node 0's replies keep their right-hand sides and drop their g g^T: a pull with no precision."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if reply.metadata.src_node_id == min(self.contexts) and "arrays" in reply.content:
                record = reply.content["arrays"]
                record[ITEM_GRAM] = Array(np.zeros_like(record[ITEM_GRAM].numpy()))
        return replies


DIM_OF_RUN = 8


@pytest.mark.parametrize("attack", ["negated", "scaled 1e20", "right-hand side only"])
def test_statistics_no_users_could_sum_to_are_rejected_before_the_draw(small_cfg, attack):
    """Red-team findings: a negated g g^T cancelled honest raters' precision; a reply scaled 1e20 and one
    with a right-hand side but no g g^T moved items without bound and crashed a later draw. Each is
    refused (robust aggregation off, no clipping: nothing else stands in the way)."""
    from fedrec.audit.poisoning import HostileClientApp

    cfg = dataclasses.replace(small_cfg, model="bpmf", rounds=3, eval_every=3, robust_aggregation="none")
    assert cfg.dim == DIM_OF_RUN
    if attack == "right-hand side only":
        grid = _RightHandSideOnly(client_app, 6)
    else:
        grid = InProcessGrid(HostileClientApp(client_app, {0}, -1.0 if attack == "negated" else 1e20), 6)
    outcome = run_server(grid, cfg)
    rejected = [line for line in outcome.audit if line.get("dropped") == "rejected"]
    assert len(rejected) == 3 and all("not a sum of users' statistics" in line["reason"] for line in rejected)
    assert outcome.summary["metrics"]["rmse"] < 1.2


@pytest.mark.parametrize("users_per_round,model", [(0, "bpmf"), (30, "mf")])
def test_compare_runs_the_same_model_on_both_sides(small_cfg, users_per_round, model):
    """Regression: under --model auto, the central trainer (which resets --users-per-round, a setting
    it does not read) ran BPMF beside a federated MF in `make demo`."""
    from fedrec.experiments.compare import run_compare

    seen = {}

    def central(cfg):
        outcome = run_central(cfg, write=False)
        seen["central"] = outcome.summary["config"]["model"]
        return outcome

    def federated(cfg):
        seen["federated"] = cfg.resolved().model
        raise RuntimeError("the sides' models are all this test needs")

    with pytest.raises(RuntimeError):
        run_compare(dataclasses.replace(small_cfg, model="auto", users_per_round=users_per_round), central, federated)
    assert seen == {"central": model, "federated": model}


def test_with_the_public_draws_one_plain_upload_gives_every_rating_away():
    """docs/privacy.md's b_u sentence, attacked: the server knows the items it sent and the user's normals
    (draw_key from the run seed), so the device's draw x = P^-1 rhs(b_u) + L^-T z is linear in the one
    unknown b_u = x's last entry; with r - mu - b_u read off the upload, every rating follows."""
    from fedrec.models.bpmf import normal_draws

    hyper = Hyper(model="bpmf", dim=DIM, seed=3)
    bpmf = _bpmf(hyper)
    shared = bpmf.init_server().broadcast()
    shared["item-bias"][:] = np.random.default_rng(0).normal(0, 0.3, SPLIT.n_items)
    items = ItemParams.from_arrays(shared)
    rows = cohort(SPLIT, np.array([5]))
    policy = DevicePolicy(update_mode="sparse")
    upload = device_step(bpmf, shared, new_users(bpmf, np.array([5]), SPLIT.n_users, policy), rows, 21, policy,
                         hyper.seed).upload
    rated = torch.as_tensor(upload["item-index"])  # the rated set, in the clear
    residual = torch.as_tensor(upload[ITEM_RHS][:, DIM]).double() / hyper.bpmf_alpha  # r - mu - b_u
    g = torch.cat([items.emb[rated].double(), torch.ones(len(rated), 1, dtype=torch.float64)], dim=1)
    prior = torch.tensor([hyper.reg_user] * DIM + [hyper.reg_bias], dtype=torch.float64)
    precision = torch.diag(prior) + hyper.bpmf_alpha * g.T @ g
    known = hyper.bpmf_alpha * g.T @ (residual - items.bias[rated].double())  # rhs = known + b_u * per_bias
    per_bias = hyper.bpmf_alpha * g.sum(dim=0)
    z = normal_draws(np.array([5]), DIM + 1, draw_key(hyper.seed, 21))[0]
    noise = torch.linalg.solve_triangular(torch.linalg.cholesky(precision).mT, z[:, None], upper=True)[:, 0]
    a, beta = torch.linalg.solve(precision, known)[DIM], torch.linalg.solve(precision, per_bias)[DIM]
    bias = (a + noise[DIM]) / (1 - beta)  # b_u = a + beta b_u + noise_K
    order = np.argsort(rows.train_item)
    np.testing.assert_allclose((residual + 3.0 + bias).numpy(), rows.train_rating[order], atol=1e-3)
