"""User-level sampling, independent of how users are grouped on nodes."""

from __future__ import annotations

import numpy as np

from fedrec.models.randomness import private_rng, seeded_rng
from fedrec.run.config import RunConfig


def sample_users(population: int, per_round: int, method: str, rng: np.random.Generator,
                 eligible: np.ndarray | None = None) -> np.ndarray:
    """Sorted ids of the users taking part in a round.

    fixed: `per_round` users without replacement. poisson: each user independently with
    probability per_round / population (the sample size varies; DP accounting needs this).
    per_round 0 means everyone. `eligible` (bool per user) removes users who may not take
    part any more (a local-DP participation cap); they are drawn and then dropped, so the
    others' chances do not change.
    """
    if per_round == 0 or (per_round >= population and method == "fixed"):
        users = np.arange(population)
    elif method == "poisson":
        users = np.flatnonzero(rng.random(population) < per_round / population)
    else:
        users = np.sort(rng.choice(population, size=per_round, replace=False))
    return users if eligible is None else users[eligible[users]]


def sampling_rng(cfg: RunConfig, server_round: int) -> np.random.Generator:
    """Who takes part is secret in a DP run (amplification by sampling assumes nobody can
    predict it): OS entropy there, the run seed otherwise."""
    if cfg.dp == "none":
        return seeded_rng(cfg.seed, "sampling", server_round)
    return private_rng("sampling", cfg.seed if cfg.reproducible_noise else None, server_round)
