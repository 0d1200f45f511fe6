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

The statistics travel as "item-gram" (the triangles) and "item-rhs" (alpha t g). What they give
away: one user's g g^T has last column (p_u, 1), so a single upload holds the user's vector and each
rating up to b_u; and an item's sum over its raters is a matrix of rank = its rater count spanned by
their g's, from which a review read a third of ML-100K's users out of one SecAgg+ sum. DP noise, in
turn, is more than this chain takes at a useful epsilon. So BPMF admits no privacy mechanism (its
`refuses` says why, for each): a trusted aggregator's model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch

from .algorithm import (
    CLIPPING,
    DECOYS,
    DP,
    PARTIAL,
    SECURE_AGGREGATION,
    Algorithm,
    Contributions,
    DeviceKeys,
    ServerState,
    Statistic,
    UserState,
)
from .defaults import BPMF_DIM, BPMF_REG, Hyper
from .factors import (
    GLOBAL_BIAS,
    ITEM_BIAS,
    ITEM_EMB,
    ItemParams,
    Users,
    evaluate_view,
    init_items,
    initial_global_bias,
    ridge_fit,
    seeded_vectors,
    top_n,
)
from .randomness import mix64, seeded_rng, uniform01

ITEM_GRAM, ITEM_RHS = "item-gram", "item-rhs"
RESIDUAL_SPANS = 10.0
"""A residual r - mu - b_u beyond this many rating spans would need a user bias tens of prior standard
deviations out: the consistency check's bound on what honest statistics carry."""

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


class BPMFContributions(Contributions):
    """A batch's statistics, kept factored: a row uploads (alpha tri(g g^T)) and alpha t g, with g = (p_u, 1)
    the same on all of a user's rows and t = r - mu - b_u, so the per-item sums are sparse products with
    per-user vectors, and a user's norm follows from its row count and its sum of t^2 (no (K + 1)^2 array
    per row is built)."""

    def __init__(self, batch: _Batch, x: torch.Tensor, hyper: Hyper):
        dim, n, rows = hyper.dim, x.shape[0], batch.rows
        self.alpha, self.rows, self.dim = hyper.bpmf_alpha, rows, dim
        x64 = x.double().numpy()
        self.g = np.concatenate([x64[:, :dim], np.ones((n, 1))], axis=1)
        self.target = batch.centred - x64[rows.segment, dim]  # what the item's (q_i, c_i) explains
        self.num_users, self.num_rows = n, len(self.target)
        self.pair_user, self.pair_item = torch.as_tensor(rows.segment), torch.as_tensor(rows.item)
        # sum of (r - mu - c_i - (q_i, 1).x_u)^2 over a user's rows, from the sums its draw used
        i, j = np.triu_indices(dim + 1)
        loss = ((batch.residual ** 2).sum() - 2 * (x64 * batch.rhs).sum()
                + (batch.gram * _upper(x64) * np.where(i == j, 1.0, 2.0)).sum())  # x^T gram x, off-diagonals twice
        self.loss_sum = max(float(loss), 0.0)  # a perfect fit may round below 0

    def user_norms(self) -> torch.Tensor:
        upper = _upper(self.g)
        target_sq = np.bincount(self.rows.segment, weights=self.target ** 2, minlength=self.num_users)
        counts = np.diff(self.rows.indptr)
        return torch.as_tensor(self.alpha * np.sqrt(counts * (upper ** 2).sum(axis=1)
                                                    + target_sq * (self.g ** 2).sum(axis=1)))

    def summed(self, scale, statistics, n_items):
        scale = scale.double().numpy()
        gram = self.rows.per_item(np.ones(self.num_rows), self.alpha * scale[:, None] * _upper(self.g))
        rhs = self.rows.per_item(self.alpha * self.target, scale[:, None] * self.g)
        return {ITEM_GRAM: torch.as_tensor(gram), ITEM_RHS: torch.as_tensor(rhs)}


def averaged_state(state: UserState, x: torch.Tensor, round_: int, burn_in: int) -> UserState:
    """The users' state after drawing x: emb and bias hold what the device scores with (the latest draw
    during burn-in, then the running mean of the draws), `draws` how many draws the mean holds."""
    dim = x.shape[1] - 1
    count = state["draws"].clone()
    mean = torch.cat([state["emb"], state["bias"][:, None]], dim=1).double()
    if round_ > burn_in:
        count += 1
        mean = mean + (x - mean) / count[:, None].double()
    else:
        mean = x
    mean = mean.float()
    return {**state, "emb": mean[:, :dim].contiguous(), "bias": mean[:, dim].contiguous(), "draws": count}


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


