"""The vectorized local step against torch.autograd and torch.optim.Adam, user by user.

MF.fit_rows writes its gradients out by hand (one batched expression for all users' rows);
here the same loss is written plainly, differentiated by autograd and stepped by
torch.optim.Adam for one user at a time, which is what one-user-per-device training means.
The loss a user's step differentiates (fedrec.models.mf):
- data: squared error, or BCE with logits (implicit), summed over the user's rows;
- L2 per row: reg_user |p_u|^2 + reg_bias b_u^2 on the user's side, reg_item |q_i|^2 +
  reg_bias b_i^2 on each row's own copy of the item parameters;
- the global bias takes the gradient of the *mean* data loss over the user's rows;
- decoy rows train only their item copies: the user's vector, bias and mu see real rows only.
"""

from __future__ import annotations

import pytest
import torch

import fedrec.models.mf as mf_module
from fedrec.models.defaults import Hyper
from fedrec.models.factors import ItemParams, seeded_vectors
from fedrec.models.mf import ADAM_BETAS, ADAM_EPS, MF, _adam_rows

# float32 is what runs; float64 shows the two computations are the same up to rounding.
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.float64: {"rtol": 1e-10, "atol": 1e-12}}
USERS, ITEMS, DIM = 5, 7, 4


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(request.param)  # fit_rows allocates its sums in the default dtype
    yield request.param
    torch.set_default_dtype(previous)


def _batch(implicit: bool, decoys: bool, seed: int = 0):
    """Several users sharing items, each with a few rows (one (user, item) pair twice, as an
    implicit negative drawn twice would be), non-zero starting biases and user moments."""
    gen = torch.Generator().manual_seed(seed)
    items = ItemParams(torch.randn(ITEMS, DIM, generator=gen) * 0.5, torch.randn(ITEMS, generator=gen) * 0.3,
                       torch.tensor([0.0 if implicit else 3.5]))
    emb = seeded_vectors(torch.arange(USERS).numpy(), USERS, DIM, 0.5, seed)
    state = {"emb": emb.to(torch.get_default_dtype()), "bias": torch.randn(USERS, generator=gen) * 0.2,
             "m": torch.zeros(USERS, DIM + 1), "v": torch.zeros(USERS, DIM + 1), "step": torch.zeros(USERS)}
    segment = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4, 4])
    item = torch.tensor([0, 1, 2, 1, 3, 0, 2, 5, 5, 6, 1, 2, 3])
    if implicit:
        target = (torch.rand(len(segment), generator=gen) < 0.5).to(torch.get_default_dtype())
    else:
        target = torch.randint(1, 6, (len(segment),), generator=gen).to(torch.get_default_dtype())
    decoy = None
    if decoys:
        segment, item = torch.cat([segment, torch.tensor([0, 1, 3])]), torch.cat([item, torch.tensor([4, 6, 0])])
        target = torch.cat([target, torch.ones(3) if implicit else torch.tensor([4.0, 2.0, 5.0])])
        decoy = torch.cat([torch.zeros(len(segment) - 3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)])
    return items, state, segment, item, target, decoy


def _hyper(implicit: bool, epochs: int) -> Hyper:
    return Hyper(dim=DIM, reg_user=0.13, reg_item=0.21, reg_bias=0.07, lr=0.05, local_epochs=epochs,
                 implicit=implicit)


def _fit(items: ItemParams, state, segment, item, target, hyper, decoy):
    """MF's round on these rows: the new state and the per-item sums of the users' changes."""
    mf = MF(hyper, ITEMS, (1.0, 5.0))
    new, contributions = mf.fit_rows(items.tensors(), state, segment, item, target, decoy, USERS)
    sums = contributions.summed(torch.ones(USERS, dtype=torch.float64), mf.statistics(), ITEMS)
    return new, {k: v.to(torch.get_default_dtype()) for k, v in sums.items()}, contributions.loss_sum


