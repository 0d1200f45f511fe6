"""SecAgg+'s quantization, sized so that nothing is clipped by it and its error is accounted; and what a
device masks. The protocol itself is Flower's (server/secagg.py, client/secure.py); this is the part
a privacy claim rests on, Flower-free.

A device's masked vector is its dense statistics in the algorithm's declared order, plus the number of
users it trained times C (so that the count shares the statistics' quantization range and is only
ever seen summed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

COUNT = "user-count"
MODULUS = 2**32  # Flower's default mask modulus


def secure_order(statistics) -> list[str]:
    """The names of a masked vector's arrays, in order: the statistics, then the user count."""
    return [*statistics, COUNT]


class SecAggSizeError(ValueError):
    """Quantization too coarse for this noise and model size."""


@dataclass(frozen=True)
class SecAggSetup:
    """Quantization and dropout settings of a run's SecAgg+ rounds, and what they cost."""

    clip_range: float  # each coordinate a node masks lies in [-r, r]: no value is ever cut
    levels: int  # quantization levels over [-r, r]; nodes x levels stays below the modulus
    sensitivity: float  # C plus the worst quantization error a user can move the sum by (accounted)
    min_users: int  # a round is unmasked only if at least this many sampled users' updates arrived
    noise_share_std: float  # distributed DP: each user's noise per coordinate (0 otherwise)
    max_sampled: int  # users a node may train in one round for r to hold (the sampler is checked against it)

    @property
    def step(self) -> float:
        return 2 * self.clip_range / self.levels


def secagg_setup(clipping_norm: float, min_fraction: float, num_nodes: int, max_users_per_node: int, coords: int,
                 noise_multiplier: float, expected_users: int, population: int) -> SecAggSetup:
    """Sizes chosen so that nothing is clipped by quantization and its error is accounted.

    `coords`: coordinates of a device's dense statistics; `noise_multiplier`: distributed DP's z (0
    otherwise). A node's coordinate is at most (its sampled users) x C plus their noise shares; r covers
    that for up to `max_sampled` users per node (the expected number plus six standard deviations) with
    8 noise standard deviations to spare. Stochastic rounding moves each coordinate by less than one
    step, so one user can move the unmasked sum by at most C + 2 step sqrt(D) (its own node's rounding
    changes): the sensitivity the accountant is told.
    """
    expected_per_node = max_users_per_node * expected_users / population
    max_sampled = min(max_users_per_node, math.ceil(expected_per_node + 6 * math.sqrt(expected_per_node) + 10))
    min_users = max(1, math.ceil(min_fraction * expected_users))
    levels = min(2**30, MODULUS // 2 ** math.ceil(math.log2(num_nodes + 1)))
    coords = coords + 1  # the user count
    # r = S C 1.001 + 8 share sqrt(S), share = z C' / sqrt(m), C' = C + a r with a = 4 sqrt(D) / L:
    # a linear fixed point in C', solved exactly (no fixed point when the noise term feeds back 1:1).
    a = 4 * math.sqrt(coords) / levels
    feedback = 8 * a * noise_multiplier * math.sqrt(max_sampled / min_users)
    if feedback >= 0.5:
        raise SecAggSizeError("SecAgg+ quantization is too coarse for this noise and model size (the rounding "
                              "would double the sensitivity); use fewer users per node or a smaller model")
    sensitivity = clipping_norm * (1 + 1.001 * a * max_sampled) / (1 - feedback)
    share = noise_multiplier * sensitivity / math.sqrt(min_users)
    clip_range = max_sampled * clipping_norm * 1.001 + 8 * share * math.sqrt(max_sampled)
    if sensitivity > 1.5 * clipping_norm:
        raise SecAggSizeError(f"SecAgg+ quantization would raise the sensitivity from C={clipping_norm} to "
                              f"{sensitivity:.4g}; use fewer users per node (--users-per-node) or fewer users per "
                              "round")
    return SecAggSetup(clip_range, levels, sensitivity, min_users, share, max_sampled)
