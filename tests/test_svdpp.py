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
from fedrec.models import Hyper, ItemParams, UserState, local_train, predict
from fedrec.models.defaults import UPDATE_MODES
from fedrec.privacy.policy import DevicePolicy, device_step
from fedrec.models.evaluate import evaluate_rows
from fedrec.models.personal import fit_user, top_n
from fedrec.models.svdpp import as_mf
from fedrec.models.upload import scatter_upload
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
    gen = torch.Generator().manual_seed(3)
    torch.set_default_dtype(torch.float64)
    items = ItemParams(torch.randn(ITEMS, 2 * DIM, generator=gen) * 0.5, torch.randn(ITEMS, generator=gen) * 0.3,
                       torch.tensor([0.0 if implicit else 3.5]))
    state = UserState(torch.randn(USERS, DIM, generator=gen), torch.randn(USERS, generator=gen) * 0.2,
                      torch.zeros(USERS, DIM + 1), torch.zeros(USERS, DIM + 1), torch.zeros(USERS))
    segment = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    item = torch.tensor([0, 1, 2, 1, 3, 0, 2, 5, 6, 1])
    if implicit:
        target = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    else:
        target = torch.randint(1, 6, (len(segment),), generator=gen).double()
    return items, state, segment, item, target


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
    _, update = local_train(items, state, segment, item, target, hyper)
    rows_q = items.emb[item, :DIM].clone().requires_grad_()
    rows_y = items.emb[item, DIM:].clone().requires_grad_()
    g_q, g_y = torch.autograd.grad(_loss(items, state.emb, state.bias, segment, item, target, hyper, rows_q, rows_y),
                                   [rows_q, rows_y])
    expected = torch.zeros(ITEMS, 2 * DIM).index_add_(0, item, -hyper.lr * torch.cat([g_q, g_y], dim=1))
    torch.testing.assert_close(update.emb_delta, expected, rtol=1e-10, atol=1e-12)
    if implicit:  # negatives are not in N(u): their y rows do not move
        assert torch.all(update.emb_delta[4, DIM:] == 0) and torch.all(update.emb_delta[3, DIM:] == 0)


