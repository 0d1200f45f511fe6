"""SVD++ (--model svdpp): the local step against autograd, the privacy shape of its upload,
scoring, the device-side fit, and a whole federated run equal to its central twin."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedrec.client.app import app as client_app
from fedrec.datasets import SyntheticSpec, cohort, generate
from fedrec.datasets.splits import leave_one_out, random_holdout
from fedrec.models.defaults import Hyper
from fedrec.models.factors import ItemParams, Users, predict
from fedrec.models.svdpp import ITEM_Y, SVDPP
from fedrec.privacy.device import device_step, new_users
from fedrec.privacy.policy import UPDATE_MODES, DevicePolicy
from fedrec.privacy.upload import scatter
from fedrec.run.config import ConfigError
from fedrec.server.runner import run_server
from fedrec.simulations.central import run_central
from fedrec.simulations.inprocess import InProcessGrid

USERS, ITEMS, DIM = 4, 7, 3
RATINGS = generate(SyntheticSpec(users=40, items=25, density=0.3, seed=5))[0]
SPLIT = random_holdout(RATINGS, 0.2, 5)


def _hyper(implicit: bool, epochs: int = 1) -> Hyper:
    return Hyper(model="svdpp", dim=DIM, reg_user=0.13, reg_item=0.21, reg_bias=0.07, lr=0.05, local_epochs=epochs,
                 implicit=implicit)


def _batch(implicit: bool):
    """SVD++'s shared arrays [q | y] as one table (the loss below reads them so), the users, rows."""
    gen = torch.Generator().manual_seed(3)
    torch.set_default_dtype(torch.float64)
    items = ItemParams(torch.randn(ITEMS, 2 * DIM, generator=gen) * 0.5, torch.randn(ITEMS, generator=gen) * 0.3,
                       torch.tensor([0.0 if implicit else 3.5]))
    state = {"emb": torch.randn(USERS, DIM, generator=gen), "bias": torch.randn(USERS, generator=gen) * 0.2,
             "m": torch.zeros(USERS, DIM + 1), "v": torch.zeros(USERS, DIM + 1), "step": torch.zeros(USERS)}
    segment = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    item = torch.tensor([0, 1, 2, 1, 3, 0, 2, 5, 6, 1])
    if implicit:
        target = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    else:
        target = torch.randint(1, 6, (len(segment),), generator=gen).double()
    return items, state, segment, item, target


def _shared(items: ItemParams) -> dict[str, torch.Tensor]:
    return {"item-emb": items.emb[:, :DIM], "item-bias": items.bias, "global-bias": items.global_bias,
            ITEM_Y: items.emb[:, DIM:]}


def _fit(items, state, segment, item, target, hyper):
    """SVD++'s round on these rows: the new state and each statistic summed over users."""
    svdpp = SVDPP(hyper, ITEMS, (1.0, 5.0))
    new, contributions = svdpp.fit_rows(_shared(items), state, segment, item, target, None, USERS)
    return new, contributions.summed(torch.ones(USERS, dtype=torch.float64), svdpp.statistics(), ITEMS)


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    yield
    torch.set_default_dtype(previous)


def _loss(items, emb, bias, segment, item, target, hyper, rows_q, rows_y):
    """Every user's SVD++ loss at its own copies of the rows it touches: the data loss on
    mu + b_u + b_i + (p_u + |N(u)|^-1/2 sum_{j in N(u)} y_j) . q_i, L2 per row as in MF,
    plus reg_item |y_j|^2 for each j in N(u) (the positive rows)."""
    member = (target > 0) if hyper.implicit else torch.ones(len(item), dtype=torch.bool)
    counts = torch.bincount(segment[member], minlength=USERS).clamp(min=1).double()
    y_sum = torch.zeros(USERS, DIM).index_add(0, segment[member], rows_y[member]) / counts.sqrt()[:, None]
    p = emb[segment] + y_sum[segment]
    pred = items.global_bias + bias[segment] + items.bias[item] + (p * rows_q).sum(dim=1)
    if hyper.implicit:
        data = torch.nn.functional.binary_cross_entropy_with_logits(pred, target, reduction="none")
    else:
        data = (pred - target) ** 2
    reg = (hyper.reg_user * (emb[segment] ** 2).sum(1) + hyper.reg_bias * bias[segment] ** 2
           + hyper.reg_item * (rows_q ** 2).sum(1) + hyper.reg_bias * items.bias[item] ** 2
           + hyper.reg_item * (rows_y ** 2).sum(1) * member)
    return (data + reg).sum()


