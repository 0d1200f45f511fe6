"""SVD++ (Koren 2008): the user's vector is p_u + |N(u)|^-1/2 sum_{j in N(u)} y_j.

The y_j are item-side and travel like q_i: an SVD++ model carries them as the right half
of the item-embedding array ([q_i | y_i], twice the user's width), so every upload mode,
the clipping bound, DP and SecAgg see one array and need no change. N(u), the items the
user rated (or interacted with), is the device's own and never leaves it; only the y rows
of those items change, exactly the rows an MF update already touches.
"""

from __future__ import annotations

import torch

from .mf import ItemParams, UserState


def carries_implicit(items: ItemParams, state: UserState) -> bool:
    """True when `items` is an SVD++ model (its rows are twice as wide as the users' vectors)."""
    return items.emb.shape[1] == 2 * state.emb.shape[1]


def implicit_part(y: torch.Tensor, segment: torch.Tensor, item: torch.Tensor, n_users: int) -> torch.Tensor:
    """|N(u)|^-1/2 sum_{j in N(u)} y_j for each user, N(u) given as rows (user position, item)."""
    counts = torch.bincount(segment, minlength=n_users).clamp(min=1).to(y.dtype)
    total = torch.zeros(n_users, y.shape[1], dtype=y.dtype).index_add_(0, segment, y[item])
    return total / counts.sqrt()[:, None]


def as_mf(items: ItemParams, state: UserState, segment, item) -> tuple[ItemParams, UserState]:
    """An SVD++ model seen as the MF model it scores like for these users: q_i for the items,
    p_u + |N(u)|^-1/2 sum y_j for the users (N(u): the rows `segment`, `item`). An MF model
    is returned as it is."""
    if not carries_implicit(items, state):
        return items, state
    dim = state.emb.shape[1]
    extra = implicit_part(items.emb[:, dim:], torch.as_tensor(segment), torch.as_tensor(item), state.emb.shape[0])
    return (ItemParams(items.emb[:, :dim], items.bias, items.global_bias),
            UserState(state.emb + extra, state.bias, state.m, state.v, state.step))
