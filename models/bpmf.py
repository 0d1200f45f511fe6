"""Bayesian MF by Gibbs sampling (Salakhutdinov & Mnih, ICML 2008), split along the privacy boundary.

r(u, i) = mu + b_u + c_i + p_u . q_i, plus rating noise of precision alpha (`Hyper.bpmf_alpha`).
Items' x_i = (q_i, c_i) have a Normal-Wishart hyperprior that the server learns from the items;
users' x_u = (p_u, b_u) a fixed prior N(0, diag(reg_user, ..., reg_user, reg_bias)) (learning it
too would need every user's x_u x_u^T: on ML-100K u1 it gained 0.0006 RMSE, 0.9062 vs 0.9068);
mu is the middle of the rating scale (public; the training mean gained 0.0008).

One round is one Gibbs sweep:
- a device draws each user's x_u from its exact conditional given the items it received; its
  ratings never leave it. It sends, per item the user rated, that item's sufficient statistics:
  alpha g g^T (upper triangle) and alpha (r - mu - b_u) g, with g = (p_u, 1);
- the server sums them over users, draws the item hyperprior from the current items, then each
  item from its conditional N(P^-1 (L m + b), P^-1), P = L + sum of alpha g g^T.
What is evaluated, saved and served is the mean of the samples after `burn_in` rounds, on both
sides (parameter averaging: 0.9068 on u1 against 0.9066 for averaging predictions).

The statistics travel in the arrays an MF update uses (ITEM_EMB: the triangle and alpha r~ p_u;
ITEM_BIAS: alpha r~), so upload modes and per-user clipping act on them unchanged. What they
give away: one user's g g^T has last column (p_u, 1), so a single upload holds the user's vector
and each rating up to b_u; and an item's sum over its raters is a matrix of rank = its rater
count spanned by their g's, from which a red-team review read a third of ML-100K's users out of
one SecAgg+ sum. DP noise, in turn, is more than this chain takes at a useful epsilon. So BPMF
runs without DP or SecAgg+ (run/config.py refuses both): a trusted aggregator's model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch

from .local import USERS_PER_CHUNK, LocalUpdate, clip_scales
from .mf import Hyper, ItemParams, UserState
from .randomness import mix64, uniform01

# Normal-Wishart hyperprior of the items (the paper's choice): mean 0, beta0 = 2, nu0 = K + 1, W0 = I.
PRIOR_BETA = 2.0


def _upper(g: np.ndarray) -> np.ndarray:
    """[rows, w (w + 1) / 2]: the upper triangle of each row's g g^T, in np.triu_indices' order."""
    i, j = np.triu_indices(g.shape[1])
    return g[:, i] * g[:, j]


def _symmetric(upper: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, width, width]: the symmetric matrices whose upper triangles are the rows of `upper`."""
    i, j = np.triu_indices(width)
    position = np.empty((width, width), np.int64)
    position[i, j] = position[j, i] = np.arange(len(i))  # entry (a, b) of a matrix is its triangle's entry here
    return upper.double()[:, torch.as_tensor(position.ravel())].reshape(-1, width, width)


def _with_ones(emb: torch.Tensor) -> np.ndarray:
    """(v, 1) for each row v of `emb`, in float64."""
    return np.concatenate([emb.double().numpy(), np.ones((emb.shape[0], 1))], axis=1)


class _Rows:
    """A batch's rating rows grouped by user, summed by segment as sparse products in both directions:
    per user, its rows' weights times their items' vectors; per item, its rows' weights times their
    users' vectors. Since g g^T depends on the item alone on the user's side, and on the user alone on
    the item's, no (K + 1)^2 array per row is built."""

    def __init__(self, segment, item, n_users: int, n_items: int):
        segment = np.asarray(segment, dtype=np.int64)
        self.order = np.argsort(segment, kind="stable")  # linear where rows come grouped, as a cohort's do
        self.segment, self.item = segment[self.order], np.asarray(item, dtype=np.int64)[self.order]
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(segment, minlength=n_users))])
        self.shape = (n_users, n_items)

    def _matrix(self, weight: np.ndarray) -> scipy.sparse.csr_array:
        return scipy.sparse.csr_array((weight, self.item, self.indptr), shape=self.shape)

    def per_user(self, weight: np.ndarray, of_item: np.ndarray) -> np.ndarray:
        return self._matrix(weight) @ of_item

    def per_item(self, weight: np.ndarray, of_user: np.ndarray) -> np.ndarray:
        return self._matrix(weight).T @ of_user


