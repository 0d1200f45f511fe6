"""Biased matrix factorization trained by federated SGD: r(u, i) = mu + b_u + b_i + p_u . q_i.

A device trains each of its users for `local_epochs` full-batch steps on the user's own rows,
against the user's own copy of the item rows it touches: Adam on the user's (p_u, b_u), SGD on
the copies. It sends each user's change of those copies (item rows, item biases) and of mu; the
server averages the changes over the round's users and applies them with a server optimizer
(FedAdam by default, fedrec.models.server_opt). Implicit feedback: BCE on the user's positives
and freshly sampled negatives. Everything is vectorized across the users of a batch, and a
user's result depends only on its rows, its state and the items it was given.
"""

from __future__ import annotations

import numpy as np
import torch

from .algorithm import (
    Algorithm,
    Decoys,
    DeviceKeys,
    RowContributions,
    ServerState,
    Statistic,
    UserState,
)
from .factors import (
    GLOBAL_BIAS,
    ITEM_BIAS,
    ITEM_EMB,
    ItemParams,
    Users,
    evaluate_view,
    init_items,
    initial_global_bias,
    predict,
    private_vectors,
    ridge_fit,
    seeded_vectors,
    top_n,
)
from .randomness import mix64
from .recency import Recency, with_recency
from .server_opt import DEFAULT_SERVER_LR, DEFAULT_SERVER_OPTIMIZER, ServerOptimizer

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class FactorServer(ServerState):
    """The shared parameters and the server optimizer that moves them."""

    def __init__(self, params: dict[str, torch.Tensor], optimizer: str, lr: float):
        self.params = params
        self.optimizer = ServerOptimizer(params, optimizer, lr)

    def broadcast(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().copy() for k, v in self.params.items()}

    def model(self) -> dict[str, np.ndarray]:
        return self.broadcast()

    def arrays(self) -> dict[str, np.ndarray]:
        return {**{f"param.{k}": v for k, v in self.broadcast().items()}, **self.optimizer.arrays()}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, tensor in self.params.items():
                tensor.copy_(torch.as_tensor(arrays[f"param.{name}"]))
        self.optimizer.load({k: v for k, v in arrays.items() if not k.startswith("param.")})


