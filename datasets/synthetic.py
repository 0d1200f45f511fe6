"""Synthetic ratings with a known answer: low-rank preferences plus biases.

User activity and item popularity are power-law (long-tailed), as in real logs. Generation
is vectorized and block-wise: 1,000,000 users x 20,000 items at 50 ratings each takes
seconds per node shard and never holds more than one block's temporaries.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .interactions import Interactions, Ratings
from .names import SyntheticSpec


@dataclass(frozen=True)
class SyntheticTruth:
    """The generating parameters: a model that knows them scores the noise floor."""

    global_mean: float
    user_bias: np.ndarray
    item_bias: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray

    def expected(self, user: np.ndarray, item: np.ndarray) -> np.ndarray:
        raw = (self.global_mean + self.user_bias[user] + self.item_bias[item]
               + (self.user_factors[user] * self.item_factors[item]).sum(axis=1))
        return np.clip(raw, 1.0, 5.0)


# The data's seeded streams, one tag per purpose: np.random.default_rng(stream_seed(seed, name, ...)).
# The block-wise synthetic split (fedrec.datasets.catalog) is "split"; MovieLens splits draw from
# default_rng(seed) itself. (fedrec.models.randomness names the other streams; datasets/ cannot import it.)
DATA_STREAMS = {"items": 0, "users": 1, "ratings": 2, "activity": 3, "split": 4, "validation": 5}


def stream_seed(seed: int, stream: str, *key: int) -> list[int]:
    return [seed, DATA_STREAMS[stream], *key]


BLOCK_USERS = 8192
"""Users are generated in blocks of this many, each from its own seeded stream, so any range
of users comes out the same whether it is generated alone (one node's shard) or with all
the others (the central baseline), and memory grows with the block, not the population."""


def generate(spec: SyntheticSpec) -> tuple[Ratings, SyntheticTruth]:
    """The whole data set and its generating parameters (block by block)."""
    data = generate_users(spec, 0, spec.users)
    ratings = Ratings("synthetic", data, np.arange(spec.users), np.arange(spec.items), None, (1.0, 5.0))
    return ratings, truth(spec)


def generate_users(spec: SyntheticSpec, lo: int, hi: int) -> Interactions:
    """The ratings of users lo..hi-1 (global ids), sorted by user."""
    _check(spec)
    blocks = range(lo // BLOCK_USERS, -(-hi // BLOCK_USERS))
    parts = [_block(spec, b) for b in blocks]
    data = Interactions(*(np.concatenate([getattr(p, f) for p in parts]) if parts else np.zeros(0)
                          for f in ("user", "item", "rating", "timestamp")))
    keep = (data.user >= lo) & (data.user < hi)
    return data if keep.all() else data.take(keep)


def user_blocks(spec: SyntheticSpec, lo: int, hi: int):
    """(first user, last user + 1) of the blocks that cover users lo..hi-1, trimmed to the range."""
    for b in range(lo // BLOCK_USERS, -(-hi // BLOCK_USERS)):
        yield max(lo, b * BLOCK_USERS), min(hi, (b + 1) * BLOCK_USERS)


def truth(spec: SyntheticSpec) -> SyntheticTruth:
    item_bias, item_factors, _ = _items(spec)
    users = [_user_params(spec, b) for b in range(-(-spec.users // BLOCK_USERS))]
    return SyntheticTruth(GLOBAL_MEAN, np.concatenate([u[0] for u in users]), item_bias,
                          np.concatenate([u[1] for u in users]), item_factors)


GLOBAL_MEAN = 3.6


def _check(spec: SyntheticSpec) -> None:
    if spec.users < 1 or spec.items < 2 or not 0 < spec.density <= 1 or spec.rank < 1:
        raise ValueError("synthetic data needs users >= 1, items >= 2, 0 < density <= 1 and rank >= 1")


def _stream(spec: SyntheticSpec, stream: str, *key: int) -> np.random.Generator:
    return np.random.default_rng(stream_seed(spec.seed, stream, *key))


@functools.lru_cache(maxsize=4)
def _items(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Item biases, factors and popularity as an alias table (one stream: items are few and public)."""
    rng = _stream(spec, "items")
    popularity = 1.0 / np.arange(1, spec.items + 1) ** spec.popularity_exponent
    popularity = rng.permutation(popularity / popularity.sum())  # hits are not item 0, 1, 2...
    bias = rng.normal(0, 0.45, spec.items)
    factors = rng.normal(0, 0.8 / np.sqrt(spec.rank), (spec.items, spec.rank)).astype(np.float32)
    return bias, factors, _alias_table(popularity)


def _alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias table for drawing from `p` in O(1) per draw (Vose's construction)."""
    n = len(p)
    prob, alias = p * n, np.arange(n)
    small, large = [i for i in range(n) if prob[i] < 1], [i for i in range(n) if prob[i] >= 1]
    while small and large:
        s, g = small.pop(), large.pop()
        alias[s] = g
        prob[g] -= 1 - prob[s]
        (small if prob[g] < 1 else large).append(g)
    prob[small + large] = 1.0  # what is left is 1 up to rounding
    return prob, alias


def _draw_items(rng: np.random.Generator, table: tuple[np.ndarray, np.ndarray], size: int) -> np.ndarray:
    prob, alias = table
    column = rng.integers(0, len(prob), size)
    return np.where(rng.random(size) < prob[column], column, alias[column])


def _user_params(spec: SyntheticSpec, block: int) -> tuple[np.ndarray, np.ndarray]:
    n = min(spec.users, (block + 1) * BLOCK_USERS) - block * BLOCK_USERS
    rng = _stream(spec, "users", block)
    return rng.normal(0, 0.35, n), rng.normal(0, 0.8 / np.sqrt(spec.rank), (n, spec.rank)).astype(np.float32)


def _block(spec: SyntheticSpec, block: int) -> Interactions:
    first = block * BLOCK_USERS
    user_bias, user_factors = _user_params(spec, block)
    item_bias, item_factors, popularity = _items(spec)
    rng = _stream(spec, "ratings", block)
    per_user = _activity(spec)[first:first + len(user_bias)]
    local = np.repeat(np.arange(len(per_user)), per_user)
    item = _draw_items(rng, popularity, len(local))
    # Duplicate draws of the same pair collapse to one rating.
    pair = np.sort(local * spec.items + item)  # (sort-based: numpy's hash-based unique is slower here)
    pair = pair[np.concatenate([[True], pair[1:] != pair[:-1]])]
    local, item = pair // spec.items, pair % spec.items
    raw = (GLOBAL_MEAN + user_bias[local] + item_bias[item]
           + np.einsum("ij,ij->i", user_factors[local], item_factors[item]))
    noisy = np.clip(raw, 1.0, 5.0) + rng.normal(0, spec.noise, len(local))
    rating = np.clip(np.rint(noisy), 1, 5)
    timestamp = 1_000_000_000 + rng.integers(0, 10**8, len(local))
    return Interactions.build(local + first, item, rating, timestamp)


@functools.lru_cache(maxsize=4)
def _activity(spec: SyntheticSpec) -> np.ndarray:
    """Ratings per user: Pareto-tailed, scaled so the total matches the density."""
    rng = _stream(spec, "activity")
    target = spec.density * spec.users * spec.items
    raw = rng.pareto(spec.activity_exponent, spec.users) + 1.0
    low = spec.min_user_ratings
    # Scale the tail so that the clipped counts sum to the target (few bisection steps).
    lo, hi = 0.0, target
    for _ in range(60):
        scale = (lo + hi) / 2
        total = np.clip(raw * scale, low, spec.items).sum()
        lo, hi = (scale, hi) if total < target else (lo, scale)
    return np.clip(np.rint(raw * lo), low, spec.items).astype(np.int64)