@pytest.mark.parametrize("implicit", [False, True], ids=["ratings", "implicit"])
def test_the_users_own_step_is_the_autograd_gradient_too(float64, implicit, monkeypatch):
    import fedrec.models.local as local

    items, state, segment, item, target = _batch(implicit)
    hyper = _hyper(implicit)
    seen = []
    original = local._adam_rows
    monkeypatch.setattr(local, "_adam_rows", lambda st, grad, lr: (seen.append(grad.clone()), original(st, grad, lr)))
    local_train(items, state, segment, item, target, hyper)
    emb, bias = state.emb.clone().requires_grad_(), state.bias.clone().requires_grad_()
    g_emb, g_bias = torch.autograd.grad(_loss(items, emb, bias, segment, item, target, hyper, items.emb[item, :DIM],
                                              items.emb[item, DIM:]), [emb, bias])
    torch.testing.assert_close(seen[0], torch.cat([g_emb, g_bias[:, None]], dim=1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", [m for m in UPDATE_MODES if m != "padded"])
@pytest.mark.parametrize("implicit", [False, True], ids=["ratings", "implicit"])
def test_each_users_svdpp_upload_is_clipped_on_what_is_summed(mode, implicit):
    split = leave_one_out(RATINGS, 5, 1) if implicit else SPLIT
    hyper = Hyper(model="svdpp", dim=4, lr=0.5, implicit=implicit, train_negatives=2, local_epochs=2, seed=2)
    clip = 0.05
    policy = DevicePolicy(update_mode=mode, clip_norm=clip, reproducible_seed=9)
    items = ItemParams.init(split.n_items, hyper, 0.0 if implicit else 3.0)
    items.emb[:, 4:] = 0.3  # y away from its zero start, so its rows carry weight
    singles = []
    for user in range(6):
        state = UserState.init(np.array([user]), split.n_users, hyper)
        result = device_step(items, state, cohort(split, np.array([user])), split.n_items, hyper, policy, 3)
        dense = scatter_upload(result.upload, split.n_items, hyper.item_width)
        norm = float(np.sqrt(sum((a.astype(np.float64) ** 2).sum() for a in dense.values())))
        assert norm <= clip * (1 + 1e-5)
        np.testing.assert_allclose(norm, min(float(result.update.norms[0]), clip), rtol=1e-4)
        touched = np.flatnonzero(np.abs(dense["item-emb"][:, 4:]).sum(1) > 0)
        rated = cohort(split, np.array([user])).train_item
        assert set(touched) <= set(rated.tolist())  # y rows move for the user's own N(u) only
        singles.append(dense)
    state = UserState.init(np.arange(6), split.n_users, hyper)
    together = device_step(items, state, cohort(split, np.arange(6)), split.n_items, hyper, policy, 3)
    dense = scatter_upload(together.upload, split.n_items, hyper.item_width)
    for key, value in dense.items():
        np.testing.assert_allclose(value, sum(s[key] for s in singles), atol=1e-6 * clip, err_msg=key)


def test_padded_uploads_are_refused_under_svdpp(small_cfg):
    """Decoys would not hide the ratings: every row's y step is |N(u)|^-1/2 sum over the REAL rows of
    dloss q_i, so the server can solve for the subset of rows that sums to it (the red-team review
    recovered the exact rated set of users with <= 48 ratings on ML-100K)."""
    with pytest.raises(ConfigError, match="svdpp with --update-mode padded"):
        dataclasses.replace(small_cfg, model="svdpp", update_mode="padded").validate()
    hyper = Hyper(model="svdpp", dim=4, seed=2)
    items = ItemParams.init(SPLIT.n_items, hyper, 3.0)
    rows = cohort(SPLIT, np.arange(2))
    with pytest.raises(ValueError, match="padded uploads cannot hide decoys"):
        device_step(items, UserState.init(np.arange(2), SPLIT.n_users, hyper), rows, SPLIT.n_items, hyper,
                    DevicePolicy(update_mode="padded", reproducible_seed=4), 1)


def test_scoring_adds_the_implicit_part_of_the_rated_items():
    hyper = Hyper(model="svdpp", dim=4, seed=1)
    items = ItemParams.init(SPLIT.n_items, hyper, 3.0)
    items.emb[:, 4:] = torch.randn(SPLIT.n_items, 4)
    rows = cohort(SPLIT, np.arange(3))
    state = UserState.init(np.arange(3), SPLIT.n_users, hyper)
    mf_items, mf_state = as_mf(items, state, rows.train_segment, rows.train_item)
    user, item = int(rows.test_segment[0]), int(rows.test_item[0])
    rated = rows.train_item[rows.train_segment == user]
    vector = state.emb[user] + items.emb[rated, 4:].sum(0) / len(rated) ** 0.5
    expected = items.global_bias + state.bias[user] + items.bias[item] + vector @ items.emb[item, :4]
    got = predict(mf_items, mf_state, torch.tensor([user]), torch.tensor([item]))
    torch.testing.assert_close(got, expected.reshape(1))
    plain = evaluate_rows(items, state, rows, False)
    dropped_y = evaluate_rows(ItemParams(items.emb[:, :4], items.bias, items.global_bias), state, rows, False)
    assert plain["sse"] != pytest.approx(dropped_y["sse"])  # the y part is scored, not ignored


def test_the_device_fit_is_the_minimum_with_the_implicit_part_fixed():
    hyper = Hyper(model="svdpp", dim=4, reg_user=0.1, reg_bias=0.01, seed=1)
    items = ItemParams.init(SPLIT.n_items, hyper, 3.0)
    items.emb[:, 4:] = torch.randn(SPLIT.n_items, 4) * 0.3
    item, rating = np.array([1, 4, 7, 9]), np.array([5.0, 1.0, 4.0, 2.0])
    fit = fit_user(items, item, rating, hyper)
    y_part = items.emb[item, 4:].sum(0).double() / 2.0

    def objective(p, b):
        pred = items.global_bias.double() + items.bias[item].double() + b + items.emb[item, :4].double() @ (p + y_part)
        return float(((pred - torch.as_tensor(rating)) ** 2).sum() + 4 * (0.1 * (p ** 2).sum() + 0.01 * b ** 2))

    best = objective(torch.as_tensor(fit.emb).double(), fit.bias)
    for _ in range(20):
        step = torch.randn(4).double() * 1e-3
        assert objective(torch.as_tensor(fit.emb).double() + step, fit.bias) > best
    shown, _ = top_n(items, fit, item, 5)
    assert not set(shown.tolist()) & set(item.tolist())


@pytest.mark.parametrize("split", ["random", "loo"])
def test_full_participation_federated_svdpp_equals_central(small_cfg, split):
    cfg = dataclasses.replace(small_cfg, model="svdpp", split=split, negatives=10, rounds=6, epochs=6, eval_every=3)
    federated = run_server(InProcessGrid(client_app, 3), cfg)
    central = run_central(dataclasses.replace(cfg, out=cfg.out + "-central"))
    assert federated.items.emb.shape[1] == 2 * cfg.dim
    metric = "rmse" if split == "random" else "hr@10"
    assert federated.summary["metrics"][metric] == pytest.approx(central.summary["metrics"][metric], rel=1e-5)
    assert float(federated.items.emb[:, cfg.dim:].abs().max()) > 1e-4  # the y_j were trained
    for name, tensor in federated.items.tensors().items():
        torch.testing.assert_close(tensor, central.result.items.tensors()[name], rtol=1e-4, atol=1e-5)
