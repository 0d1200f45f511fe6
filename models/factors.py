"""Biased factor models, r(u, i) = mu + b_u + b_i + p_u . q_i: what MF, SVD++ and Bayesian MF share
for scoring, evaluating and refitting a user on its own device.

Parameters split along the privacy boundary: `ItemParams` (mu, b_i, q_i) are shared and travel;
a user's (p_u, b_u) stay on the device. An algorithm of this family scores through a *view*: the
`ItemParams` and user vectors that score like it for the users at hand (SVD++ adds its implicit
part to p_u, the recency term widens both), so evaluation and top-N are written once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .metrics import add_sums, error_sums, full_ranking_sums, loo_sums

# Names of the shared arrays, on the wire and in model.npz.
ITEM_EMB, ITEM_BIAS, GLOBAL_BIAS = "item-emb", "item-bias", "global-bias"
FULL_RANKING_CHUNK = 2048  # users scored against the whole catalogue at once


@dataclass
class ItemParams:
    """The shared model of the family: global bias, item biases, item embeddings."""

    emb: torch.Tensor  # [items, dim]
    bias: torch.Tensor  # [items]
    global_bias: torch.Tensor  # [1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {ITEM_EMB: self.emb, ITEM_BIAS: self.bias, GLOBAL_BIAS: self.global_bias}

    @staticmethod
    def from_arrays(arrays: dict) -> ItemParams:
        t = {k: torch.as_tensor(np.asarray(arrays[k], dtype=np.float32)) for k in (ITEM_EMB, ITEM_BIAS, GLOBAL_BIAS)}
        return ItemParams(t[ITEM_EMB], t[ITEM_BIAS], t[GLOBAL_BIAS])

    def numpy(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy() for k, v in self.tensors().items()}


@dataclass
class Users:
    """A batch of users as the family scores them: vectors [users, dim] and biases [users]."""

    emb: torch.Tensor
    bias: torch.Tensor


def initial_global_bias(implicit: bool, rating_scale: tuple[float, float]) -> float:
    """A public starting point for mu: the middle of the rating scale (0 logits if implicit)."""
    return 0.0 if implicit else sum(rating_scale) / 2


def init_items(n_items: int, dim: int, init_std: float, seed: int, global_bias: float) -> ItemParams:
    """Public starting items: embeddings from a torch generator seeded with the run seed."""
    gen = torch.Generator().manual_seed(seed)
    return ItemParams(torch.randn(n_items, dim, generator=gen) * init_std, torch.zeros(n_items),
                      torch.tensor([float(global_bias)]))


def seeded_vectors(users: np.ndarray, population: int, dim: int, init_std: float, seed: int) -> torch.Tensor:
    """Rows `users` of one seeded population matrix, so a user starts the same whichever node hosts
    it and whoever shares the node: what plain runs (and the central twin) start from."""
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(population, dim, generator=gen) * init_std)[torch.as_tensor(np.asarray(users))]


def private_vectors(count: int, dim: int, init_std: float, rng: np.random.Generator) -> torch.Tensor:
    """Starting vectors nobody but the device can know (`rng`: a private stream)."""
    return torch.as_tensor(rng.normal(0.0, init_std, (count, dim)), dtype=torch.float32)


def predict(items: ItemParams, users: Users, segment: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """Raw scores for rows (user position in the batch, item)."""
    return (items.global_bias + users.bias[segment] + items.bias[item]
            + (users.emb[segment] * items.emb[item]).sum(dim=1))


def evaluate_view(items: ItemParams, users: Users, rows, implicit: bool, k: int,
                  rating_scale: tuple[float, float]) -> dict[str, float]:
    """Metric sums over the batch's test rows, scored through a view: errors (ratings) or ranking
    against sampled negatives and the full catalogue (implicit feedback)."""
    seg = torch.as_tensor(rows.test_segment)
    item = torch.as_tensor(rows.test_item)
    if len(seg) == 0:
        return {}
    with torch.no_grad():
        if not implicit:
            pred = predict(items, users, seg, item).clamp(*rating_scale)
            return error_sums(pred, torch.as_tensor(rows.test_rating))
        neg = torch.as_tensor(rows.test_negatives)
        pos_score = predict(items, users, seg, item)
        neg_score = predict(items, users, seg.repeat_interleave(neg.shape[1]), neg.reshape(-1)).reshape(neg.shape)
        return add_sums(loo_sums(pos_score, neg_score, k), _full_ranking(items, users, rows, k))


def _full_ranking(items: ItemParams, users: Users, rows, k: int) -> dict[str, float]:
    n_items = items.emb.shape[0]
    sums: dict[str, float] = {}
    tested = np.unique(rows.test_segment)
    for start in range(0, len(tested), FULL_RANKING_CHUNK):
        chunk = tested[start:start + FULL_RANKING_CHUNK]
        local = np.full(len(rows.users), -1)
        local[chunk] = np.arange(len(chunk))
        scores = users.emb[chunk] @ items.emb.T + items.bias + users.bias[chunk, None]
        exclude = torch.zeros(len(chunk), n_items, dtype=torch.bool)
        relevant = torch.zeros_like(exclude)
        tr = local[rows.train_segment] >= 0
        exclude[local[rows.train_segment[tr]], rows.train_item[tr]] = True
        te = local[rows.test_segment] >= 0
        relevant[local[rows.test_segment[te]], rows.test_item[te]] = True
        add_sums(sums, full_ranking_sums(scores, exclude, relevant, k))
    return sums


def ridge_fit(items: ItemParams, item: np.ndarray, rating: np.ndarray, offset: torch.Tensor, penalty: torch.Tensor,
              weight: float) -> Users:
    """The (p_u, b_u) minimizing sum_i (mu + b_u + b_i + (p_u + offset).q_i - r_i)^2 + weight penalty.(p_u, b_u)^2
    over one user's ratings: local training's objective with the items fixed, solved exactly.
    `offset`: a part of the user's vector the items fix (SVD++'s implicit part; else zeros)."""
    if len(item) == 0:
        raise ValueError("a user with no ratings has nothing to fit; rate a few items first")
    index = torch.as_tensor(np.asarray(item, dtype=np.int64))
    q = items.emb.detach().double()[index]
    features = torch.cat([q, torch.ones(len(item), 1, dtype=torch.float64)], dim=1)
    residual = (torch.as_tensor(rating, dtype=torch.float64) - items.global_bias.double()
                - items.bias.detach().double()[index] - q @ offset.double())
    solution = torch.linalg.solve(features.T @ features + torch.diag(weight * penalty.double()), features.T @ residual)
    return Users(solution[None, :-1].float(), solution[-1:].float())


def top_n(items: ItemParams, user: Users, exclude: np.ndarray, n: int, rating_scale: tuple[float, float] | None = None,
          hide: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The n best items for one user, scored through a view: item indices and scores (clamped to the
    scale), leaving out `exclude` (the items the user rated) and `hide` (e.g. items no one rated in
    training: their scores are initial values)."""
    with torch.no_grad():
        scores = (items.global_bias + items.bias + items.emb @ user.emb[0] + user.bias[0]).double().numpy()
    scores[np.asarray(exclude, dtype=np.int64)] = -np.inf
    if hide is not None:
        scores[np.asarray(hide, dtype=np.int64)] = -np.inf
    best = np.argsort(-scores, kind="stable")[:max(0, min(n, int(np.isfinite(scores).sum())))]
    shown = scores[best] if rating_scale is None else np.clip(scores[best], *rating_scale)
    return best, shown
