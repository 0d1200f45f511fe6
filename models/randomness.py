"""Random streams by purpose, named once.

Two kinds:
- seeded streams (data split, init, training negatives, audit targets) derive from the
  run seed, so experiments repeat exactly;
- private streams (DP noise on the server and on the device, decoy rows, DP user
  sampling, canary membership, and the starting user vectors and training negatives of
  runs that claim anything against the server: DP, SecAgg+ or decoys) are what
  a privacy guarantee or heuristic rests on. They draw from OS
  entropy, and no seed of theirs exists anywhere: the server sees the run seed, writes it
  to config.toml and summary.json, and chooses rounds and users, so anything derived from
  it is known to the very observer the noise must hide from. Only `--reproducible-noise`
  derives them from the seed, and such a run claims no guarantee.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

# One tag per purpose keeps the streams of one seed apart. Private streams have tags too,
# for the reproducible (non-private) mode only. The data's own streams (synthetic data,
# splits) are named in fedrec.datasets.synthetic.DATA_STREAMS: datasets/ cannot import this.
STREAM_TAGS = {
    "negatives": 0x4E,  # not drawn from (negatives are counter-based: `negatives_key`); the seed attack tries it
    "audit-targets": 0xA0D17,
    "sampling": 0x5A,
    "central-noise": 0xD9,
    "device-noise": 0x11,
    "decoys": 0x7D,
    "canaries": 0xCA,
    "user-init": 0x1D,
    "dropout": 0xD0,
    "bpmf-items": 0xB9,  # the server's item draws of BPMF (models/bpmf.py): not a privacy stream
}
PRIVATE_STREAMS = frozenset({"sampling", "central-noise", "device-noise", "decoys", "canaries", "user-init",
                             "negatives"})

# Public initial parameters come from torch generators seeded with the run seed plus an offset
# (private runs draw their user vectors from private_rng("user-init") instead).
INIT_SEED_OFFSETS = {"item-init": 0, "user-init": 1}

# Added to the round before hashing, so that the keys of consecutive rounds are far apart.
NEGATIVES_ROUND_SALT = 0x9E3779B9

_MASK64 = (1 << 64) - 1


def seeded_rng(seed: int, stream: str, *key: int) -> np.random.Generator:
    """A reproducible stream: (seed, purpose, key) -> the same draws on every machine."""
    return np.random.default_rng([seed & _MASK64, STREAM_TAGS[stream], *(int(k) & _MASK64 for k in key)])


def private_rng(stream: str, reproducible_seed: int | None = None, *key: int) -> np.random.Generator:
    """A stream a privacy guarantee rests on: fresh OS entropy, unless the run opted into
    reproducible (non-private) noise, in which case it is the seeded stream."""
    if stream not in PRIVATE_STREAMS:
        raise ValueError(f"{stream!r} is not a private stream")
    if reproducible_seed is None:
        return np.random.default_rng(np.random.SeedSequence())  # OS entropy, never recorded
    return seeded_rng(reproducible_seed, stream, *key)


def private_key(stream: str, reproducible_seed: int | None = None, *key: int) -> int:
    """A 64-bit key for counter-based draws (see `mix64`) on a private stream."""
    if reproducible_seed is None:
        if stream not in PRIVATE_STREAMS:
            raise ValueError(f"{stream!r} is not a private stream")
        return secrets.randbits(64)
    return int(private_rng(stream, reproducible_seed, *key).integers(0, 1 << 63)) << 1 | 1


def init_generator(seed: int, stream: str) -> torch.Generator:
    """The seeded torch generator of one kind of initial parameters."""
    return torch.Generator().manual_seed(seed + INIT_SEED_OFFSETS[stream])


def negatives_key(seed: int, round_: int) -> np.ndarray:
    """[1] uint64 key of a round's training negatives, drawn counter-based per (key, user, counter)."""
    return mix64(np.array([seed], np.uint64)) ^ mix64(np.array([round_ + NEGATIVES_ROUND_SALT], np.uint64))


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer: a counter-based hash, so a user's draws depend on (key, user,
    counter) only, not on which other users share its batch or node."""
    x = np.asarray(x).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def dropped(seed: int, round_: int, users: np.ndarray, probability: float) -> np.ndarray:
    """Simulated device failures (--dropout): whether each user's device fails this round,
    a seeded draw per (seed, round, user), the same on whichever node hosts the user."""
    if probability <= 0:
        return np.zeros(len(users), bool)
    key = int(seeded_rng(seed, "dropout", round_).integers(0, 1 << 63))
    with np.errstate(over="ignore"):
        bits = mix64(np.asarray(users, np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(key))
    return uniform01(bits) < probability


def uniform01(bits: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) from 64-bit hashes (their top 53 bits)."""
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