def normal_draws(users: np.ndarray, count: int, key: int) -> torch.Tensor:
    """[users, count] standard normals, counter-based per (key, user): a user's draws do not
    depend on who shares its node, so central and federated runs draw alike."""
    base = mix64(np.asarray(users, np.uint64) ^ np.uint64(key & (2**64 - 1)))
    counter = np.arange(2 * count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = mix64(base[:, None] + counter[None, :] * np.uint64(0x9E3779B97F4A7C15))
    u = uniform01(bits)
    radius = np.sqrt(-2.0 * np.log1p(-u[:, :count]))  # Box-Muller; 1 - u > 0
    return torch.as_tensor(radius * np.cos(2 * np.pi * u[:, count:]))


def draw_key(seed: int, round_: int) -> int:
    """Key of a round's user draws: from the run seed, so runs repeat and federated equals central.
    Not a privacy stream: BPMF runs are never private (module docstring), and knowing a user's
    normals tells its b_u to whoever also has its statistics."""
    return int(mix64(np.array([seed * 0x2545F4914F6CDD1D + round_ + 0xB9F], np.uint64) ^ np.uint64(0xB7E15163))[0])


def _gaussian(precision: torch.Tensor, rhs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Draws of N(P^-1 rhs, P^-1) for a batch of precisions P, from standard normals z (by Cholesky;
    where rounding makes a P too ill-conditioned for it, by its eigenvalues, floored at a tiny share)."""
    chol, failed = torch.linalg.cholesky_ex(precision)
    if not bool(failed.any()):
        mean = torch.cholesky_solve(rhs[..., None], chol)[..., 0]
        return mean + torch.linalg.solve_triangular(chol.mT, z[..., None], upper=True)[..., 0]
    values, vectors = torch.linalg.eigh(precision)
    values = values.clamp(min=1e-12 * values.abs().amax(dim=-1, keepdim=True).clamp(min=1e-300))
    inside = (vectors.mT @ rhs[..., None])[..., 0] / values + (vectors.mT @ z[..., None])[..., 0] / values.sqrt()
    return (vectors @ inside[..., None])[..., 0]


@dataclass
class _Batch:
    """A batch's rating rows grouped by user, and the per-user sums its users' conditionals need:
    with g = (q_i, 1), gram = sum of g g^T (upper triangles) and rhs = sum of (r - mu - c_i) g."""

    rows: _Rows
    centred: np.ndarray  # r - mu of each row, in `rows`' order
    residual: np.ndarray  # r - mu - c_i
    gram: np.ndarray  # [users, (dim + 1) (dim + 2) / 2]
    rhs: np.ndarray  # [users, dim + 1]


def _batch(items: ItemParams, segment, item, rating, n_users: int) -> _Batch:
    rows = _Rows(segment, item, n_users, items.emb.shape[0])
    g = _with_ones(items.emb)  # (q_i, 1) of every item
    centred = np.asarray(rating, np.float64)[rows.order] - float(items.global_bias)
    residual = centred - items.bias.double().numpy()[rows.item]
    return _Batch(rows, centred, residual, rows.per_user(np.ones(len(residual)), _upper(g)),
                  rows.per_user(residual, g))


def _draw(batch: _Batch, users: np.ndarray, hyper: Hyper, key: int) -> torch.Tensor:
    dim, alpha = hyper.dim, hyper.bpmf_alpha
    prior = torch.tensor([hyper.reg_user] * dim + [hyper.reg_bias], dtype=torch.float64)
    precision = torch.diag(prior) + _symmetric(torch.as_tensor(alpha * batch.gram), dim + 1)
    return _gaussian(precision, torch.as_tensor(alpha * batch.rhs), normal_draws(users, dim + 1, key))


def draw_users(items: ItemParams, segment: torch.Tensor, item: torch.Tensor, rating: torch.Tensor,
               users: np.ndarray, hyper: Hyper, key: int) -> torch.Tensor:
    """[users, dim + 1] draws of (p_u, b_u) from each user's conditional given the items."""
    return _draw(_batch(items, segment, item, rating, len(users)), users, hyper, key)


@dataclass
class _Sums:
    emb: np.ndarray  # [items, upload width] float64: per item, the summed triangles, then alpha r~ p_u
    bias: np.ndarray  # [items] float64: alpha r~ summed
    norms: np.ndarray  # [users] each user's statistics' L2 norm before clipping
    loss: float


def _statistics(batch: _Batch, x: torch.Tensor, hyper: Hyper, clip_norm: float) -> _Sums:
    """user_statistics' sums in float64. A row uploads (alpha tri(g g^T), alpha t p_u) and alpha t, with
    g = (p_u, 1) the same on all of a user's rows and t = r - mu - b_u: so the per-item sums are sparse
    products with per-user vectors, and a user's norm follows from its row count and its sum of t^2."""
    dim, alpha, n, rows = hyper.dim, hyper.bpmf_alpha, x.shape[0], batch.rows
    x = x.double().numpy()
    g = np.concatenate([x[:, :dim], np.ones((n, 1))], axis=1)
    target = batch.centred - x[rows.segment, dim]  # what the item's (q_i, c_i) explains
    upper = _upper(g)
    target_sq = np.bincount(rows.segment, weights=target ** 2, minlength=n)
    norms = alpha * np.sqrt(np.diff(rows.indptr) * (upper ** 2).sum(axis=1) + target_sq * (g ** 2).sum(axis=1))
    scale = np.ones(n) if clip_norm <= 0 else clip_scales(torch.as_tensor(norms), clip_norm).numpy()
    kept = scale > 0  # clip_scales fails closed: a user it cannot scale sends zeros (0 x inf would be nan)
    user_upper, user_g = np.zeros_like(upper), np.zeros_like(g)
    user_upper[kept] = alpha * scale[kept, None] * upper[kept]
    user_g[kept] = scale[kept, None] * g[kept]
    per_item = rows.per_item(np.where(kept[rows.segment], alpha * target, 0.0), user_g)  # alpha t (p_u, 1)
    emb = np.concatenate([rows.per_item(np.ones(len(target)), user_upper), per_item[:, :dim]], axis=1)
    # sum of (r - mu - c_i - (q_i, 1).x_u)^2 over a user's rows, from the sums its draw used
    i, j = np.triu_indices(dim + 1)
    loss = ((batch.residual ** 2).sum() - 2 * (x * batch.rhs).sum()
            + (batch.gram * _upper(x) * np.where(i == j, 1.0, 2.0)).sum())  # x^T gram x, off-diagonals twice
    return _Sums(emb, per_item[:, dim], norms, max(float(loss), 0.0))  # a perfect fit may round below 0


def user_statistics(items: ItemParams, x: torch.Tensor, segment: torch.Tensor, item: torch.Tensor,
                    rating: torch.Tensor, hyper: Hyper, clip_norm: float) -> LocalUpdate:
    """The users' summed item statistics for their rated rows (each (user, item) once), each
    user's whole statistics vector clipped to L2 norm `clip_norm` first (0: off)."""
    sums = _statistics(_batch(items, segment, item, rating, x.shape[0]), x, hyper, clip_norm)
    return LocalUpdate(emb_delta=torch.as_tensor(sums.emb).float(), bias_delta=torch.as_tensor(sums.bias).float(),
                       global_bias_delta=torch.zeros(1), num_users=x.shape[0], loss_sum=sums.loss,
                       num_rows=len(item), norms=torch.as_tensor(sums.norms).float(),
                       pair_item=torch.as_tensor(np.asarray(item)), pair_user=torch.as_tensor(np.asarray(segment)))


def averaged_state(state: UserState, x: torch.Tensor, round_: int, hyper: Hyper) -> UserState:
    """The users' state after drawing x: emb and bias hold what the device scores with (the latest
    draw during burn-in, then the running mean of the draws), v[:, 0] the draws averaged, step the
    rounds taken (for the participation cap, as under MF)."""
    dim = hyper.dim
    count = state.v[:, 0].clone()
    mean = torch.cat([state.emb, state.bias[:, None]], dim=1).double()
    if round_ > hyper.burn_in:
        count += 1
        mean = mean + (x - mean) / count[:, None].double()
    else:
        mean = x
    v = state.v.clone()
    v[:, 0] = count
    mean = mean.float()
    return UserState(mean[:, :dim].contiguous(), mean[:, dim].contiguous(), state.m.clone(), v,
                     state.step + hyper.local_epochs)


def device_draw(items: ItemParams, state: UserState, rows, hyper: Hyper, clip_norm: float, round_: int,
                key: int) -> tuple[UserState, LocalUpdate]:
    """A device's round for the users of `rows`: draw, average, and their clipped statistics (summed in
    float64, sent in float32), USERS_PER_CHUNK users at a time (to bound the per-row arrays)."""
    segment = np.asarray(rows.train_segment, dtype=np.int64)
    order = np.argsort(segment, kind="stable")
    n, n_items = len(rows.users), items.emb.shape[0]
    bounds = np.searchsorted(segment[order], np.minimum(np.arange(0, n + USERS_PER_CHUNK, USERS_PER_CHUNK), n))
    emb, bias = np.zeros((n_items, hyper.upload_width)), np.zeros(n_items)
    states, norms, loss = [], [], 0.0
    for k, lo in enumerate(range(0, max(n, 1), USERS_PER_CHUNK)):
        picked = order[bounds[k]:bounds[k + 1]]
        seg, item = segment[picked] - lo, np.asarray(rows.train_item)[picked]
        rating = np.asarray(rows.train_rating, np.float64)[picked]
        users = np.arange(lo, min(n, lo + USERS_PER_CHUNK))
        batch = _batch(items, seg, item, rating, len(users))
        x = _draw(batch, rows.users[users], hyper, key)
        states.append(averaged_state(state.take(torch.as_tensor(users)), x, round_, hyper))
        sums = _statistics(batch, x, hyper, clip_norm)
        emb += sums.emb
        bias += sums.bias
        norms.append(sums.norms)
        loss += sums.loss
    return (UserState(*(torch.cat([getattr(s, f) for s in states]) for f in ("emb", "bias", "m", "v", "step"))),
            LocalUpdate(torch.as_tensor(emb).float(), torch.as_tensor(bias).float(), torch.zeros(1), n, loss,
                        len(segment), torch.as_tensor(np.concatenate(norms)).float(),
                        torch.as_tensor(np.asarray(rows.train_item)[order]), torch.as_tensor(segment[order])))


def draw_item_prior(x: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, precision) of the items' Normal-Wishart posterior given the current items x, drawn."""
    n, width = x.shape
    mean, cov = x.mean(dim=0), torch.cov(x.T, correction=0)
    beta, nu = PRIOR_BETA + n, width + n
    scale_inv = torch.eye(width, dtype=x.dtype) + n * cov + PRIOR_BETA * n / beta * torch.outer(mean, mean)
    scale = torch.linalg.inv(scale_inv)
    precision = _wishart(nu, (scale + scale.T) / 2, rng)
    z = torch.as_tensor(rng.standard_normal(width))
    return _gaussian(beta * precision, beta * precision @ (n * mean / beta), z), precision


def _wishart(df: float, scale: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One Wishart(df, scale) draw by Bartlett's decomposition."""
    width = scale.shape[0]
    bartlett = np.tril(rng.standard_normal((width, width)), -1)
    bartlett[np.diag_indices(width)] = np.sqrt(rng.chisquare(df - np.arange(width)))
    root, failed = torch.linalg.cholesky_ex(scale)
    if bool(failed):  # any L with L L^T = scale will do; the symmetric root where rounding defeats Cholesky
        values, vectors = torch.linalg.eigh(scale)
        root = (vectors * values.clamp(min=0).sqrt()[None, :]) @ vectors.T
    factor = root @ torch.as_tensor(bartlett)
    return factor @ factor.T


def item_matrices(emb: torch.Tensor, dim: int) -> torch.Tensor:
    """[items, dim + 1, dim + 1]: the summed alpha g g^T of each item, from its upper triangle in `emb`."""
    return _symmetric(torch.as_tensor(emb)[:, :(dim + 1) * (dim + 2) // 2].double(), dim + 1)


def inconsistent_items(emb: torch.Tensor, bias: torch.Tensor, dim: int, alpha: float, users: float,
                       max_residual: float) -> tuple[torch.Tensor, str]:
    """Items whose uploaded statistics no `users` honest users could sum to, and why (red-team findings).

    An honest item's M = sum alpha g g^T is positive semi-definite, its corner is alpha x its raters
    (g ends in 1), and its b = sum alpha t g lies in M's range with b^T M^+ b <= sum alpha t^2 <=
    corner x max t^2 (Cauchy-Schwarz). Per-user clipping scales a user's M and b alike and keeps all
    three. Without them one node could cancel the honest raters' precision (negative M), send a
    right-hand side with no precision behind it, or scale its statistics far past its user count."""
    matrices = item_matrices(emb, dim)
    rhs = torch.cat([torch.as_tensor(emb)[:, -dim:].double(), torch.as_tensor(bias)[:, None].double()], dim=1)
    scale = torch.diagonal(matrices, dim1=1, dim2=2).abs().sum(dim=1) + 1e-30
    corner = matrices[:, dim, dim]
    # b^T M^+ b, with M's eigenvalues floored at float32 rounding: an honest b has little along a direction
    # M barely spans (it is made of the same g's), a right-hand side sent without its g g^T has everything
    floor = 1e-6 * scale
    limit = corner * max_residual ** 2 * (1 + 1e-3) + 1e-6
    # Most items need no eigenvalues: a Cholesky factor of M + floor I exists only if M's eigenvalues pass
    # -floor (then M passes the first test), and b^T (M + floor I)^-1 b is then at least half the floored
    # energy (max(v, floor) >= (v + floor) / 2). Items it does not clear get the eigendecomposition.
    chol, failed = torch.linalg.cholesky_ex(matrices + floor[:, None, None] * torch.eye(dim + 1, dtype=torch.float64))
    bound = 2 * (1 + 1e-6) * (rhs * torch.cholesky_solve(rhs[:, :, None], chol)[:, :, 0]).sum(dim=1)
    unsure = torch.nonzero((failed != 0) | ~(bound <= limit))[:, 0]
    smallest, energy = torch.zeros(len(scale), dtype=torch.float64), torch.zeros(len(scale), dtype=torch.float64)
    if len(unsure):
        values, vectors = torch.linalg.eigh(matrices[unsure])
        smallest[unsure] = values[:, 0]
        along = (vectors.mT @ rhs[unsure, :, None])[:, :, 0]
        energy[unsure] = (along ** 2 / values.clamp(min=floor[unsure, None])).sum(dim=1)
    checks = (("its g g^T is not positive semi-definite", smallest < -1e-5 * scale),
              (f"its g g^T counts more than the reply's {users:g} user(s)", corner > alpha * users * (1 + 1e-5)),
              (f"its right-hand side is more than its g g^T carries (residuals beyond {max_residual:g} stars, or "
               "outside its range)", energy > limit))
    for why, bad in checks:
        if bool(bad.any()):
            return torch.nonzero(bad)[:, 0], why
    return torch.zeros(0, dtype=torch.long), ""


PSD_SLACK = 1e-8
"""_psd leaves a matrix as it is where its eigenvalues are above -PSD_SLACK x its trace. An honest sum's
negative eigenvalues are the float32 rounding of its uploads (each entry's 6e-8, so at most about
6e-8 x the trace; 2.5e-8 at most on ML-100K u1, on a third of the items): projecting them away moves
the draw no more than that rounding did, and costs an eigendecomposition of every item."""


def _psd(matrices: torch.Tensor) -> torch.Tensor:
    """The symmetric `matrices` projected onto the positive semi-definite cone (those within
    PSD_SLACK of it, shown by a Cholesky factor of M + PSD_SLACK trace(M) I, as they are)."""
    shift = PSD_SLACK * torch.diagonal(matrices, dim1=1, dim2=2).sum(dim=1).abs() + 1e-300
    _, failed = torch.linalg.cholesky_ex(matrices + shift[:, None, None] * torch.eye(matrices.shape[1],
                                                                                     dtype=matrices.dtype))
    outside = torch.nonzero(failed)[:, 0]
    if len(outside) == 0:
        return matrices
    values, vectors = torch.linalg.eigh(matrices[outside])
    matrices = matrices.clone()
    matrices[outside] = (vectors * values.clamp(min=0)[:, None, :]) @ vectors.mT
    return matrices


def draw_items(current: ItemParams, emb_sum: torch.Tensor, bias_sum: torch.Tensor, hyper: Hyper,
               rng: np.random.Generator) -> ItemParams:
    """The next item sample given the summed statistics (float64 sums of every user's upload)."""
    dim, n_items = hyper.dim, current.emb.shape[0]
    x = torch.cat([current.emb.double(), current.bias[:, None].double()], dim=1)
    prior_mean, prior_precision = draw_item_prior(x, rng)
    width = (dim + 1) * (dim + 2) // 2
    outer = item_matrices(emb_sum, dim)
    # Noise (DP) can make the summed g g^T indefinite; an honest sum is positive semi-definite, so it is
    # projected onto that cone (_psd), and the precision's eigenvalues kept at least the prior's smallest
    # (Weyl: an honest sum never goes below it). Both are post-processing; eigenvectors instead of a
    # Cholesky factor, so that no reply, however large, can make the draw fail.
    values, vectors = torch.linalg.eigh(prior_precision + _psd(outer))
    values = values.clamp(min=float(torch.linalg.eigvalsh(prior_precision)[0]))
    rhs = prior_precision @ prior_mean + torch.cat([emb_sum[:, width:].double(),
                                                    bias_sum[:, None].double()], dim=1)
    z = torch.as_tensor(rng.standard_normal((n_items, dim + 1)))
    # in the eigenbasis; z is rotated into it too, so the draw does not depend on the eigenvectors' signs
    # (it must move little when the sums do: central and federated sum in different orders)
    coords = ((vectors.mT @ rhs[:, :, None])[:, :, 0] / values + (vectors.mT @ z[:, :, None])[:, :, 0]
              / values.sqrt())
    drawn = (vectors @ coords[:, :, None])[:, :, 0].float()
    return ItemParams(drawn[:, :dim].contiguous(), drawn[:, dim].contiguous(), current.global_bias.clone())


class Sampler:
    """The server's side of the chain: the current item sample (what the next round trains against)
    and the running mean of the samples after burn-in (what is evaluated, saved and released)."""

    def __init__(self, items: ItemParams, hyper: Hyper, seed: int):
        self.items, self.hyper, self.seed = items, hyper, seed  # `items` is updated in place to the mean
        self.current = ItemParams(items.emb.clone(), items.bias.clone(), items.global_bias.clone())
        self.count = 0

    def step(self, sums: dict[str, torch.Tensor], round_: int) -> None:
        from .mf import ITEM_BIAS, ITEM_EMB
        from .randomness import seeded_rng

        rng = seeded_rng(self.seed, "bpmf-items", round_)
        self.current = draw_items(self.current, sums[ITEM_EMB], sums[ITEM_BIAS], self.hyper, rng)
        with torch.no_grad():
            if round_ > self.hyper.burn_in:
                self.count += 1
                self.items.emb += (self.current.emb - self.items.emb) / self.count
                self.items.bias += (self.current.bias - self.items.bias) / self.count
            else:
                self.items.emb.copy_(self.current.emb)
                self.items.bias.copy_(self.current.bias)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """What a checkpoint needs besides the mean: the chain's current sample and the count."""
        return {"bpmf.emb": self.current.emb.numpy().copy(), "bpmf.bias": self.current.bias.numpy().copy(),
                "bpmf.count": np.array([self.count], np.int64)}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.current = ItemParams(torch.as_tensor(arrays["bpmf.emb"]), torch.as_tensor(arrays["bpmf.bias"]),
                                  self.items.global_bias.clone())
        self.count = int(arrays["bpmf.count"][0])
