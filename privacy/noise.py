"""Gaussian noise: on each device's upload (local DP, or each user's share under distributed DP) and on
the server's sum (central DP). The streams are private (OS entropy, fedrec.models.randomness): neither
the seed nor a checkpoint regenerates them."""

from __future__ import annotations

import numpy as np


def add_device_noise(arrays: dict[str, np.ndarray], std: float, per_row_users: np.ndarray, n_users: int,
                     per_item: set[str], rng: np.random.Generator) -> None:
    """Add, in place, to each uploaded coordinate the sum of the noise of every user it carries: of
    `per_row_users` users on each row of the `per_item` arrays, of `n_users` on the global ones (each
    user draws N(0, std^2) per coordinate; their sum is drawn here directly from its distribution)."""
    for name, value in arrays.items():
        users = per_row_users if name in per_item else np.full(1, n_users)
        scale = (std * np.sqrt(users)).astype(np.float32)
        scale = scale.reshape((-1,) + (1,) * (value.ndim - 1)) if name in per_item else scale[0]
        arrays[name] = value + rng.normal(size=value.shape).astype(np.float32) * scale


def add_central_noise(total: dict[str, np.ndarray], std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The sum of clipped user updates plus N(0, std^2) on every coordinate, including rows nobody
    uploaded (their absence would otherwise be visible)."""
    return {k: np.asarray(v, np.float64) + rng.normal(0.0, std, np.shape(v)) for k, v in total.items()}
