"""Biased matrix factorization: r(u, i) = mu + b_u + b_i + p_u . q_i.

Parameters split along the privacy boundary: `ItemParams` (mu, b_i, q_i) are shared and
travel; `UserState` (p_u, b_u and the user's optimizer moments) stays on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .defaults import Hyper
from .randomness import init_generator

# Names of the shared arrays, on the wire too (fedrec.run.schema re-exports them).
ITEM_EMB, ITEM_BIAS, GLOBAL_BIAS = "item-emb", "item-bias", "global-bias"


@dataclass
class ItemParams:
    """The shared model: global bias, item biases, item embeddings."""

    emb: torch.Tensor  # [items, dim]
    bias: torch.Tensor  # [items]
    global_bias: torch.Tensor  # [1]

    @staticmethod
    def init(n_items: int, hyper: Hyper, global_bias: float) -> "ItemParams":
        gen = init_generator(hyper.seed, "item-init")
        emb = torch.randn(n_items, hyper.dim, generator=gen) * hyper.init_std
        if hyper.item_width > hyper.dim:  # SVD++'s y_j start at 0: the first rounds are plain MF
            emb = torch.cat([emb, torch.zeros(n_items, hyper.item_width - hyper.dim)], dim=1)
        return ItemParams(emb, torch.zeros(n_items), torch.tensor([float(global_bias)]))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {ITEM_EMB: self.emb, ITEM_BIAS: self.bias, GLOBAL_BIAS: self.global_bias}

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray]) -> "ItemParams":
        t = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
        return ItemParams(t[ITEM_EMB], t[ITEM_BIAS], t[GLOBAL_BIAS])

    def numpy(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy() for k, v in self.tensors().items()}


@dataclass
class UserState:
    """Private parameters of a batch of users, with their Adam moments and step counts."""

    emb: torch.Tensor  # [users, dim]
    bias: torch.Tensor  # [users]
    m: torch.Tensor  # [users, dim + 1] first moment of (emb, bias)
    v: torch.Tensor  # [users, dim + 1] second moment
    step: torch.Tensor  # [users] Adam steps taken by each user

    @staticmethod
    def init(users: np.ndarray, n_users: int, hyper: Hyper, rng: np.random.Generator | None = None) -> "UserState":
        """Initial state of `users`: rows of one seeded population matrix, so a user starts
        the same whichever node hosts it and whoever it shares the node with; or, given a
        private `rng`, vectors nobody else can know."""
        n = len(users)
        if rng is not None:
            emb = torch.as_tensor(rng.normal(0.0, hyper.init_std, (n, hyper.dim)), dtype=torch.float32)
        else:
            gen = init_generator(hyper.seed, "user-init")
            emb = (torch.randn(n_users, hyper.dim, generator=gen) * hyper.init_std)[torch.as_tensor(users)]
        zeros = torch.zeros(n, hyper.dim + 1)
        return UserState(emb, torch.zeros(n), zeros, zeros.clone(), torch.zeros(n))

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k).numpy() for k in ("emb", "bias", "m", "v", "step")}

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray]) -> "UserState":
        return UserState(**{k: torch.as_tensor(np.asarray(arrays[k])) for k in ("emb", "bias", "m", "v", "step")})

    def take(self, index: torch.Tensor) -> "UserState":
        return UserState(self.emb[index], self.bias[index], self.m[index], self.v[index], self.step[index])

    def put(self, index: torch.Tensor, part: "UserState") -> None:
        for name in ("emb", "bias", "m", "v", "step"):
            getattr(self, name)[index] = getattr(part, name)


def predict(items: ItemParams, users: UserState, segment: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """Raw scores for rows (user position in the batch, item)."""
    return (items.global_bias + users.bias[segment] + items.bias[item]
            + (users.emb[segment] * items.emb[item]).sum(dim=1))
