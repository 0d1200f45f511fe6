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

import numpy as np
import torch

from .local import USERS_PER_CHUNK, LocalUpdate, clip_per_user
from .mf import Hyper, ItemParams, UserState
from .randomness import mix64, uniform01

# Normal-Wishart hyperprior of the items (the paper's choice): mean 0, beta0 = 2, nu0 = K + 1, W0 = I.
PRIOR_BETA = 2.0


def _triangle(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.as_tensor(t) for t in np.triu_indices(dim + 1))


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


def draw_users(items: ItemParams, segment: torch.Tensor, item: torch.Tensor, rating: torch.Tensor,
               users: np.ndarray, hyper: Hyper, key: int) -> torch.Tensor:
    """[users, dim + 1] draws of (p_u, b_u) from each user's conditional given the items."""
    n, dim = len(users), hyper.dim
    g = torch.cat([items.emb[item].double(), torch.ones(len(item), 1, dtype=torch.float64)], dim=1)
    residual = rating.double() - items.global_bias.double() - items.bias[item].double()
    prior = torch.tensor([hyper.reg_user] * dim + [hyper.reg_bias], dtype=torch.float64)
    precision = torch.diag(prior).expand(n, dim + 1, dim + 1).clone()
    precision.index_add_(0, segment, hyper.bpmf_alpha * g[:, :, None] * g[:, None, :])
    rhs = torch.zeros(n, dim + 1, dtype=torch.float64).index_add_(0, segment, hyper.bpmf_alpha * residual[:, None] * g)
    return _gaussian(precision, rhs, normal_draws(users, dim + 1, key))