def _autograd_step(items, emb, bias, segment, item, target, hyper, decoy, q, b, mu):
    """Loss of every user at the given user parameters and item copies, and its gradients:
    (d/d emb, d/d bias, d/d q rows, d/d b rows, d/d mu per user of the *mean* data loss, data loss)."""
    real = torch.ones(len(segment), dtype=torch.bool) if decoy is None else ~decoy
    emb, bias = emb.detach().requires_grad_(), bias.detach().requires_grad_()
    q, b, mu = q.detach().requires_grad_(), b.detach().requires_grad_(), mu.detach().requires_grad_()
    # decoys reach the user's side and mu only through constants: they train item copies alone
    p_row = torch.where(real[:, None], emb[segment], emb[segment].detach())
    bu_row = torch.where(real, bias[segment], bias[segment].detach())
    mu_row = torch.where(real, mu[segment], mu[segment].detach())
    pred = mu_row + bu_row + b + (p_row * q).sum(dim=1)
    if hyper.implicit:
        data = torch.nn.functional.binary_cross_entropy_with_logits(pred, target, reduction="none")
    else:
        data = (pred - target) ** 2
    user_reg = hyper.reg_user * (p_row**2).sum(dim=1) + hyper.reg_bias * bu_row**2
    item_reg = hyper.reg_item * (q**2).sum(dim=1) + hyper.reg_bias * b**2
    loss = data.sum() + user_reg[real].sum() + item_reg.sum()
    g_emb, g_bias, g_q, g_b, g_mu = torch.autograd.grad(loss, [emb, bias, q, b, mu])
    rows = torch.bincount(segment[real], minlength=len(emb)).clamp(min=1)
    return g_emb, g_bias, g_q, g_b, g_mu / rows, float(data[real].detach().sum())


@pytest.mark.parametrize("decoys", [False, True], ids=["real", "decoys"])
@pytest.mark.parametrize("implicit", [False, True], ids=["ratings", "implicit"])
def test_one_step_gradients_match_autograd(dtype, implicit, decoys, monkeypatch):
    items, state, segment, item, target, decoy = _batch(implicit, decoys)
    hyper = _hyper(implicit, epochs=1)
    seen = []
    monkeypatch.setattr(mf_module, "_adam_rows",
                        lambda st, grad, lr: (seen.append(grad.clone()), _adam_rows(st, grad, lr)))
    _, sums, loss_sum = _fit(items, state, segment, item, target, hyper, decoy)

    g_emb, g_bias, g_q, g_b, g_mu, data_loss = _autograd_step(
        items, state["emb"], state["bias"], segment, item, target, hyper, decoy,
        items.emb[item], items.bias[item], items.global_bias.expand(USERS))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(seen[0], torch.cat([g_emb, g_bias[:, None]], dim=1), **tol)
    lr = hyper.lr
    torch.testing.assert_close(sums["item-emb"], torch.zeros(ITEMS, DIM).index_add_(0, item, -lr * g_q), **tol)
    torch.testing.assert_close(sums["item-bias"][:, 0], torch.zeros(ITEMS).index_add_(0, item, -lr * g_b), **tol)
    torch.testing.assert_close(sums["global-bias"], (-lr * g_mu).sum().reshape(1), **tol)
    assert loss_sum == pytest.approx(data_loss, rel=tol["rtol"], abs=tol["atol"])


