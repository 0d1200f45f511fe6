"""Private sufficient statistics: item offsets from clipped per-user sums, in two or three releases.

r(u, i) = mu + b_u + d_i + beta_u . F_i, where the server releases mu, the item offsets d and public item
features F, and each device solves its own (b_u, beta_u) exactly by ridge regression. Every user takes
part in every release (few, full-participation releases: under distributed DP the server then learns no
more than readers, so epsilon against it is the reported one). A user's weight is w_u = 1/sqrt(n_u) on
each rated item, so that sum_i w_u^2 = 1 whatever its rating count.

- round 1: per item w_u on its rated items (the weights W), and one global row (clip(m_u - mid, +-h), 1)
  (m_u the user's mean rating; mid and h the scale's middle and half-span): the global mean mu and the
  count N. The server sets the residual clip c from the released weights alone (`clip_from_weights`);
- round 2: per item w_u clip(r - m_u, +-c) (offset sums S). The server shrinks each item's offset
  towards a popularity prior with the noise level known (`shrink_offsets`);
- round 3 (epsilon >= 8, and without DP): per item w_u clip(m_u - o_u, +-c/6), o_u the device's offset
  given the released d: a correction of S for the users' own offsets.
The features are F = 0.3 standardize([d, log(1 + W)]). Defaults are a rule of epsilon (`Plan.of`), set on
a validation cut of ML-100K u1 (the prototype's measurements are in the run's docs), never on test.

No noise here: fedrec.privacy clips and noises the sums. Within a round, blocks get their share of the
budget by scale: each block is scaled so that its bound is sqrt(share / round's share) (the scaled
statistics of a user have norm <= 1 = C), uniform noise on the sum then gives each block its own noise
multiplier z / sqrt(share), and the server unscales. The server is told the noise std of the sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm

from .algorithm import (
    DECOYS,
    LOCAL_DP,
    PARTIAL,
    Algorithm,
    DeviceKeys,
    RowContributions,
    ServerState,
    Statistic,
    UserState,
)
from .factors import GLOBAL_BIAS, ITEM_BIAS, ITEM_EMB, ItemParams, Users, evaluate_view, ridge_fit, top_n

WEIGHTS, OFFSETS, GLOBALS = "item-weight", "item-offset", "globals"  # the statistics a device sends
CLIP = "clip"  # broadcast: the residual clips (c, c2) the server set
FEATURES = 2  # [d, log(1 + W)]
FEATURE_SCALE = 0.3
LAM_USER = 5.0  # the device's ridge on its offset b_u (towards 0: o_u towards mu)
LAM_FEATURES = 10.0  # the device's ridge on beta_u
TAU_PRIOR = 0.2  # spread of item offsets around the popularity prior (estimated from the sums where it can be)
CLIP_TAU, CLIP_FLOOR, CLIP_PLAIN = 0.4, 0.5, 3.0  # the clip rule; c without noise
CORRECTION_CLIP = 1 / 6  # c2 = c / 6


@dataclass(frozen=True)
class Plan:
    """The rule of epsilon: shares of the budget per block, the offsets' ridge, and whether round 3 runs."""

    shares: dict[str, float]  # W (weights), g (globals), S (offsets), S2 (correction): relative
    lam0: float  # ridge of an offset per unit of weight

    @staticmethod
    def of(epsilon: float) -> Plan:
        eps = epsilon if epsilon > 0 else math.inf  # not private: the settings of the largest budgets
        shares = {"W": 0.35 if eps <= 2 else 0.2, "g": 0.02, "S": 0.6}
        if eps >= 8:
            shares["S2"] = 0.1
        return Plan(shares, 5.0 if eps <= 4 else 0.1)

    @property
    def rounds(self) -> list[tuple[str, ...]]:
        return [("W", "g"), ("S",)] + ([("S2",)] if "S2" in self.shares else [])

    def weights(self) -> tuple[float, ...]:
        total = sum(self.shares.values())
        return tuple(sum(self.shares[b] for b in blocks) / total for blocks in self.rounds)

    def scale(self, block: str, bound: float) -> float:
        """The factor on a block whose norm is at most `bound`: its scaled bound is sqrt(share / round's share)."""
        round_share = next(sum(self.shares[b] for b in r) for r in self.rounds if block in r)
        return math.sqrt(self.shares[block] / round_share) / bound