class MF(Algorithm):
    name = "mf"
    title = "biased MF"
    settings_read = frozenset({"dim", "reg_user", "reg_item", "reg_bias", "init_std", "lr", "local_epochs",
                               "train_negatives", "recency_items", "recency_decay", "recency_weight", "strategy",
                               "server_lr"})

    # ------------------------------------------------------------------ shapes
    def statistics(self) -> dict[str, Statistic]:
        return {ITEM_EMB: Statistic(self.settings.dim), ITEM_BIAS: Statistic(1),
                GLOBAL_BIAS: Statistic(1, per_item=False)}

    def init_server(self, strategy: str = DEFAULT_SERVER_OPTIMIZER,
                    server_lr: float = DEFAULT_SERVER_LR) -> FactorServer:
        """Public starting items, and the server optimizer (--strategy, --server-lr) that moves them."""
        s = self.settings
        items = init_items(self.n_items, s.dim, s.init_std, s.seed, initial_global_bias(s.implicit, self.rating_scale))
        return FactorServer(self._shared(items), strategy, server_lr)

    def _shared(self, items: ItemParams) -> dict[str, torch.Tensor]:
        return items.tensors()

    def new_users(self, users: np.ndarray, population: int, rng: np.random.Generator | None) -> UserState:
        s = self.settings
        emb = (seeded_vectors(users, population, s.dim, s.init_std, s.seed) if rng is None
               else private_vectors(len(users), s.dim, s.init_std, rng))
        moments = torch.zeros(len(users), s.dim + 1)
        return {"emb": emb, "bias": torch.zeros(len(users)), "m": moments, "v": moments.clone(),
                "step": torch.zeros(len(users))}

    # ------------------------------------------------------------------ device
    def train(self, shared: dict[str, torch.Tensor], state: UserState, rows, round_: int, keys: DeviceKeys,
              decoys: Decoys | None = None) -> tuple[UserState, RowContributions]:
        """Each user's `local_epochs` full-batch steps on its rows (and decoy rows, which never touch its
        own vector, its bias, mu or the loss: they are trained like real rows so that their item changes
        look alike). Returns the new state and each user's change of the item rows it touched."""
        seg, item, target = self.training_rows(rows, round_, keys)
        seg, item, target, decoy = self.with_decoys(shared, state, rows, seg, item, target, decoys)
        return self.fit_rows(shared, state, seg, item, target, decoy, len(rows.users))

    def with_decoys(self, shared, state: UserState, rows, seg, item, target, decoys: Decoys | None):
        """The training rows with the decoy rows after them, and which rows are decoys (None: no decoys)."""
        if decoys is None:
            return seg, item, target, None
        decoy = torch.cat([torch.zeros(len(seg), dtype=torch.bool), torch.ones(len(decoys.segment), dtype=bool)])
        return (torch.cat([seg, torch.as_tensor(decoys.segment)]), torch.cat([item, torch.as_tensor(decoys.item)]),
                torch.cat([target, self.decoy_targets(shared, state, rows, decoys)]), decoy)

    def fit_rows(self, shared: dict[str, torch.Tensor], state: UserState, seg: torch.Tensor, item: torch.Tensor,
                 target: torch.Tensor, decoy: torch.Tensor | None, n: int) -> tuple[UserState, RowContributions]:
        """`local_epochs` steps of `n` users on the given rows (user position, item, target; `decoy` True on
        decoy rows): the gradient written out by hand, one batched expression for every user's rows."""
        s = self.settings
        copies = {name: shared[name][item] for name in self.row_arrays()}  # each user's own copy of its rows
        mu0 = shared[GLOBAL_BIAS].expand(n)
        deltas = {name: torch.zeros_like(value) for name, value in copies.items()}
        dmu = torch.zeros(n)
        state = {k: v.clone() for k, v in state.items()}
        real = None if decoy is None else ~decoy
        user_rows = seg if real is None else seg[real]
        rows_per_user = torch.bincount(user_rows, minlength=n).clamp(min=1)
        extra = self._context(seg, item, target, real, n)
        loss_sum = 0.0
        for epoch in range(s.local_epochs):
            now = copies if epoch == 0 else {k: copies[k] + deltas[k] for k in copies}
            q, b, mu = now[ITEM_EMB], now[ITEM_BIAS], mu0 + dmu
            p_own, bu = state["emb"][seg], state["bias"][seg]
            p = p_own + self._offset(extra, now, seg, n)
            pred = mu[seg] + bu + b + (p * q).sum(dim=1)
            if s.implicit:
                dloss = torch.sigmoid(pred) - target
                losses = torch.nn.functional.binary_cross_entropy_with_logits(pred, target, reduction="none")
            else:
                err = pred - target
                dloss, losses = 2 * err, err.square()
            loss_sum = float(losses.sum() if real is None else losses[real].sum())  # at the epoch's start
            pick = slice(None) if real is None else real
            p_user, q_user, dl_user, bu_user = p_own[pick], q[pick], dloss[pick], bu[pick]
            row_grads = torch.addcmul(2 * s.reg_user * p_user, dl_user[:, None], q_user)
            grad_emb = torch.zeros(n, s.dim).index_add_(0, user_rows, row_grads)
            grad_bias = torch.zeros(n).index_add_(0, user_rows, dl_user + 2 * s.reg_bias * bu_user)
            _adam_rows(state, torch.cat([grad_emb, grad_bias[:, None]], dim=1), s.lr)
            steps = {ITEM_EMB: torch.addcmul(2 * s.reg_item * q, dloss[:, None], p).mul_(-s.lr),
                     ITEM_BIAS: (dloss + 2 * s.reg_bias * b).mul_(-s.lr),
                     **self._extra_steps(extra, now, dloss, q_user, dl_user, user_rows, seg, n)}
            # mu's loss curvature grows with the user's rating count (every row touches it), so its
            # local step is the mean over the user's rows: a summed step is unstable past one epoch.
            step_mu = torch.zeros(n).index_add_(0, user_rows, dl_user).div_(rows_per_user).mul_(-s.lr)
            deltas = {k: deltas[k] + steps[k] for k in deltas}
            dmu = dmu + step_mu
        return state, self._contributions(seg, item, deltas, dmu, n, loss_sum, len(user_rows))

    def row_arrays(self) -> tuple[str, ...]:
        """The per-item shared arrays a user trains copies of."""
        return ITEM_EMB, ITEM_BIAS

    def _contributions(self, seg, item, deltas, dmu, n, loss_sum, num_rows) -> RowContributions:
        """A user's contribution is its change per *item*: rows of one item (an implicit negative drawn
        twice, a negative that is also a decoy, several local epochs) add up before any norm is taken,
        so the clipping bound holds on exactly what is summed."""
        pair_key, pair_of_row = torch.unique(seg * self.n_items + item, return_inverse=True)
        rows = {}
        for name, delta in deltas.items():
            wide = delta if delta.ndim == 2 else delta[:, None]
            rows[name] = torch.zeros(len(pair_key), wide.shape[1]).index_add_(0, pair_of_row, wide)
        return RowContributions(n, pair_key // self.n_items, pair_key % self.n_items, rows,
                                {GLOBAL_BIAS: dmu[:, None]}, loss_sum=loss_sum, num_rows=num_rows)

    # SVD++ (models/svdpp.py) widens the user's vector and trains one more array through these hooks.
    def _context(self, seg, item, target, real, n):
        return None

    def _offset(self, context, now, seg, n):
        return 0.0

    def _extra_steps(self, context, now, dloss, q_user, dl_user, user_rows, seg, n) -> dict[str, torch.Tensor]:
        return {}

    def training_rows(self, rows, round_: int, keys: DeviceKeys) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(segment, item, target) a batch of users trains on this round: its ratings, or for implicit
        feedback its positives (label 1) plus freshly sampled negatives (label 0), keyed privately where
        the run claims anything against the server (which unrated items an upload touches must not be
        derivable from the seed), else by (seed, round) so central and federated runs draw alike."""
        seg, item = rows.train_segment, rows.train_item
        if not self.settings.implicit:
            return (torch.as_tensor(seg), torch.as_tensor(item),
                    torch.as_tensor(rows.train_rating, dtype=torch.float32))
        counts = np.bincount(seg, minlength=len(rows.users))
        key = keys.negatives(round_)
        skip_seg, skip_item = seg, item
        if self.settings.heldout_not_negative:  # the papers' protocol, a leak (DataConfig.heldout_not_negative)
            skip_seg, skip_item = np.concatenate([seg, rows.test_segment]), np.concatenate([item, rows.test_item])
        neg_seg, neg_item = sample_negatives(rows.users, skip_seg, skip_item, counts * self.settings.train_negatives,
                                             self.n_items, key)
        target = np.concatenate([np.ones(len(seg), np.float32), np.zeros(len(neg_seg), np.float32)])
        return (torch.as_tensor(np.concatenate([seg, neg_seg])), torch.as_tensor(np.concatenate([item, neg_item])),
                torch.as_tensor(target))

    def decoy_targets(self, shared, state: UserState, rows, decoys: Decoys) -> torch.Tensor:
        """A decoy's made-up target: the model's prediction for it plus the residual of one of the user's
        real rows (drawn by `pick`), rounded to the rating grid; label 1 for implicit data. Its update then
        implies a rating as plausible as a real one and is as large as a real row's."""
        if self.settings.implicit:
            return torch.ones(len(decoys.segment))
        order = np.argsort(rows.train_segment, kind="stable")
        counts = np.bincount(rows.train_segment, minlength=len(rows.users))
        starts = np.searchsorted(rows.train_segment[order], np.arange(len(rows.users)))
        index = order[starts[decoys.segment] + np.minimum((decoys.pick * counts[decoys.segment]).astype(np.int64),
                                                           counts[decoys.segment] - 1)]
        items, users = self.view(shared, state, rows)
        real_pred = predict(items, users, torch.as_tensor(rows.train_segment[index]),
                            torch.as_tensor(rows.train_item[index]))
        residual = rows.train_rating[index] - real_pred.numpy()
        guess = predict(items, users, torch.as_tensor(decoys.segment), torch.as_tensor(decoys.item)).numpy() + residual
        ratings = rows.train_rating
        halves = not np.all(np.equal(np.mod(ratings, 1), 0))  # some data sets rate in half stars
        guess = np.rint(guess * 2) / 2 if halves else np.rint(guess)
        return torch.as_tensor(np.clip(guess, ratings.min(), ratings.max()), dtype=torch.float32)

    # ------------------------------------------------------------------ server
    def server_step(self, state: FactorServer, sums: dict[str, torch.Tensor], weight: float, round_: int,
                    noise_std: float = 0.0) -> None:
        """The mean change over the round's users (`weight`), applied by the server optimizer."""
        state.optimizer.step({name: (sums[name] / max(weight, 1.0)).float() for name in state.params})

    # ------------------------------------------------------------------ scoring
    def view(self, model: dict[str, torch.Tensor], state: UserState, rows) -> tuple[ItemParams, Users]:
        """The items and user vectors that score like this model for the users of `rows`."""
        return ItemParams(model[ITEM_EMB], model[ITEM_BIAS], model[GLOBAL_BIAS]), Users(state["emb"], state["bias"])

    def evaluate(self, model, state, rows, k: int) -> dict[str, float]:
        items, users = self.view(model, state, rows)
        recency = Recency.of(self.settings)
        if self.settings.implicit and recency.on:
            items, users = with_recency(items, users, rows, recency)
        return evaluate_view(items, users, rows, self.settings.implicit, k, self.rating_scale)

    def fit_user(self, model, items: np.ndarray, ratings: np.ndarray) -> Users:
        """(p_u, b_u) from the user's own ratings with the items fixed, on the device: local training's
        objective (squared error plus L2 per rating), a ridge regression solved exactly; for implicit
        feedback (`items` the positives), BCE against freshly drawn negatives."""
        s = self.settings
        penalty = torch.tensor([s.reg_user] * s.dim + [s.reg_bias], dtype=torch.float64)
        shared = ItemParams(model[ITEM_EMB], model[ITEM_BIAS], model[GLOBAL_BIAS])
        if s.implicit:
            return self._fit_implicit(shared, items, self._fit_offset(model, items), penalty)
        return ridge_fit(shared, items, ratings, self._fit_offset(model, items), penalty, float(len(items)))

    def _fit_implicit(self, items: ItemParams, positives: np.ndarray, offset: torch.Tensor,
                      penalty: torch.Tensor) -> Users:
        """Every positive against train-negatives x as many unrated items drawn from OS entropy (the device
        draws them; nothing is sent), local training's loss (BCE plus L2 per row) minimized with the items
        fixed. The loss is convex in (p_u, b_u): Newton's method reaches its minimum in a few steps."""
        unrated = np.setdiff1d(np.arange(self.n_items), positives)
        rng = np.random.default_rng()  # a fit on the device: its negatives are nobody else's business
        negatives = rng.choice(unrated, len(positives) * max(1, self.settings.train_negatives))
        item = torch.as_tensor(np.concatenate([positives, negatives]))
        target = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))]).double()
        q = items.emb.detach().double()[item]
        features = torch.cat([q, torch.ones(len(item), 1, dtype=torch.float64)], 1)
        base = items.global_bias.double() + items.bias.detach().double()[item] + q @ offset.double()
        penalty = 2 * len(item) * penalty
        weights = torch.zeros(features.shape[1], dtype=torch.float64)
        for _ in range(50):
            prob = torch.sigmoid(features @ weights + base)
            gradient = features.T @ (prob - target) + penalty * weights
            hessian = features.T @ (features * (prob * (1 - prob))[:, None]) + torch.diag(penalty)
            step = torch.linalg.solve(hessian, gradient)
            weights -= step
            if float(step.abs().max()) < 1e-9:
                break
        return Users(weights[None, :-1].float(), weights[-1:].float())

    def _fit_offset(self, model, items: np.ndarray) -> torch.Tensor:
        return torch.zeros(self.settings.dim, dtype=torch.float64)

    def recommend(self, model, items, ratings, n, hide=None):
        user = self.fit_user(model, items, ratings)
        return self.top_n(model, user, items, n, hide)

    def top_n(self, model, user: Users, rated: np.ndarray, n: int, hide=None):
        """The user's `n` best unrated items (indices, scores clamped to the rating scale; logits, unclamped,
        for implicit feedback, which has no rating scale)."""
        view, scoring = self._scoring(model, user, rated)
        return top_n(view, scoring, rated, n, None if self.settings.implicit else self.rating_scale, hide)

    def _scoring(self, model, user: Users, rated: np.ndarray) -> tuple[ItemParams, Users]:
        return ItemParams(model[ITEM_EMB], model[ITEM_BIAS], model[GLOBAL_BIAS]), user


