"""The vectorized BPMF sweep (models/bpmf.py: segment sums as sparse products, eigendecompositions only
where a Cholesky test cannot clear an item) against the row-by-row sweep it replaced, kept below as
the reference: the same user draws, the same uploads but for float32 rounding (the new sums round
once, the old ones at every row), the same item draws and the same verdicts on hostile statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.datasets import SyntheticSpec, cohort, generate
from fedrec.datasets.splits import random_holdout
from fedrec.models import bpmf
from fedrec.models.algorithm import DeviceKeys
from fedrec.models.defaults import Hyper
from fedrec.models.factors import ItemParams, init_items
from fedrec.privacy.clip import clip_scales

SPLIT = random_holdout(generate(SyntheticSpec(users=60, items=40, density=0.3, seed=11))[0], 0.2, 11)
HYPER = Hyper(model="bpmf", dim=4, seed=5, burn_in=2)


# ------------------------------------------------- the row-by-row sweep, as it was before vectorizing

def clip_per_user(pair_user, pair_dq, pair_db, dmu, clip_norm):
    """The per-user clipping of the row-by-row sweep: rows scaled in float32 by factors from float64 norms."""
    row_sq = torch.linalg.vector_norm(pair_dq, dim=1, dtype=torch.float64).square() + pair_db.double() ** 2
    norms = (torch.zeros(len(dmu), dtype=torch.float64).index_add_(0, pair_user, row_sq) + dmu.double() ** 2).sqrt()
    scale = clip_scales(norms, clip_norm).to(pair_dq.dtype)
    return pair_dq * scale[pair_user][:, None], pair_db * scale[pair_user], dmu * scale, norms.to(pair_dq.dtype)


def _width(dim):
    return (dim + 1) * (dim + 2) // 2


def to_new(emb, bias, dim):
    """The old upload layout (triangles then alpha t p_u in one array, alpha t in another) as the new
    statistics: item-gram, item-rhs = alpha t (p_u, 1)."""
    return emb[:, :_width(dim)], torch.cat([emb[:, _width(dim):], bias[:, None]], dim=1)


def to_old(gram, rhs, dim):
    return torch.cat([gram, rhs[:, :dim]], dim=1), rhs[:, dim]


def _triangle(dim):
    return tuple(torch.as_tensor(t) for t in np.triu_indices(dim + 1))


def old_draw_users(items, segment, item, rating, users, hyper, key):
    n, dim = len(users), hyper.dim
    g = torch.cat([items.emb[item].double(), torch.ones(len(item), 1, dtype=torch.float64)], dim=1)
    residual = rating.double() - items.global_bias.double() - items.bias[item].double()
    prior = torch.tensor([hyper.reg_user] * dim + [hyper.reg_bias], dtype=torch.float64)
    precision = torch.diag(prior).expand(n, dim + 1, dim + 1).clone()
    precision.index_add_(0, segment, hyper.bpmf_alpha * g[:, :, None] * g[:, None, :])
    rhs = torch.zeros(n, dim + 1, dtype=torch.float64).index_add_(0, segment, hyper.bpmf_alpha * residual[:, None] * g)
    return bpmf._gaussian(precision, rhs, bpmf.normal_draws(users, dim + 1, key))


def old_user_statistics(items, x, segment, item, rating, hyper, clip_norm):
    dim, n_items = hyper.dim, items.emb.shape[0]
    upper = _triangle(dim)
    g = torch.cat([x[segment, :dim], torch.ones(len(segment), 1, dtype=x.dtype)], dim=1)
    outer = (g[:, :, None] * g[:, None, :])[:, upper[0], upper[1]]
    target = rating.double() - items.global_bias.double() - x[segment, dim]
    residual = target - items.bias[item].double() - (x[segment, :dim] * items.emb[item].double()).sum(dim=1)
    alpha = hyper.bpmf_alpha
    rows = torch.cat([alpha * outer, alpha * target[:, None] * g[:, :dim]], dim=1).float()
    row_bias = (alpha * target).float()
    rows, row_bias, _, norms = clip_per_user(segment, rows, row_bias, torch.zeros(x.shape[0]), clip_norm)
    return (torch.zeros(n_items, rows.shape[1]).index_add_(0, item, rows),
            torch.zeros(n_items).index_add_(0, item, row_bias), norms, float((residual ** 2).sum()))


def old_item_matrices(emb, dim):
    upper = _triangle(dim)
    outer = torch.zeros(emb.shape[0], dim + 1, dim + 1, dtype=torch.float64)
    outer[:, upper[0], upper[1]] = torch.as_tensor(emb)[:, :upper[0].numel()].double()
    return outer + outer.mT - torch.diag_embed(torch.diagonal(outer, dim1=1, dim2=2))


def old_draw_items(current, emb_sum, bias_sum, hyper, rng):
    dim, n_items = hyper.dim, current.emb.shape[0]
    x = torch.cat([current.emb.double(), current.bias[:, None].double()], dim=1)
    prior_mean, prior_precision = bpmf.draw_item_prior(x, rng)
    upper = _triangle(dim)
    outer = old_item_matrices(emb_sum, dim)
    values, vectors = torch.linalg.eigh(outer)
    outer = (vectors * values.clamp(min=0)[:, None, :]) @ vectors.mT
    values, vectors = torch.linalg.eigh(prior_precision + outer)
    values = values.clamp(min=float(torch.linalg.eigvalsh(prior_precision)[0]))
    rhs = prior_precision @ prior_mean + torch.cat([emb_sum[:, upper[0].numel():].double(),
                                                    bias_sum[:, None].double()], dim=1)
    z = torch.as_tensor(rng.standard_normal((n_items, dim + 1)))
    coords = ((vectors.mT @ rhs[:, :, None])[:, :, 0] / values + (vectors.mT @ z[:, :, None])[:, :, 0]
              / values.sqrt())
    drawn = (vectors @ coords[:, :, None])[:, :, 0].float()
    return ItemParams(drawn[:, :dim].contiguous(), drawn[:, dim].contiguous(), current.global_bias.clone())


def old_inconsistent_items(emb, bias, dim, alpha, users, max_residual):
    matrices = old_item_matrices(emb, dim)
    rhs = torch.cat([torch.as_tensor(emb)[:, -dim:].double(), torch.as_tensor(bias)[:, None].double()], dim=1)
    values, vectors = torch.linalg.eigh(matrices)
    scale = torch.diagonal(matrices, dim1=1, dim2=2).abs().sum(dim=1) + 1e-30
    corner = matrices[:, dim, dim]
    if bool((values[:, 0] < -1e-5 * scale).any()):
        return torch.nonzero(values[:, 0] < -1e-5 * scale)[:, 0], "positive semi-definite"
    if bool((corner > alpha * users * (1 + 1e-5)).any()):
        return torch.nonzero(corner > alpha * users * (1 + 1e-5))[:, 0], "counts more"
    along = (vectors.mT @ rhs[:, :, None])[:, :, 0]
    energy = (along ** 2 / values.clamp(min=1e-6 * scale[:, None])).sum(dim=1)
    excess = energy > corner * max_residual ** 2 * (1 + 1e-3) + 1e-6
    return torch.nonzero(excess)[:, 0], "right-hand side" if bool(excess.any()) else ""


# ------------------------------------------------------------------------------------------------ tests

def _init():
    return init_items(SPLIT.n_items, HYPER.dim, HYPER.init_std, HYPER.seed, 3.0)


def _sweep_inputs(seed=3):
    items = _init()
    items.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    rows = cohort(SPLIT, np.arange(SPLIT.n_users))
    args = (torch.as_tensor(rows.train_segment), torch.as_tensor(rows.train_item),
            torch.as_tensor(rows.train_rating, dtype=torch.float64))
    return items, rows, args


def _statistics(items, rows, clip_norm, old):
    key = bpmf.draw_key(HYPER.seed, 4)
    if old:
        x = old_draw_users(items, *_sweep_inputs()[2], rows.users, HYPER, key)
        return x, old_user_statistics(items, x, *_sweep_inputs()[2], HYPER, clip_norm)
    new_state, update, norms = _new_sweep(items, rows, 4, clip_norm)
    x = torch.cat([new_state["emb"], new_state["bias"][:, None]], dim=1)  # round 4 > burn-in 2: the draw is the mean
    return x, (*to_old(update[bpmf.ITEM_GRAM].float(), update[bpmf.ITEM_RHS].float(), HYPER.dim), norms.float(),
               update["loss"])


def _new_sweep(items, rows, round_, clip_norm, state=None):
    """The algorithm's round for every user: their state, the summed statistics (clipped to clip_norm),
    each user's norm."""
    algorithm = bpmf.BPMF(HYPER, SPLIT.n_items, SPLIT.rating_scale)
    state = state if state is not None else algorithm.new_users(rows.users, SPLIT.n_users, None)
    new_state, contributions = algorithm.train(items.tensors(), state, rows, round_, DeviceKeys(HYPER.seed))
    norms = contributions.user_norms()
    sums = contributions.summed(clip_scales(norms, clip_norm), algorithm.statistics(), SPLIT.n_items)
    return new_state, {**sums, "loss": contributions.loss_sum}, norms