def clip_from_weights(W: np.ndarray, z_s: float, sigma_w: float) -> float:
    """Residual clip from the released weights alone: the clipping shrinkage of an offset of size CLIP_TAU
    (residuals ~ N(0, 1)) against the noise on a rating-weighted item, (z_s c)^2 sum_i (1/W_i) / sum_i W_i."""
    if z_s == 0:
        return CLIP_PLAIN
    floored = np.maximum(W, max(0.5, sigma_w))
    noise = np.sum(1 / floored) / np.sum(floored)
    cs = np.linspace(0.25, 3.0, 111)
    mse = (2 * (1 - norm.cdf(cs))) ** 2 * CLIP_TAU ** 2 + (z_s * cs) ** 2 * noise
    return float(max(CLIP_FLOOR, cs[np.argmin(mse)]))


def shrink_offsets(S: np.ndarray, W: np.ndarray, sigma_s: float, sigma_w: float, w_bar: float, lam0: float,
                   c: float) -> np.ndarray:
    """Each item's offset, the posterior mean given its noisy sums: prior N(a + b log(1 + W), tau^2) fitted
    on the items, S ~ d W + noise of variance w_bar W s^2 + sigma_s^2 (s = min(c, 1)); tau estimated by
    moments on the well-measured items (at least 0.05)."""
    Wp = np.maximum(W, 0.0)
    known = Wp > 1e-9
    s2 = min(c, 1.0) ** 2
    tau, prior = TAU_PRIOR, np.zeros_like(S)
    for _ in range(2):
        if known.sum() > 10:
            x, y = np.log1p(Wp[known]), S[known] / Wp[known]
            v = (w_bar * Wp[known] * s2 + sigma_s ** 2) / Wp[known] ** 2 + tau ** 2
            X = np.stack([np.ones_like(x), x], 1) / np.sqrt(v)[:, None]
            coef = np.linalg.lstsq(X, y / np.sqrt(v), rcond=None)[0]
            prior = coef[0] + coef[1] * np.log1p(Wp)
        good = Wp > max(3 * sigma_w, 1e-9)
        if good.sum() > 10:
            y = S[good] / Wp[good]
            noise = (w_bar * Wp[good] * s2 + sigma_s ** 2) / Wp[good] ** 2
            tau = float(np.sqrt(max(np.mean((y - prior[good]) ** 2 - noise), 0.05 ** 2)))
    lam = lam0 * w_bar + sigma_s ** 2 / (tau ** 2 * np.maximum(Wp, 1e-3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(known, (S + lam * prior) / (Wp + lam), prior)


def public_features(d: np.ndarray, W: np.ndarray) -> np.ndarray:
    F = np.stack([d, np.log1p(np.maximum(W, 0.0))], 1)
    return (F - F.mean(0)) / np.maximum(F.std(0), 1e-9) * FEATURE_SCALE


class StatsServer(ServerState):
    """The released sums so far (noisy where DP), what the server derived from them, and the model."""

    KEYS = ("W", "S", "G", "N", "sigma_w", "sigma_s", "mu", "c", "c2", "d", "F")

    def __init__(self, n_items: int, mid: float):
        self.W, self.S = np.zeros(n_items), np.zeros(n_items)
        self.G, self.N, self.sigma_w, self.sigma_s = 0.0, 0.0, 0.0, 0.0
        self.mu, self.c, self.c2 = mid, CLIP_PLAIN, CLIP_PLAIN * CORRECTION_CLIP
        self.d, self.F = np.zeros(n_items), np.zeros((n_items, FEATURES))

    def broadcast(self) -> dict[str, np.ndarray]:
        return {GLOBAL_BIAS: np.array([self.mu], np.float32), ITEM_BIAS: self.d.astype(np.float32),
                CLIP: np.array([self.c, self.c2], np.float32)}

    def model(self) -> dict[str, np.ndarray]:
        return {ITEM_EMB: self.F.astype(np.float32), ITEM_BIAS: self.d.astype(np.float32),
                GLOBAL_BIAS: np.array([self.mu], np.float32)}

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.atleast_1d(np.asarray(getattr(self, k), np.float64)) for k in self.KEYS}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        for k in self.KEYS:
            value = np.asarray(arrays[k], np.float64)
            setattr(self, k, value.copy() if value.ndim > 1 or k in ("W", "S", "d") else float(value[0]))


class DPStats(Algorithm):
    name = "dpstats"
    title = "private sufficient statistics (item offsets and features)"
    refuses = {
        PARTIAL: "its few releases need every user in each: a full-participation release is what makes epsilon "
                 "against the server the reported one, and the server's sums assume everyone",
        DECOYS: "it sends per-item sums over every rated item; a decoy would need a made-up rating and weight",
        LOCAL_DP: "its releases carry unequal shares of the budget, which one noise per device cannot give, and "
                  "local noise on every user's sum would drown the item statistics; use --dp central or distributed",
    }
    settings_read = frozenset()  # its defaults are a rule of epsilon (Plan.of)
    implicit_feedback = False
    bounded_norm = 1.0  # the scaled blocks of a round have norm <= 1 by construction

    @classmethod
    def defaults(cls, implicit: bool) -> dict:
        return {"dim": FEATURES, "reg_user": LAM_FEATURES, "reg_item": 0.0, "reg_bias": LAM_USER}

    @classmethod
    def release_weights(cls, epsilon: float) -> tuple[float, ...]:
        return Plan.of(epsilon).weights()

    def __init__(self, settings, n_items: int, rating_scale: tuple[float, float]):
        super().__init__(settings, n_items, rating_scale)
        self.plan = Plan.of(settings.epsilon)
        self.mid, self.half = sum(rating_scale) / 2, (rating_scale[1] - rating_scale[0]) / 2

    def statistics(self) -> dict[str, Statistic]:
        return {WEIGHTS: Statistic(1), OFFSETS: Statistic(1), GLOBALS: Statistic(2, per_item=False)}

    def new_users(self, users: np.ndarray, population: int, rng: np.random.Generator | None) -> UserState:
        return {}  # nothing to keep between rounds: a device recomputes its sums from its ratings

    def init_server(self, strategy: str = "", server_lr: float = 0.0) -> StatsServer:
        return StatsServer(self.n_items, self.mid)

    # ------------------------------------------------------------------ device
    def train(self, shared, state, rows, round_: int, keys: DeviceKeys, decoys=None):
        """This round's statistics of each user (zeros in the statistics the round does not release)."""
        n = len(rows.users)
        seg = torch.as_tensor(rows.train_segment, dtype=torch.long)
        item = torch.as_tensor(rows.train_item, dtype=torch.long)
        rating = torch.as_tensor(rows.train_rating, dtype=torch.float64)
        counts = torch.bincount(seg, minlength=n).double()
        has = counts > 0
        w = 1 / counts.clamp(min=1).sqrt()
        mean = torch.zeros(n, dtype=torch.float64).index_add_(0, seg, rating) / counts.clamp(min=1)
        weight, offset = torch.zeros(len(seg), dtype=torch.float64), torch.zeros(len(seg), dtype=torch.float64)
        globals_ = torch.zeros(n, 2, dtype=torch.float64)
        c, c2 = (float(v) for v in np.asarray(shared[CLIP], np.float64))
        if round_ == 1:
            weight = self.plan.scale("W", 1.0) * w[seg]
            bound = math.sqrt(self.half ** 2 + 1)
            globals_ = self.plan.scale("g", bound) * torch.stack([(mean - self.mid).clamp(-self.half, self.half),
                                                                   has.double()], 1) * has[:, None]
        elif round_ == 2:
            offset = self.plan.scale("S", c) * w[seg] * (rating - mean[seg]).clamp(-c, c)
        elif round_ == 3 and "S2" in self.plan.shares:
            mu = float(np.asarray(shared[GLOBAL_BIAS])[0])
            d = torch.as_tensor(np.asarray(shared[ITEM_BIAS]), dtype=torch.float64)
            own = (torch.zeros(n, dtype=torch.float64).index_add_(0, seg, rating - d[item]) + LAM_USER * mu) \
                / (counts + LAM_USER)
            offset = self.plan.scale("S2", c2) * w[seg] * (mean - own).clamp(-c2, c2)[seg]
        pair_key, pair_of_row = torch.unique(seg * self.n_items + item, return_inverse=True)  # each pair once
        rows_ = {name: torch.zeros(len(pair_key), 1, dtype=torch.float64).index_add_(0, pair_of_row, value[:, None])
                 .float() for name, value in ((WEIGHTS, weight), (OFFSETS, offset))}
        return state, RowContributions(n, pair_key // self.n_items, pair_key % self.n_items, rows_,
                                       {GLOBALS: globals_.float()}, num_rows=len(seg))

    # ------------------------------------------------------------------ server
    def server_step(self, state: StatsServer, sums, weight: float, round_: int, noise_std: float = 0.0) -> None:
        """Unscale the round's blocks, and derive from the released sums what comes next (`noise_std`: the
        std per coordinate of the noise in `sums`, 0 without DP)."""
        plan, weights = self.plan, self.plan.weights()
        if round_ == 1:
            a_w, a_g = plan.scale("W", 1.0), plan.scale("g", math.sqrt(self.half ** 2 + 1))
            state.W = sums[WEIGHTS].double().numpy()[:, 0] / a_w
            state.G, state.N = (float(v) / a_g for v in sums[GLOBALS].double().numpy())
            state.sigma_w = noise_std / a_w
            state.mu = self.mid + state.G / max(state.N, 1.0)
            # the offsets' noise in units of one user's bound: the next round's std, by the weights' ratio
            z_s = noise_std * math.sqrt(weights[0] / weights[1])
            state.c = clip_from_weights(state.W, z_s, state.sigma_w)
            state.c2 = state.c * CORRECTION_CLIP
            return
        if round_ == 2:
            state.S = sums[OFFSETS].double().numpy()[:, 0] / plan.scale("S", state.c)
            state.sigma_s = noise_std / plan.scale("S", state.c)
        elif round_ == 3 and "S2" in plan.shares:
            state.S = state.S + sums[OFFSETS].double().numpy()[:, 0] / plan.scale("S2", state.c2)
            state.sigma_s = math.hypot(state.sigma_s, noise_std / plan.scale("S2", state.c2))
        else:
            return
        w_bar = max(state.N, 1.0) / max(np.maximum(state.W, 0).sum(), 1e-9)  # a rating's typical weight
        state.d = shrink_offsets(state.S, state.W, state.sigma_s, state.sigma_w, w_bar, plan.lam0, state.c)
        state.F = public_features(state.d, state.W)

    # ------------------------------------------------------------------ scoring
    def _items(self, model) -> ItemParams:
        return ItemParams(torch.as_tensor(np.asarray(model[ITEM_EMB], np.float32)),
                          torch.as_tensor(np.asarray(model[ITEM_BIAS], np.float32)),
                          torch.as_tensor(np.asarray(model[GLOBAL_BIAS], np.float32)))

    def refit(self, items: ItemParams, rows) -> Users:
        """Every user's exact ridge fit of (b_u, beta_u) on its own ratings, batched."""
        n = len(rows.users)
        seg = torch.as_tensor(rows.train_segment, dtype=torch.long)
        item = torch.as_tensor(rows.train_item, dtype=torch.long)
        X = torch.cat([items.emb.double()[item], torch.ones(len(seg), 1, dtype=torch.float64)], 1)
        y = (torch.as_tensor(rows.train_rating, dtype=torch.float64) - items.global_bias.double()
             - items.bias.double()[item])
        width = FEATURES + 1
        A = torch.zeros(n, width, width, dtype=torch.float64).index_add_(0, seg, X[:, :, None] * X[:, None])
        A += torch.diag(torch.tensor([LAM_FEATURES] * FEATURES + [LAM_USER], dtype=torch.float64))
        b = torch.zeros(n, FEATURES + 1, dtype=torch.float64).index_add_(0, seg, X * y[:, None])
        solution = torch.linalg.solve(A, b)
        return Users(solution[:, :FEATURES].float(), solution[:, FEATURES].float())

    def evaluate(self, model, state, rows, k: int) -> dict[str, float]:
        items = self._items(model)
        return evaluate_view(items, self.refit(items, rows), rows, False, k, self.rating_scale)

    def fit_user(self, model, items: np.ndarray, ratings: np.ndarray) -> Users:
        penalty = torch.tensor([LAM_FEATURES] * FEATURES + [LAM_USER], dtype=torch.float64)
        return ridge_fit(self._items(model), items, ratings, torch.zeros(FEATURES, dtype=torch.float64), penalty, 1.0)

    def recommend(self, model, items, ratings, n, hide=None):
        return self.top_n(model, self.fit_user(model, items, ratings), items, n, hide)

    def top_n(self, model, user: Users, rated, n: int, hide=None):
        return top_n(self._items(model), user, rated, n, self.rating_scale, hide)