def sample_negatives(users: np.ndarray, segment: np.ndarray, positives: np.ndarray, n_neg: np.ndarray,
                     n_items: int, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """n_neg[j] items for user j, uniform over items the user did not rate (with replacement),
    counter-based per (key, user), so a user's draws do not depend on who shares its batch."""
    neg_segment = np.repeat(np.arange(len(users)), n_neg)
    counter = np.arange(len(neg_segment)) - np.repeat(np.cumsum(n_neg) - n_neg, n_neg)
    base = mix64(users[neg_segment].astype(np.uint64) ^ key)
    rated = np.sort(users[segment] * n_items + positives)
    items = np.empty(len(neg_segment), np.int64)
    todo = np.arange(len(neg_segment))
    attempt = 0
    while len(todo):  # redraw the few that hit a rated item
        draw = mix64(base[todo] + (counter[todo] * 64 + attempt).astype(np.uint64))
        items[todo] = (draw % np.uint64(n_items)).astype(np.int64)
        pair = users[neg_segment[todo]] * n_items + items[todo]
        pos = np.minimum(np.searchsorted(rated, pair), len(rated) - 1)
        todo = todo[rated[pos] == pair]
        attempt += 1
    return neg_segment, items


def _adam_rows(state: UserState, grad: torch.Tensor, lr: float) -> None:
    """Adam on each user's (p_u, b_u), with its own step count for bias correction."""
    beta1, beta2 = ADAM_BETAS
    state["step"] += 1
    state["m"].mul_(beta1).add_(grad, alpha=1 - beta1)
    state["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    m_hat = state["m"] / (1 - beta1 ** state["step"])[:, None]
    v_hat = state["v"] / (1 - beta2 ** state["step"])[:, None]
    step = lr * m_hat / (v_hat.sqrt() + ADAM_EPS)
    state["emb"] -= step[:, :-1]
    state["bias"] -= step[:, -1]