@pytest.mark.parametrize("implicit", [False, True], ids=["ratings", "implicit"])
def test_one_local_step_is_the_autograd_gradient_of_the_svdpp_loss(float64, implicit):
    items, state, segment, item, target = _batch(implicit)
    hyper = _hyper(implicit)
    _, sums = _fit(items, state, segment, item, target, hyper)
    rows_q = items.emb[item, :DIM].clone().requires_grad_()
    rows_y = items.emb[item, DIM:].clone().requires_grad_()
    g_q, g_y = torch.autograd.grad(_loss(items, state["emb"], state["bias"], segment, item, target, hyper, rows_q,
                                         rows_y), [rows_q, rows_y])
    torch.testing.assert_close(sums["item-emb"], torch.zeros(ITEMS, DIM).index_add_(0, item, -hyper.lr * g_q),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sums[ITEM_Y], torch.zeros(ITEMS, DIM).index_add_(0, item, -hyper.lr * g_y),
                               rtol=1e-10, atol=1e-12)
    if implicit:  # negatives are not in N(u): their y rows do not move
        assert torch.all(sums[ITEM_Y][4] == 0) and torch.all(sums[ITEM_Y][3] == 0)


@pytest.mark.parametrize("implicit", [False, True], ids=["ratings", "implicit"])
def test_the_users_own_step_is_the_autograd_gradient_too(float64, implicit, monkeypatch):
    import fedrec.models.mf as mf_module

    items, state, segment, item, target = _batch(implicit)
    hyper = _hyper(implicit)
    seen = []
    original = mf_module._adam_rows
    monkeypatch.setattr(mf_module, "_adam_rows",
                        lambda st, grad, lr: (seen.append(grad.clone()), original(st, grad, lr)))
    _fit(items, state, segment, item, target, hyper)
    emb, bias = state["emb"].clone().requires_grad_(), state["bias"].clone().requires_grad_()
    g_emb, g_bias = torch.autograd.grad(_loss(items, emb, bias, segment, item, target, hyper, items.emb[item, :DIM],
                                              items.emb[item, DIM:]), [emb, bias])
    torch.testing.assert_close(seen[0], torch.cat([g_emb, g_bias[:, None]], dim=1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", [m for m in UPDATE_MODES if m != "padded"])
@pytest.mark.parametrize("implicit", [False, True], ids=["ratings", "implicit"])
def test_each_users_svdpp_upload_is_clipped_on_what_is_summed(mode, implicit):
    split = leave_one_out(RATINGS, 5, 1) if implicit else SPLIT
    hyper = Hyper(model="svdpp", dim=4, lr=0.5, implicit=implicit, train_negatives=2, local_epochs=2, seed=2)
    clip = 0.05
    policy = DevicePolicy(update_mode=mode, clipping_norm=clip, reproducible_seed=9)
    svdpp = SVDPP(hyper, split.n_items, split.rating_scale)
    shared = svdpp.init_server().broadcast()
    shared[ITEM_Y][:] = 0.3  # y away from its zero start, so its rows carry weight
    singles = []
    for user in range(6):
        state = new_users(svdpp, np.array([user]), split.n_users, policy)
        result = device_step(svdpp, shared, state, cohort(split, np.array([user])), 3, policy, hyper.seed)
        dense = scatter(result.upload, svdpp.statistics(), split.n_items)
        norm = float(np.sqrt(sum((a.astype(np.float64) ** 2).sum() for a in dense.values())))
        assert norm <= clip * (1 + 1e-5)
        np.testing.assert_allclose(norm, min(float(result.sums.norms[0][0]), clip), rtol=1e-4)
        touched = np.flatnonzero(np.abs(dense[ITEM_Y]).sum(1) > 0)
        rated = cohort(split, np.array([user])).train_item
        assert set(touched) <= set(rated.tolist())  # y rows move for the user's own N(u) only
        singles.append(dense)
    state = new_users(svdpp, np.arange(6), split.n_users, policy)
    together = device_step(svdpp, shared, state, cohort(split, np.arange(6)), 3, policy, hyper.seed)
    dense = scatter(together.upload, svdpp.statistics(), split.n_items)
    for key, value in dense.items():
        np.testing.assert_allclose(value, sum(s[key] for s in singles), atol=1e-6 * clip, err_msg=key)


def test_padded_uploads_are_refused_under_svdpp(small_cfg):
    """Decoys would not hide the ratings: every row's y step is |N(u)|^-1/2 sum over the REAL rows of
    dloss q_i, so the server can solve for the subset of rows that sums to it (the red-team review
    recovered the exact rated set of users with <= 48 ratings on ML-100K)."""
    with pytest.raises(ConfigError, match="svdpp refuses --update-mode padded"):
        dataclasses.replace(small_cfg, model="svdpp", update_mode="padded").validate()
    svdpp = SVDPP(Hyper(model="svdpp", dim=4, seed=2), SPLIT.n_items, SPLIT.rating_scale)
    rows = cohort(SPLIT, np.arange(2))
    policy = DevicePolicy(update_mode="padded", reproducible_seed=4)
    with pytest.raises(ValueError, match="padded uploads with SVD\\+\\+"):
        device_step(svdpp, svdpp.init_server().broadcast(), new_users(svdpp, np.arange(2), SPLIT.n_users, policy),
                    rows, 1, policy, 2)


def test_scoring_adds_the_implicit_part_of_the_rated_items():
    svdpp = SVDPP(Hyper(model="svdpp", dim=4, seed=1), SPLIT.n_items, SPLIT.rating_scale)
    model = {k: torch.as_tensor(v) for k, v in svdpp.init_server().model().items()}
    model[ITEM_Y] = torch.randn(SPLIT.n_items, 4)
    rows = cohort(SPLIT, np.arange(3))
    state = svdpp.new_users(np.arange(3), SPLIT.n_users, None)
    view_items, view_users = svdpp.view(model, state, rows)
    user, item = int(rows.test_segment[0]), int(rows.test_item[0])
    rated = rows.train_item[rows.train_segment == user]
    vector = state["emb"][user] + model[ITEM_Y][rated].sum(0) / len(rated) ** 0.5
    expected = model["global-bias"] + state["bias"][user] + model["item-bias"][item] + vector @ model["item-emb"][item]
    got = predict(view_items, view_users, torch.tensor([user]), torch.tensor([item]))
    torch.testing.assert_close(got, expected.reshape(1))
    plain = svdpp.evaluate(model, state, rows, 10)
    dropped_y = svdpp.evaluate({**model, ITEM_Y: torch.zeros_like(model[ITEM_Y])}, state, rows, 10)
    assert plain["sse"] != pytest.approx(dropped_y["sse"])  # the y part is scored, not ignored


def test_the_device_fit_is_the_minimum_with_the_implicit_part_fixed():
    svdpp = SVDPP(Hyper(model="svdpp", dim=4, reg_user=0.1, reg_bias=0.01, seed=1), SPLIT.n_items, SPLIT.rating_scale)
    model = {k: torch.as_tensor(v) for k, v in svdpp.init_server().model().items()}
    model[ITEM_Y] = torch.randn(SPLIT.n_items, 4) * 0.3
    item, rating = np.array([1, 4, 7, 9]), np.array([5.0, 1.0, 4.0, 2.0])
    fit = svdpp.fit_user(model, item, rating)
    y_part = model[ITEM_Y][item].sum(0).double() / 2.0
    q, b_i, mu = model["item-emb"].double(), model["item-bias"].double(), model["global-bias"].double()

    def objective(p, b):
        pred = mu + b_i[item] + b + q[item] @ (p + y_part)
        return float(((pred - torch.as_tensor(rating)) ** 2).sum() + 4 * (0.1 * (p ** 2).sum() + 0.01 * b ** 2))

    best = objective(fit.emb[0].double(), float(fit.bias[0]))
    for _ in range(20):
        step = torch.randn(4).double() * 1e-3
        assert objective(fit.emb[0].double() + step, float(fit.bias[0])) > best
    shown, _ = svdpp.top_n(model, Users(fit.emb, fit.bias), item, 5)
    assert not set(shown.tolist()) & set(item.tolist())


@pytest.mark.parametrize("split", ["random", "loo"])
def test_full_participation_federated_svdpp_equals_central(small_cfg, split):
    cfg = dataclasses.replace(small_cfg, model="svdpp", split=split, negatives=10, rounds=6, epochs=6, eval_every=3)
    federated = run_server(InProcessGrid(client_app, 3), cfg)
    central = run_central(dataclasses.replace(cfg, out=cfg.out + "-central"))
    assert federated.model[ITEM_Y].shape == (federated.model["item-emb"].shape[0], cfg.dim)
    metric = "rmse" if split == "random" else "hr@10"
    assert federated.summary["metrics"][metric] == pytest.approx(central.summary["metrics"][metric], rel=1e-5)
    assert float(np.abs(federated.model[ITEM_Y]).max()) > 1e-4  # the y_j were trained
    for name, value in federated.model.items():
        torch.testing.assert_close(torch.as_tensor(value), torch.as_tensor(central.result.model[name]), rtol=1e-4,
                                   atol=1e-5)
