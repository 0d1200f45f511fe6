"""Everything a device does in a round, in one Flower-free function.

Train on its own rows, clip, add its local noise, build decoys, shape its upload: the
ClientApp, the leakage audit and the tests all call `device_step`, so the code a privacy
claim rests on exists once. A "device" may stand for a cohort of users (simulation);
each user is still trained, clipped and noised on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .bpmf import device_draw, draw_key
from .defaults import DevicePolicy
from .local import LocalUpdate, local_train, training_rows
from .mf import Hyper, ItemParams, UserState, predict
from .randomness import private_key, private_rng
from .svdpp import as_mf
from .upload import build_upload, decoy_rows

if TYPE_CHECKING:  # the data layer's type only; models/ imports no other fedrec package at run time
    from fedrec.datasets import CohortData


@dataclass
class DeviceResult:
    state: UserState  # the users' new private state (stays on the device)
    upload: dict[str, np.ndarray]  # exactly what is sent
    update: LocalUpdate  # the clipped, un-noised sum behind it (never sent; for audits and tests)
    took_part: np.ndarray  # [users] bool: False for users whose participation cap was reached


def device_step(items: ItemParams, state: UserState, rows: "CohortData", n_items: int, hyper: Hyper,
                policy: DevicePolicy, round_: int) -> DeviceResult:
    """One round on a device for the users of `rows` (whose private state is `state`)."""
    took_part = np.ones(len(rows.users), bool)
    if policy.max_rounds > 0:  # the device checks the cap itself, not only the server's sampler
        took_part = (state.step.numpy() // hyper.local_epochs) < policy.max_rounds
        if not took_part.all():
            rows = rows.subset(np.flatnonzero(took_part))
    active = torch.as_tensor(np.flatnonzero(took_part))
    active_state = state.take(active)
    if hyper.model == "bpmf":
        if policy.update_mode == "padded":  # a decoy's statistics would need a made-up user vector and rating
            raise ValueError("padded uploads are not built for BPMF; use dense or sparse")
        new_state, update = device_draw(items, active_state, rows, hyper, policy.clip_norm, round_,
                                        draw_key(hyper.seed, round_))
        return _finish(state, active, new_state, update, rows, policy, round_, took_part)
    key = private_key("negatives") if policy.private_randomness and hyper.implicit else None
    seg, item, target = training_rows(rows, n_items, hyper, round_, key)
    decoy = None
    if policy.update_mode == "padded" and items.emb.shape[1] != hyper.dim:
        # SVD++'s y step is the same vector on every row of a user, built from the real rows only:
        # a server that solves for the rows summing to it tells the decoys apart (red-team, issue 13).
        raise ValueError("padded uploads cannot hide decoys under SVD++; use dense or sparse")
    if policy.update_mode == "padded":
        # keyed by round only: decoy_rows separates users by their ids, so a user's decoys
        # do not depend on who shares its node
        key = private_key("decoys", policy.reproducible_seed, round_)
        d_seg, d_item, d_pick = decoy_rows(rows.users, rows.train_segment, rows.train_item, n_items,
                                           policy.pad_ratio, key, item_weight=public_popularity(items))
        decoy = torch.cat([torch.zeros(len(seg), dtype=torch.bool), torch.ones(len(d_seg), dtype=torch.bool)])
        seg, item = torch.cat([seg, torch.as_tensor(d_seg)]), torch.cat([item, torch.as_tensor(d_item)])
        target = torch.cat([target, decoy_targets(rows, hyper, items, active_state, d_seg, d_item, d_pick)])
    new_state, update = local_train(items, active_state, seg, item, target, hyper,
                                    clip_norm=policy.clip_norm, decoy=decoy)
    return _finish(state, active, new_state, update, rows, policy, round_, took_part)


def _finish(state: UserState, active: torch.Tensor, new_state: UserState, update: LocalUpdate, rows: "CohortData",
            policy: DevicePolicy, round_: int, took_part: np.ndarray) -> DeviceResult:
    """The users' new state in place, and the upload of their summed update (noised under local DP)."""
    state = UserState(*(t.clone() for t in (state.emb, state.bias, state.m, state.v, state.step)))
    state.put(active, new_state)
    rng = None
    if policy.noise_std > 0:
        first_user = int(rows.users[0]) if len(rows.users) else 0  # nodes of one round must not share a stream
        rng = private_rng("device-noise", policy.reproducible_seed, round_, first_user)
    upload = build_upload(update, policy.update_mode, policy.noise_std, rng)
    return DeviceResult(state, upload, update, took_part)


def decoy_targets(rows: "CohortData", hyper: Hyper, items: ItemParams, state: UserState, d_seg: np.ndarray,
                  d_item: np.ndarray, pick: np.ndarray) -> torch.Tensor:
    """A decoy's made-up target: the model's prediction for it plus the residual of one of
    the user's real rows (drawn by `pick`), rounded to the rating grid. Its update then
    implies a rating as plausible as a real one and is as large as a real row's; label 1
    for implicit data."""
    if hyper.implicit:
        return torch.ones(len(d_seg))
    order = np.argsort(rows.train_segment, kind="stable")
    counts = np.bincount(rows.train_segment, minlength=len(rows.users))
    starts = np.searchsorted(rows.train_segment[order], np.arange(len(rows.users)))
    index = order[starts[d_seg] + np.minimum((pick * counts[d_seg]).astype(np.int64), counts[d_seg] - 1)]
    items, state = as_mf(items, state, rows.train_segment, rows.train_item)
    real_pred = predict(items, state, torch.as_tensor(rows.train_segment[index]),
                        torch.as_tensor(rows.train_item[index]))
    residual = rows.train_rating[index] - real_pred.numpy()
    guess = predict(items, state, torch.as_tensor(d_seg), torch.as_tensor(d_item)).numpy() + residual
    ratings = rows.train_rating
    halves = not np.all(np.equal(np.mod(ratings, 1), 0))  # some data sets rate in half stars
    guess = np.rint(guess * 2) / 2 if halves else np.rint(guess)
    return torch.as_tensor(np.clip(guess, ratings.min(), ratings.max()), dtype=torch.float32)


def public_popularity(items: ItemParams) -> np.ndarray:
    """A popularity proxy every device can compute from the model it received."""
    return (items.emb.norm(dim=1) + items.bias.abs()).numpy().astype(np.float64) + 1e-6
