"""SVD++ (Koren 2008): the user's vector is p_u + |N(u)|^-1/2 sum_{j in N(u)} y_j.

The y_j are item-side and travel like q_i, as a statistic of their own ("item-y"); N(u), the
items the user rated (or interacted with), is the device's own and never leaves it; only the y
rows of those items change, exactly the rows an MF update already touches. Training is MF's
(models/mf.py) with the implicit part added to the user's vector and y trained beside q.
Decoys are not admitted: every row's y step is one vector built from the user's real rows, so
a server that solves for the rows summing to it tells decoys apart.
"""

from __future__ import annotations

import numpy as np
import torch

from .algorithm import DECOYS, Statistic, UserState
from .factors import ITEM_BIAS, ITEM_EMB, ItemParams, Users
from .mf import MF

ITEM_Y = "item-y"


def implicit_part(y: torch.Tensor, segment, item, n_users: int) -> torch.Tensor:
    """|N(u)|^-1/2 sum_{j in N(u)} y_j for each user, N(u) given as rows (user position, item)."""
    segment, item = torch.as_tensor(segment), torch.as_tensor(item)
    counts = torch.bincount(segment, minlength=n_users).clamp(min=1).to(y.dtype)
    total = torch.zeros(n_users, y.shape[1], dtype=y.dtype).index_add_(0, segment, y[item])
    return total / counts.sqrt()[:, None]


class SVDPP(MF):
    name = "svdpp"
    title = "SVD++"
    refuses = {DECOYS: "SVD++'s y step is one vector per user built from its real rows, so a server that solves "
                       "for the rows summing to it tells decoys apart; use dense or sparse uploads (with SecAgg+ or "
                       "DP to hide the rated set)"}

    def statistics(self) -> dict[str, Statistic]:
        return {**super().statistics(), ITEM_Y: Statistic(self.settings.dim)}

    def _shared(self, items: ItemParams) -> dict[str, torch.Tensor]:
        return {**items.tensors(), ITEM_Y: torch.zeros_like(items.emb)}  # y starts at 0: the first rounds are MF

    def row_arrays(self) -> tuple[str, ...]:
        return ITEM_EMB, ITEM_BIAS, ITEM_Y

    def _context(self, seg, item, target, real, n):
        """N(u) as rows: the user's positive rows (every rated row for ratings); decoys never count."""
        member = (target > 0) if self.settings.implicit else torch.ones(len(item), dtype=torch.bool)
        in_sum = member if real is None else member & real
        sum_seg = seg[in_sum]
        return member, in_sum, sum_seg, torch.bincount(sum_seg, minlength=n).clamp(min=1).to(target.dtype).rsqrt()

    def _offset(self, context, now, seg, n):
        _, in_sum, sum_seg, y_scale = context
        y_sum = torch.zeros(n, self.settings.dim).index_add_(0, sum_seg, now[ITEM_Y][in_sum]) * y_scale[:, None]
        return y_sum[seg]

    def _extra_steps(self, context, now, dloss, q_user, dl_user, user_rows, seg, n):
        """d loss / d y_j = |N(u)|^-1/2 sum over the user's rows of dloss q_i, for every j in N(u)."""
        member, _, _, y_scale = context
        pull = torch.zeros(n, self.settings.dim).index_add_(0, user_rows, dl_user[:, None] * q_user) * y_scale[:, None]
        step_y = (2 * self.settings.reg_item * now[ITEM_Y] + pull[seg]).mul_(-self.settings.lr)
        step_y[~member] = 0.0
        return {ITEM_Y: step_y}

    def view(self, model, state: UserState, rows) -> tuple[ItemParams, Users]:
        items, users = super().view(model, state, rows)
        extra = implicit_part(model[ITEM_Y], rows.train_segment, rows.train_item, len(users.bias))
        return items, Users(users.emb + extra, users.bias)

    def _fit_offset(self, model, items: np.ndarray) -> torch.Tensor:
        return implicit_part(model[ITEM_Y].double(), np.zeros(len(items), np.int64), items, 1)[0]

    def _scoring(self, model, user: Users, rated: np.ndarray) -> tuple[ItemParams, Users]:
        items, _ = super()._scoring(model, user, rated)
        if len(rated) == 0:
            return items, user
        offset = implicit_part(model[ITEM_Y], np.zeros(len(rated), np.int64), rated, 1)
        return items, Users(user.emb + offset.to(user.emb.dtype), user.bias)
