"""A user's own recommendations, computed where the user's data is (the device).

The global model holds only item-side parameters. A device fits its user's vector and bias
against them from the user's own ratings: with the items fixed, the training loss of
`models/local.py` (squared error plus L2 per rating) is a ridge regression, solved exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .mf import Hyper, ItemParams


@dataclass(frozen=True)
class UserFit:
    emb: np.ndarray  # [dim] the user's vector
    bias: float


def fit_user(items: ItemParams, item: np.ndarray, rating: np.ndarray, hyper: Hyper) -> UserFit:
    """The (p_u, b_u) minimizing sum_i (mu + b_u + b_i + p_u.q_i - r_i)^2 + n (reg_user |p_u|^2
    + reg_bias b_u^2) over the user's n ratings: local training's objective with the items fixed."""
    if len(item) == 0:
        raise ValueError("a user with no ratings has nothing to fit; rate a few items first")
    q = items.emb.detach().double()[torch.as_tensor(item, dtype=torch.int64)]
    features = torch.cat([q, torch.ones(len(item), 1, dtype=torch.float64)], dim=1)
    residual = (torch.as_tensor(rating, dtype=torch.float64) - items.global_bias.double()
                - items.bias.detach().double()[torch.as_tensor(item, dtype=torch.int64)])
    penalty = torch.cat([torch.full((q.shape[1],), hyper.reg_user), torch.tensor([hyper.reg_bias])]).double()
    solution = torch.linalg.solve(features.T @ features + torch.diag(len(item) * penalty), features.T @ residual)
    return UserFit(solution[:-1].float().numpy(), float(solution[-1]))


def top_n(items: ItemParams, user: UserFit, exclude: np.ndarray, n: int,
          rating_scale: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The n best items the user has not rated (item indices, scores; clamped to the scale)."""
    with torch.no_grad():
        scores = (items.global_bias + items.bias + items.emb @ torch.as_tensor(user.emb) + user.bias).numpy()
    scores = scores.astype(np.float64)
    scores[np.asarray(exclude, dtype=np.int64)] = -np.inf
    best = np.argsort(-scores, kind="stable")[:max(0, min(n, int(np.isfinite(scores).sum())))]
    shown = scores[best] if rating_scale is None else np.clip(scores[best], *rating_scale)
    return best, shown