def inconsistent_items(gram: torch.Tensor, rhs: torch.Tensor, dim: int, alpha: float, users: float,
                       max_residual: float) -> tuple[torch.Tensor, str]:
    """Items whose uploaded statistics no `users` honest users could sum to, and why (red-team findings).

    An honest item's M = sum alpha g g^T is positive semi-definite, its corner is alpha x its raters
    (g ends in 1), and its b = sum alpha t g lies in M's range with b^T M^+ b <= sum alpha t^2 <=
    corner x max t^2 (Cauchy-Schwarz). Per-user clipping scales a user's M and b alike and keeps all
    three. Without them one node could cancel the honest raters' precision (negative M), send a
    right-hand side with no precision behind it, or scale its statistics far past its user count."""
    matrices = _symmetric(torch.as_tensor(gram).double(), dim + 1)
    rhs = torch.as_tensor(rhs).double()
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


def draw_items(current: ItemParams, gram: torch.Tensor, rhs_sum: torch.Tensor, hyper: Hyper,
               rng: np.random.Generator) -> ItemParams:
    """The next item sample given the summed statistics (float64 sums of every user's upload)."""
    dim, n_items = hyper.dim, current.emb.shape[0]
    x = torch.cat([current.emb.double(), current.bias[:, None].double()], dim=1)
    prior_mean, prior_precision = draw_item_prior(x, rng)
    outer = _symmetric(torch.as_tensor(gram).double(), dim + 1)
    # Noise (DP) can make the summed g g^T indefinite; an honest sum is positive semi-definite, so it is
    # projected onto that cone (_psd), and the precision's eigenvalues kept at least the prior's smallest
    # (Weyl: an honest sum never goes below it). Both are post-processing; eigenvectors instead of a
    # Cholesky factor, so that no reply, however large, can make the draw fail.
    values, vectors = torch.linalg.eigh(prior_precision + _psd(outer))
    values = values.clamp(min=float(torch.linalg.eigvalsh(prior_precision)[0]))
    rhs = prior_precision @ prior_mean + torch.as_tensor(rhs_sum).double()
    z = torch.as_tensor(rng.standard_normal((n_items, dim + 1)))
    # in the eigenbasis; z is rotated into it too, so the draw does not depend on the eigenvectors' signs
    # (it must move little when the sums do: central and federated sum in different orders)
    coords = ((vectors.mT @ rhs[:, :, None])[:, :, 0] / values + (vectors.mT @ z[:, :, None])[:, :, 0]
              / values.sqrt())
    drawn = (vectors @ coords[:, :, None])[:, :, 0].float()
    return ItemParams(drawn[:, :dim].contiguous(), drawn[:, dim].contiguous(), current.global_bias.clone())


class ChainState(ServerState):
    """The server's side of the chain: the current item sample (what the next round trains against) and
    the running mean of the samples after burn-in (what is evaluated, saved and released)."""

    def __init__(self, items: ItemParams):
        self.mean = items
        self.current = ItemParams(items.emb.clone(), items.bias.clone(), items.global_bias.clone())
        self.count = 0

    def broadcast(self) -> dict[str, np.ndarray]:
        return {k: v.numpy().copy() for k, v in self.current.tensors().items()}

    def model(self) -> dict[str, np.ndarray]:
        return {k: v.numpy().copy() for k, v in self.mean.tensors().items()}

    def arrays(self) -> dict[str, np.ndarray]:
        return {**{f"mean.{k}": v for k, v in self.model().items()},
                **{f"current.{k}": v for k, v in self.broadcast().items()}, "count": np.array([self.count])}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        self.mean = ItemParams.from_arrays({k[5:]: v for k, v in arrays.items() if k.startswith("mean.")})
        self.current = ItemParams.from_arrays({k[8:]: v for k, v in arrays.items() if k.startswith("current.")})
        self.count = int(arrays["count"][0])


