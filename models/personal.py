"""A user's own recommendations, computed where the user's data is (the device).

The global model holds only item-side parameters. A device fits its user's vector and bias
against them from the user's own ratings: with the items fixed, the training loss of
`models/local.py` (squared error plus L2 per rating) is a ridge regression, solved exactly.
Under SVD++ the implicit part |N(u)|^-1/2 sum y_j of the rated items is fixed by the items
too, so the same solve gives p_u; scoring adds the part back (`scoring_vector`). Under BPMF
the fit is the mean of the user's conditional (models/bpmf.py), the centre of its device's draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .mf import Hyper, ItemParams


@dataclass(frozen=True)
class UserFit:
    emb: np.ndarray  # [dim] the user's own vector p_u (what its device keeps)
    bias: float


def scoring_vector(items: ItemParams, own: torch.Tensor, rated: np.ndarray) -> torch.Tensor:
    """The vector a user scores items with: p_u, plus |N(u)|^-1/2 sum_{j in N(u)} y_j under
    SVD++ (N(u): `rated`, the items the user rated or interacted with)."""
    dim = own.shape[-1]
    if items.emb.shape[1] != 2 * dim or len(rated) == 0:
        return own
    y = items.emb.detach()[torch.as_tensor(np.asarray(rated, dtype=np.int64)), dim:]
    return own + (y.sum(dim=0) / len(rated) ** 0.5).to(own.dtype)


def fit_user(items: ItemParams, item: np.ndarray, rating: np.ndarray, hyper: Hyper) -> UserFit:
    """The (p_u, b_u) minimizing sum_i (mu + b_u + b_i + p_u.q_i - r_i)^2 + n (reg_user |p_u|^2
    + reg_bias b_u^2) over the user's n ratings: local training's objective with the items fixed."""
    if len(item) == 0:
        raise ValueError("a user with no ratings has nothing to fit; rate a few items first")
    q = items.emb.detach().double()[torch.as_tensor(item, dtype=torch.int64), :hyper.dim]
    features = torch.cat([q, torch.ones(len(item), 1, dtype=torch.float64)], dim=1)
    implicit = scoring_vector(items, torch.zeros(hyper.dim, dtype=torch.float64), item)
    residual = (torch.as_tensor(rating, dtype=torch.float64) - items.global_bias.double()
                - items.bias.detach().double()[torch.as_tensor(item, dtype=torch.int64)] - q @ implicit)
    penalty = torch.cat([torch.full((q.shape[1],), hyper.reg_user), torch.tensor([hyper.reg_bias])]).double()
    # BPMF: the mean of the user's conditional, whose prior precision is absolute and weighs against alpha
    weight = 1.0 / hyper.bpmf_alpha if hyper.model == "bpmf" else len(item)
    solution = torch.linalg.solve(features.T @ features + torch.diag(weight * penalty), features.T @ residual)
    return UserFit(solution[:-1].float().numpy(), float(solution[-1]))


def top_n(items: ItemParams, user: UserFit, exclude: np.ndarray, n: int,
          rating_scale: tuple[float, float] | None = None,
          hide: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The n best items the user has not rated (item indices, scores; clamped to the scale).
    `exclude`: the items the user rated, which are also its N(u) under SVD++; `hide`: more items
    never to recommend (e.g. items no one rated in training: their scores are initial values)."""
    own = torch.as_tensor(user.emb)
    with torch.no_grad():
        vector = scoring_vector(items, own, exclude)
        scores = (items.global_bias + items.bias + items.emb[:, :len(own)] @ vector + user.bias).numpy()
    scores = scores.astype(np.float64)
    scores[np.asarray(exclude, dtype=np.int64)] = -np.inf
    if hide is not None:
        scores[np.asarray(hide, dtype=np.int64)] = -np.inf
    best = np.argsort(-scores, kind="stable")[:max(0, min(n, int(np.isfinite(scores).sum())))]
    shown = scores[best] if rating_scale is None else np.clip(scores[best], *rating_scale)
    return best, shown