@pytest.mark.parametrize("clip_norm", [0.0, 80.0])
def test_the_sweep_draws_the_old_users_and_uploads_their_statistics(clip_norm):
    items, rows, _ = _sweep_inputs()
    x_old, (emb_old, bias_old, norms_old, loss_old) = _statistics(items, rows, clip_norm, old=True)
    x_new, (emb_new, bias_new, norms_new, loss_new) = _statistics(items, rows, clip_norm, old=False)
    assert clip_norm == 0 or 5 <= int((norms_old > clip_norm).sum()) < len(norms_old)  # the clip bites, not on all
    torch.testing.assert_close(x_new, x_old.float(), rtol=0, atol=0)  # the same float64 draw, stored as float32
    top = float(emb_old.abs().max())
    torch.testing.assert_close(emb_new, emb_old, rtol=0, atol=1e-6 * top)  # float32 rounding of sums of ~20 rows
    torch.testing.assert_close(bias_new, bias_old, rtol=0, atol=1e-6 * float(bias_old.abs().max()))
    torch.testing.assert_close(norms_new, norms_old, rtol=1e-6, atol=0)
    assert loss_new == pytest.approx(loss_old, rel=1e-12)


def _sums(noise: float):
    items, rows, args = _sweep_inputs()
    x = old_draw_users(items, *args, rows.users, HYPER, 9)
    emb, bias, _, _ = old_user_statistics(items, x, *args, HYPER, 0.0)
    gen = torch.Generator().manual_seed(2)
    return items, (emb.double() + noise * torch.randn(emb.shape, generator=gen, dtype=torch.float64),
                   bias.double() + noise * torch.randn(bias.shape, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_item_draws_are_the_old_ones_on_honest_and_on_noised_sums(noise, monkeypatch):
    items, (emb, bias) = _sums(noise)
    gram, rhs = to_new(emb, bias, HYPER.dim)
    matrices = bpmf._symmetric(gram, HYPER.dim + 1)
    moved = (bpmf._psd(matrices) - matrices).abs().amax(dim=(1, 2))
    if noise:  # the projection is at work on the noised sums (DP noise makes them indefinite) ...
        assert int((moved > 1e-3).sum()) >= 5
    else:  # ... and honest ones are left as they are
        assert float(moved.max()) == 0.0
    old = old_draw_items(items, emb, bias, HYPER, np.random.default_rng(4))
    new = bpmf.draw_items(items, gram, rhs, HYPER, np.random.default_rng(4))
    torch.testing.assert_close(new.emb, old.emb, rtol=0, atol=1e-6)
    torch.testing.assert_close(new.bias, old.bias, rtol=0, atol=1e-6)
    if noise:  # positive control: drawn from the unprojected sums, the noised items come out elsewhere
        monkeypatch.setattr(bpmf, "_psd", lambda matrices: matrices)
        raw = bpmf.draw_items(items, gram, rhs, HYPER, np.random.default_rng(4))
        assert float((raw.emb - old.emb).abs().max()) > 1e-3


@pytest.mark.parametrize("attack", ["honest", "negated", "right-hand side only", "counted twice", "tight residual"])
def test_hostile_statistics_get_the_old_verdict(attack):
    _, (emb, bias) = _sums(0.0)
    users, max_residual, width = float(SPLIT.n_users), 40.0, (HYPER.dim + 1) * (HYPER.dim + 2) // 2
    emb, bias = emb.clone(), bias.clone()
    if attack == "negated":
        emb[3] *= -1
    elif attack == "right-hand side only":
        emb[[5, 7], :width] = 0.0
    elif attack == "counted twice":
        users = users / 2
    elif attack == "tight residual":  # a bound that some honest items pass and some do not: the slow path's test
        max_residual = 0.8
    old_bad, old_why = old_inconsistent_items(emb, bias, HYPER.dim, HYPER.bpmf_alpha, users, max_residual)
    new_bad, new_why = bpmf.inconsistent_items(*to_new(emb, bias, HYPER.dim), HYPER.dim, HYPER.bpmf_alpha, users,
                                               max_residual)
    assert torch.equal(new_bad, old_bad) and (old_why in new_why if old_why else new_why == "")
    assert (len(old_bad) == 0) == (attack == "honest")
    if attack == "tight residual":
        assert 0 < len(old_bad) < emb.shape[0] // 2


def test_a_chain_of_sweeps_stays_with_the_old_chain():
    """Ten Gibbs sweeps from the same start: the float32 rounding the two sum differently does not grow
    (measured: at most 2.4e-7 apart after 30)."""
    _, rows, args = _sweep_inputs()
    chains = {}
    for name in ("old", "new"):
        current, state = _init(), None
        for round_ in range(1, 11):
            key, rng = bpmf.draw_key(HYPER.seed, round_), np.random.default_rng(round_)
            if name == "old":
                x = old_draw_users(current, *args, rows.users, HYPER, key)
                emb, bias, _, _ = old_user_statistics(current, x, *args, HYPER, 0.0)
                current = old_draw_items(current, emb.double(), bias.double(), HYPER, rng)
            else:
                state, update, _ = _new_sweep(current, rows, round_, 0.0, state)
                current = bpmf.draw_items(current, update[bpmf.ITEM_GRAM], update[bpmf.ITEM_RHS], HYPER, rng)
        chains[name] = current
    torch.testing.assert_close(chains["new"].emb, chains["old"].emb, rtol=0, atol=1e-5)
    torch.testing.assert_close(chains["new"].bias, chains["old"].bias, rtol=0, atol=1e-5)
