"""User-level sampling, independent of how users are grouped on nodes."""

from __future__ import annotations

import numpy as np


def sample_users(population: int, per_round: int, method: str, seed: int, server_round: int) -> np.ndarray:
    """Sorted ids of the users taking part in `server_round`.

    fixed: `per_round` users without replacement. poisson: each user independently with
    probability per_round / population (the sample size varies; DP accounting needs this).
    per_round 0 means everyone. Deterministic in (seed, round).
    """
    if per_round == 0 or (per_round >= population and method == "fixed"):
        return np.arange(population)
    rng = np.random.default_rng([seed, server_round, 0x5A])
    if method == "poisson":
        return np.flatnonzero(rng.random(population) < per_round / population)
    return np.sort(rng.choice(population, size=per_round, replace=False))
