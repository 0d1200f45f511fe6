"""Federated Collaborative Filtering (Ammad-ud-din et al. 2019): implicit ALS split along the privacy boundary.

score(u, i) = x_u . y_i. The loss is confidence-weighted over every item (Hu, Koren & Volinsky 2008):
J = sum_u sum_i c_ui (p_ui - x_u . y_i)^2 + reg (|x_u|^2 + |y_i|^2), p_ui = 1 on the user's interactions
(confidence 1 + `confidence`) and 0 elsewhere (confidence 1). A device solves each user's x_u in closed
form with the items fixed, x_u = (Y^T Y + sum_{i in u} (c - 1) y_i y_i^T + reg I)^-1 sum_{i in u} c y_i, keeps
nothing, and sends the gradient of its users' loss in the items. That gradient touches every item, but
it is exactly 2 (x_u x_u^T) y_i for every item plus a correction on the user's own items, so a device
sends x_u x_u^T ("user-gram", one global row) and the corrections ("item-grad", per item it interacted
with); the server rebuilds the summed gradient, 2 Y sum(x x^T) + sum of corrections, adds the items' L2
and applies the mean with its optimizer (Adam in the paper: --strategy fedadam).
"""

from __future__ import annotations

import numpy as np
import torch

from .algorithm import DECOYS, Algorithm, DeviceKeys, RowContributions, Statistic, UserState
from .factors import ITEM_EMB, ItemParams, Users, evaluate_view, init_items, top_n
from .fedrecon import user_grams
from .mf import FactorServer
from .server_opt import DEFAULT_SERVER_LR, DEFAULT_SERVER_OPTIMIZER

USER_GRAM, ITEM_GRAD = "user-gram", "item-grad"


class FCF(Algorithm):
    name = "fcf"
    title = "FCF (federated implicit ALS)"
    refuses = {DECOYS: "a decoy's correction would move the item as if the user had interacted with it; hide the "
                       "interacted items with dense uploads, SecAgg+ or DP"}
    settings_read = frozenset({"dim", "reg_user", "reg_item", "init_std", "confidence", "strategy", "server_lr"})
    rating_feedback = False  # implicit feedback: interactions and their confidence

    @classmethod
    def defaults(cls, implicit: bool) -> dict:
        return {"dim": 32, "reg_user": 0.1, "reg_item": 0.1, "reg_bias": 0.0}

    def statistics(self) -> dict[str, Statistic]:
        dim = self.settings.dim
        return {ITEM_GRAD: Statistic(dim), USER_GRAM: Statistic(dim * dim, per_item=False)}

    def new_users(self, users: np.ndarray, population: int, rng: np.random.Generator | None) -> UserState:
        """Nothing: a user's x_u is solved afresh from the items every round (the paper's device keeps none)."""
        return {}

    def init_server(self, strategy: str = DEFAULT_SERVER_OPTIMIZER, server_lr: float = DEFAULT_SERVER_LR
                    ) -> FactorServer:
        s = self.settings
        items = init_items(self.n_items, s.dim, s.init_std, s.seed, 0.0)
        return FactorServer({ITEM_EMB: items.emb}, strategy, server_lr)

    # ------------------------------------------------------------------ device
    def solve_users(self, items: torch.Tensor, seg: np.ndarray, item: np.ndarray, n: int) -> torch.Tensor:
        """[n, K] float64: each user's x_u in closed form from its interactions `item` (rows of user `seg`)."""
        s = self.settings
        y = items.double()
        seg_t, item_t = torch.as_tensor(seg), torch.as_tensor(item)
        base = y.T @ y + s.reg_user * torch.eye(s.dim, dtype=torch.float64)
        gram = base + user_grams(seg_t, y[item_t], torch.full((len(seg),), s.confidence, dtype=torch.float64), n)
        rhs = torch.zeros(n, s.dim, dtype=torch.float64).index_add_(0, seg_t, (1 + s.confidence) * y[item_t])
        return torch.linalg.solve(gram, rhs)

    def train(self, shared, state, rows, round_: int, keys: DeviceKeys, decoys=None):
        n, c = len(rows.users), 1 + self.settings.confidence
        x = self.solve_users(shared[ITEM_EMB], rows.train_segment, rows.train_item, n)
        seg, item = torch.as_tensor(rows.train_segment), torch.as_tensor(rows.train_item)
        y = shared[ITEM_EMB].double()[item]
        fit = (x[seg] * y).sum(1)
        # d/dy_i of c (1 - x.y_i)^2, less the 2 (x.y_i) x every item gets through x x^T
        correction = (-2 * (c * (1 - fit) + fit))[:, None] * x[seg]
        all_items = shared[ITEM_EMB].double()
        # the loss: the user's items weighted by c, every other item's (x . y)^2 through Y^T Y
        loss = float((c * (1 - fit) ** 2).sum() + ((x @ (all_items.T @ all_items)) * x).sum() - (fit ** 2).sum())
        pair_key, pair = torch.unique(seg * self.n_items + item, return_inverse=True)  # an interaction counts once
        grad = torch.zeros(len(pair_key), self.settings.dim, dtype=torch.float64).index_add_(0, pair, correction)
        outer = (x[:, :, None] * x[:, None, :]).reshape(n, -1)
        contributions = RowContributions(n, pair_key // self.n_items, pair_key % self.n_items,
                                         {ITEM_GRAD: grad.float()}, {USER_GRAM: outer.float()},
                                         loss_sum=loss, num_rows=len(seg))
        return state, contributions

    # ------------------------------------------------------------------ server
    def server_step(self, state: FactorServer, sums, weight: float, round_: int, noise_std: float = 0.0) -> None:
        """The mean gradient over the round's users, rebuilt from its two parts, with the items' L2."""
        y = state.params[ITEM_EMB].double()
        dim = self.settings.dim
        gram = sums[USER_GRAM].reshape(dim, dim)
        mean = (2 * y @ ((gram + gram.T) / 2) + sums[ITEM_GRAD]) / max(weight, 1.0) + 2 * self.settings.reg_item * y
        state.optimizer.step({ITEM_EMB: -mean.float()})

    # ------------------------------------------------------------------ scoring
    def _view(self, model) -> ItemParams:
        return ItemParams(model[ITEM_EMB], torch.zeros(self.n_items), torch.zeros(1))

    def evaluate(self, model, state, rows, k: int) -> dict[str, float]:
        x = self.solve_users(model[ITEM_EMB], rows.train_segment, rows.train_item, len(rows.users)).float()
        return evaluate_view(self._view(model), Users(x, torch.zeros(len(x))), rows, True, k, self.rating_scale)

    def fit_user(self, model, items: np.ndarray, ratings: np.ndarray) -> Users:
        x = self.solve_users(model[ITEM_EMB], np.zeros(len(items), np.int64), np.asarray(items, np.int64), 1)
        return Users(x.float(), torch.zeros(1))

    def recommend(self, model, items, ratings, n, hide=None):
        return self.top_n(model, self.fit_user(model, items, ratings), items, n, hide)

    def top_n(self, model, user: Users, rated, n: int, hide=None):
        return top_n(self._view(model), user, rated, n, None, hide)