@pytest.mark.parametrize("decoys", [False, True], ids=["real", "decoys"])
@pytest.mark.parametrize("implicit", [False, True], ids=["ratings", "implicit"])
def test_local_epochs_match_autograd_with_one_torch_adam_per_user(dtype, implicit, decoys):
    items, state, segment, item, target, decoy = _batch(implicit, decoys, seed=1)
    hyper = _hyper(implicit, epochs=3)
    new_state, sums, loss_sum = _fit(items, state, segment, item, target, hyper, decoy)

    # The reference: each user's (p_u, b_u) under its own torch.optim.Adam, item copies by plain SGD.
    params = [(state["emb"][u].clone().requires_grad_(), state["bias"][u].clone().requires_grad_())
              for u in range(USERS)]
    adams = [torch.optim.Adam(p, lr=hyper.lr, betas=ADAM_BETAS, eps=ADAM_EPS) for p in params]
    q, b, mu = items.emb[item].clone(), items.bias[item].clone(), items.global_bias.expand(USERS).clone()
    for _ in range(hyper.local_epochs):
        emb = torch.stack([p.detach() for p, _ in params])
        bias = torch.stack([bu.detach() for _, bu in params])
        g_emb, g_bias, g_q, g_b, g_mu, data_loss = _autograd_step(items, emb, bias, segment, item, target, hyper,
                                                                  decoy, q, b, mu)
        for u, ((p, bu), adam) in enumerate(zip(params, adams)):
            p.grad, bu.grad = g_emb[u].clone(), g_bias[u].clone()
            adam.step()
        q, b, mu = q - hyper.lr * g_q, b - hyper.lr * g_b, mu - hyper.lr * g_mu

    tol = TOLERANCE[dtype]
    torch.testing.assert_close(new_state["emb"], torch.stack([p.detach() for p, _ in params]), **tol)
    torch.testing.assert_close(new_state["bias"], torch.stack([bu.detach() for _, bu in params]), **tol)
    first_moment = torch.stack([torch.cat([a.state[p]["exp_avg"], a.state[bu]["exp_avg"][None]])
                                for (p, bu), a in zip(params, adams)])
    torch.testing.assert_close(new_state["m"], first_moment, **tol)
    torch.testing.assert_close(new_state["step"], torch.full((USERS,), float(hyper.local_epochs)))
    torch.testing.assert_close(sums["item-emb"], torch.zeros(ITEMS, DIM).index_add_(0, item, q - items.emb[item]),
                               **tol)
    torch.testing.assert_close(sums["item-bias"][:, 0], torch.zeros(ITEMS).index_add_(0, item, b - items.bias[item]),
                               **tol)
    torch.testing.assert_close(sums["global-bias"], (mu - items.global_bias).sum().reshape(1), **tol)
    assert loss_sum == pytest.approx(data_loss, rel=tol["rtol"], abs=tol["atol"])  # at the last epoch's start


def test_per_user_adam_matches_torch_adam_with_its_own_step_count(dtype):
    """Users step only in rounds they take part in, so their bias corrections differ; each must
    follow its own torch.optim.Adam exactly."""
    gen = torch.Generator().manual_seed(7)
    state = {"emb": torch.randn(USERS, DIM, generator=gen), "bias": torch.randn(USERS, generator=gen),
             "m": torch.zeros(USERS, DIM + 1), "v": torch.zeros(USERS, DIM + 1), "step": torch.zeros(USERS)}
    params = [(state["emb"][u].clone().requires_grad_(), state["bias"][u].clone().requires_grad_())
              for u in range(USERS)]
    lr = 0.03
    adams = [torch.optim.Adam(p, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS) for p in params]
    rounds = [[0, 1, 2, 3, 4], [0, 2], [1, 2, 3], [4], [0, 1, 2, 3, 4], [2, 4]]
    for taking_part in rounds:
        index = torch.tensor(taking_part)
        grad = torch.randn(len(index), DIM + 1, generator=gen) * torch.logspace(-3, 1, DIM + 1)  # varied scales
        part = {k: v[index] for k, v in state.items()}
        _adam_rows(part, grad, lr)
        for k, v in part.items():
            state[k][index] = v
        for row, u in enumerate(taking_part):
            p, bu = params[u]
            p.grad, bu.grad = grad[row, :-1].clone(), grad[row, -1].clone()
            adams[u].step()

    tol = TOLERANCE[dtype]
    torch.testing.assert_close(state["emb"], torch.stack([p.detach() for p, _ in params]), **tol)
    torch.testing.assert_close(state["bias"], torch.stack([bu.detach() for _, bu in params]), **tol)
    second_moment = torch.stack([torch.cat([a.state[p]["exp_avg_sq"], a.state[bu]["exp_avg_sq"][None]])
                                 for (p, bu), a in zip(params, adams)])
    torch.testing.assert_close(state["v"], second_moment, **tol)
    torch.testing.assert_close(state["step"], torch.tensor([float(sum(u in r for r in rounds)) for u in range(USERS)]))