class BPMF(Algorithm):
    name = "bpmf"
    title = "Bayesian MF by Gibbs sampling"
    refuses = {
        DP: "its Gibbs chain does not hold up to DP noise at a useful epsilon (RMSE 1.54-1.71 at epsilon 6.8 on "
            "synthetic data, where MF gets 0.86)",
        SECURE_AGGREGATION: "an item's summed g g^T has the rank of its rater count, and the server reads users off "
                            "it even through SecAgg+",
        DECOYS: "it takes no decoys: a decoy's statistics would need a made-up vector and rating",
        CLIPPING: "its statistics grow with a user's ratings, so a clipping norm sized for MF's updates would crush "
                  "them",
        PARTIAL: "it draws each item from all its raters' statistics every round (use every user each round)",
    }
    settings_read = frozenset({"dim", "reg_user", "reg_bias", "init_std", "bpmf_alpha", "burn_in"})
    implicit_feedback = False
    comparable_norms = False  # a heavy user's honest statistics are far above the round's median

    @classmethod
    def defaults(cls, implicit: bool) -> dict:
        """K = 10 and its fixed user prior's precisions (reg_item unused: the items' prior is learned)."""
        return {"dim": BPMF_DIM, **BPMF_REG}

    def statistics(self) -> dict[str, Statistic]:
        dim = self.settings.dim
        return {ITEM_GRAM: Statistic((dim + 1) * (dim + 2) // 2), ITEM_RHS: Statistic(dim + 1)}

    def init_server(self, strategy: str = "", server_lr: float = 0.0) -> ChainState:
        s = self.settings
        return ChainState(init_items(self.n_items, s.dim, s.init_std, s.seed,
                                     initial_global_bias(False, self.rating_scale)))

    def new_users(self, users: np.ndarray, population: int, rng: np.random.Generator | None) -> UserState:
        s = self.settings
        emb = seeded_vectors(users, population, s.dim, s.init_std, s.seed)  # never used: the first draw replaces it
        return {"emb": emb, "bias": torch.zeros(len(users)), "draws": torch.zeros(len(users))}

    def train(self, shared, state, rows, round_: int, keys: DeviceKeys, decoys=None):
        """Draw each user's (p_u, b_u) from its conditional given the items; average the draws after burn-in;
        the users' statistics for the server's item draw. The normals are counter-based per (seed, round,
        user), so central and federated runs draw alike."""
        items = ItemParams(shared[ITEM_EMB], shared[ITEM_BIAS], shared[GLOBAL_BIAS])
        batch = _batch(items, rows.train_segment, rows.train_item, rows.train_rating, len(rows.users))
        x = _draw(batch, rows.users, self.settings, draw_key(self.settings.seed, round_))
        return averaged_state(state, x, round_, self.settings.burn_in), BPMFContributions(batch, x, self.settings)

    def server_step(self, state: ChainState, sums, weight: float, round_: int, noise_std: float = 0.0) -> None:
        """Sums, not means: they are the items' sufficient statistics. A draw of the items, then the mean."""
        rng = seeded_rng(self.settings.seed, "bpmf-items", round_)
        state.current = draw_items(state.current, sums[ITEM_GRAM], sums[ITEM_RHS], self.settings, rng)
        with torch.no_grad():
            if round_ > self.settings.burn_in:
                state.count += 1
                state.mean.emb += (state.current.emb - state.mean.emb) / state.count
                state.mean.bias += (state.current.bias - state.mean.bias) / state.count
            else:
                state.mean.emb.copy_(state.current.emb)
                state.mean.bias.copy_(state.current.bias)

    def check_sums(self, sums, users: float) -> str | None:
        """A reply's statistics must be a possible sum of `users` honest users' (inconsistent_items)."""
        span = self.rating_scale[1] - self.rating_scale[0]
        bad, why = inconsistent_items(sums[ITEM_GRAM], sums[ITEM_RHS], self.settings.dim, self.settings.bpmf_alpha,
                                      users, RESIDUAL_SPANS * max(span, 1.0))
        return f"item {int(bad[0])}: {why} ({len(bad)} item(s)): not a sum of users' statistics" if len(bad) else None

    def evaluate(self, model, state, rows, k: int) -> dict[str, float]:
        items = ItemParams(model[ITEM_EMB], model[ITEM_BIAS], model[GLOBAL_BIAS])
        return evaluate_view(items, Users(state["emb"], state["bias"]), rows, False, k, self.rating_scale)

    def fit_user(self, model, items: np.ndarray, ratings: np.ndarray) -> Users:
        """The mean of the user's conditional, the centre of its device's draws (the prior's precision is
        absolute and weighs against alpha)."""
        s = self.settings
        penalty = torch.tensor([s.reg_user] * s.dim + [s.reg_bias], dtype=torch.float64)
        shared = ItemParams(model[ITEM_EMB], model[ITEM_BIAS], model[GLOBAL_BIAS])
        return ridge_fit(shared, items, ratings, torch.zeros(s.dim, dtype=torch.float64), penalty, 1.0 / s.bpmf_alpha)

    def recommend(self, model, items, ratings, n, hide=None):
        return self.top_n(model, self.fit_user(model, items, ratings), items, n, hide)

    def top_n(self, model, user: Users, rated, n: int, hide=None):
        shared = ItemParams(model[ITEM_EMB], model[ITEM_BIAS], model[GLOBAL_BIAS])
        return top_n(shared, user, rated, n, self.rating_scale, hide)
