"""Everything a device does in a round, in one Flower-free function: the privacy pipeline around the
algorithm's training.

Check each user's participation cap, choose decoys, train the users a chunk at a time with each
user's contribution clipped before it is summed, add the device's noise, shape the upload. The
ClientApp, the audits and the tests all call `device_step`, so the code a privacy claim rests on
exists once. A "device" may stand for a cohort of users (simulation); each user is still trained,
clipped and noised on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedrec.models.algorithm import DECOYS, Algorithm, DeviceKeys, Sums, UserState
from fedrec.models.randomness import private_key, private_rng
from fedrec.models.train import put, take, train_cohort

from .clip import clip
from .decoys import choose, public_popularity
from .policy import DevicePolicy
from .upload import build_upload

ROUNDS = "rounds"  # the users' state entry that counts the rounds each took part in (the participation cap)


@dataclass
class DeviceResult:
    state: UserState  # the users' new private state (stays on the device)
    upload: dict[str, np.ndarray]  # exactly what is sent
    sums: Sums  # the clipped, un-noised sum behind it, with each user's norm (never sent; audits and tests)
    took_part: np.ndarray  # [users] bool: False for users whose participation cap was reached


def new_users(algorithm: Algorithm, users: np.ndarray, population: int, policy: DevicePolicy) -> UserState:
    """Users' starting state, with their participation count."""
    rng = private_rng("user-init") if policy.private_randomness else None
    return {**algorithm.new_users(users, population, rng), ROUNDS: torch.zeros(len(users))}


def device_step(algorithm: Algorithm, shared: dict[str, np.ndarray], state: UserState, rows, round_: int,
                policy: DevicePolicy, seed: int) -> DeviceResult:
    """One round on a device for the users of `rows` (whose private state is `state`)."""
    took_part = np.ones(len(rows.users), bool)
    if policy.max_rounds > 0:  # the device checks the cap itself, not only the server's sampler
        took_part = state[ROUNDS].numpy() < policy.max_rounds
        if not took_part.all():
            rows = rows.subset(np.flatnonzero(took_part))
    active = torch.as_tensor(np.flatnonzero(took_part))
    tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in shared.items()}
    decoys = None
    if policy.update_mode == "padded":
        if DECOYS in algorithm.refuses:
            raise ValueError(f"padded uploads with {algorithm.title}: {algorithm.refuses[DECOYS]}")
        # keyed by round only: decoys separate users by their ids, so a user's decoys do not depend on who
        # shares its node
        key = private_key("decoys", policy.reproducible_seed, round_)
        decoys = choose(rows.users, rows.train_segment, rows.train_item, algorithm.n_items, policy.pad_ratio, key,
                        public_popularity(tensors, algorithm.n_items))
    keys = DeviceKeys(algorithm.settings.seed, policy.private_randomness)
    trained, sums = train_cohort(algorithm, tensors, take(state, active), rows, round_, keys,
                                 lambda c: clip(c, policy.clipping_norm), decoys)
    trained[ROUNDS] = trained[ROUNDS] + 1
    state = {k: v.clone() for k, v in state.items()}
    put(state, active, trained)
    rng = None
    if policy.noise_std > 0:
        first_user = int(rows.users[0]) if len(rows.users) else 0  # nodes of one round must not share a stream
        rng = private_rng("device-noise", policy.reproducible_seed, round_, first_user)
    upload = build_upload(sums, algorithm.statistics(), policy.update_mode, policy.noise_std, rng)
    return DeviceResult(state, upload, sums, took_part)