def user_statistics(items: ItemParams, x: torch.Tensor, segment: torch.Tensor, item: torch.Tensor,
                    rating: torch.Tensor, hyper: Hyper, clip_norm: float) -> LocalUpdate:
    """The users' summed item statistics for their rated rows (each (user, item) once), each
    user's whole statistics vector clipped to L2 norm `clip_norm` first (0: off)."""
    dim, n_items = hyper.dim, items.emb.shape[0]
    upper = _triangle(dim)
    g = torch.cat([x[segment, :dim], torch.ones(len(segment), 1, dtype=x.dtype)], dim=1)
    outer = (g[:, :, None] * g[:, None, :])[:, upper[0], upper[1]]
    target = rating.double() - items.global_bias.double() - x[segment, dim]  # what the item's (q_i, c_i) explains
    residual = target - items.bias[item].double() - (x[segment, :dim] * items.emb[item].double()).sum(dim=1)
    alpha = hyper.bpmf_alpha
    rows = torch.cat([alpha * outer, alpha * target[:, None] * g[:, :dim]], dim=1).float()
    row_bias = (alpha * target).float()
    n = x.shape[0]
    rows, row_bias, _, norms = clip_per_user(segment, rows, row_bias, torch.zeros(n), clip_norm)
    loss = float((residual ** 2).sum())
    return LocalUpdate(emb_delta=torch.zeros(n_items, rows.shape[1]).index_add_(0, item, rows),
                       bias_delta=torch.zeros(n_items).index_add_(0, item, row_bias),
                       global_bias_delta=torch.zeros(1), num_users=n, loss_sum=loss, num_rows=len(item),
                       norms=norms, pair_item=item, pair_user=segment)


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
    """A device's round for the users of `rows`: draw, average, and their clipped statistics,
    USERS_PER_CHUNK users at a time (a row's outer product is (dim + 1)^2 floats)."""
    segment = torch.as_tensor(rows.train_segment)
    order = torch.argsort(segment, stable=True)
    n = len(rows.users)
    bounds = torch.searchsorted(segment[order], torch.arange(0, n + USERS_PER_CHUNK, USERS_PER_CHUNK).clamp(max=n))
    states, updates = [], []
    for k, lo in enumerate(range(0, max(n, 1), USERS_PER_CHUNK)):
        picked = order[bounds[k]:bounds[k + 1]]
        seg, item = segment[picked] - lo, torch.as_tensor(rows.train_item)[picked]
        rating = torch.as_tensor(rows.train_rating, dtype=torch.float64)[picked]
        users = np.arange(lo, min(n, lo + USERS_PER_CHUNK))
        x = draw_users(items, seg, item, rating, rows.users[users], hyper, key)
        states.append(averaged_state(state.take(torch.as_tensor(users)), x, round_, hyper))
        update = user_statistics(items, x, seg, item, rating, hyper, clip_norm)
        update.pair_user += lo
        updates.append(update)
    first = updates[0]
    for other in updates[1:]:
        first.emb_delta += other.emb_delta
        first.bias_delta += other.bias_delta
    return (UserState(*(torch.cat([getattr(s, f) for s in states]) for f in ("emb", "bias", "m", "v", "step"))),
            LocalUpdate(first.emb_delta, first.bias_delta, first.global_bias_delta, n,
                        sum(u.loss_sum for u in updates), sum(u.num_rows for u in updates),
                        torch.cat([u.norms for u in updates]), torch.cat([u.pair_item for u in updates]),
                        torch.cat([u.pair_user for u in updates])))


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
    upper = _triangle(dim)
    outer = torch.zeros(emb.shape[0], dim + 1, dim + 1, dtype=torch.float64)
    outer[:, upper[0], upper[1]] = torch.as_tensor(emb)[:, :upper[0].numel()].double()
    return outer + outer.mT - torch.diag_embed(torch.diagonal(outer, dim1=1, dim2=2))


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
    values, vectors = torch.linalg.eigh(matrices)
    scale = torch.diagonal(matrices, dim1=1, dim2=2).abs().sum(dim=1) + 1e-30
    corner = matrices[:, dim, dim]
    checks = (("its g g^T is not positive semi-definite", values[:, 0] < -1e-5 * scale),
              (f"its g g^T counts more than the reply's {users:g} user(s)", corner > alpha * users * (1 + 1e-5)))
    for why, bad in checks:
        if bool(bad.any()):
            return torch.nonzero(bad)[:, 0], why
    # b^T M^+ b, with M's eigenvalues floored at float32 rounding: an honest b has little along a direction
    # M barely spans (it is made of the same g's), a right-hand side sent without its g g^T has everything
    along = (vectors.mT @ rhs[:, :, None])[:, :, 0]
    energy = (along ** 2 / values.clamp(min=1e-6 * scale[:, None])).sum(dim=1)
    excess = energy > corner * max_residual ** 2 * (1 + 1e-3) + 1e-6
    if bool(excess.any()):
        return torch.nonzero(excess)[:, 0], (f"its right-hand side is more than its g g^T carries (residuals "
                                             f"beyond {max_residual:g} stars, or outside its range)")
    return torch.zeros(0, dtype=torch.long), ""


def draw_items(current: ItemParams, emb_sum: torch.Tensor, bias_sum: torch.Tensor, hyper: Hyper,
               rng: np.random.Generator) -> ItemParams:
    """The next item sample given the summed statistics (float64 sums of every user's upload)."""
    dim, n_items = hyper.dim, current.emb.shape[0]
    x = torch.cat([current.emb.double(), current.bias[:, None].double()], dim=1)
    prior_mean, prior_precision = draw_item_prior(x, rng)
    upper = _triangle(dim)
    outer = item_matrices(emb_sum, dim)
    # Noise (DP) can make the summed g g^T indefinite; an honest sum is positive semi-definite, so it is
    # projected onto that cone, and the precision's eigenvalues kept at least the prior's smallest (Weyl:
    # an honest sum never goes below it). Both are post-processing; eigenvectors instead of a Cholesky
    # factor, so that no reply, however large, can make the draw fail.
    values, vectors = torch.linalg.eigh(outer)
    outer = (vectors * values.clamp(min=0)[:, None, :]) @ vectors.mT
    values, vectors = torch.linalg.eigh(prior_precision + outer)
    values = values.clamp(min=float(torch.linalg.eigvalsh(prior_precision)[0]))
    rhs = prior_precision @ prior_mean + torch.cat([emb_sum[:, upper[0].numel():].double(),
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
