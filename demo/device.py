"""What a device computes for the page: its view, its top-10, and a new device's cold start.

The server process stands in for the phone: recommendations come from the global item
model and the device's own vector (fedrec.models.personal), never from anything the server
knows about the user.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from fedrec.run.config import ConfigError

from .demo import Demo

TOP = 10
MIN_RATINGS = 3


class BadInput(ConfigError):
    """Input the page refuses (answered with 400 and the message)."""


@dataclass
class Recommendation:
    item: str
    title: str
    score: float


def device_side():
    """fedrec.personal.device_view, the device's own account and controls; imported on first
    use (it pulls in the server's reply validation and Flower: seconds the first page need not wait)."""
    from fedrec.personal import device_view

    return device_view


def own_ratings(demo: Demo, user: str) -> tuple[np.ndarray, np.ndarray]:
    """(model rows, ratings) of the user's training ratings: what the device holds."""
    from fedrec.datasets import cohort

    rows = cohort(demo.split, [demo.row_of(user)])
    return rows.train_item, rows.train_rating


def view_of(demo: Demo, user: str):
    """The device's own account of itself (fedrec.personal.device_view.DeviceView)."""
    demo.row_of(user)  # an unknown user is a 404 of the page, whichever side would notice
    return device_side().device_view(demo.paths.run, user)


def also_sent(view) -> list[str]:
    """Sentences on what else left the device besides the uploads table (the device view's, where it has them)."""
    return [str(s) for s in getattr(view, "also_sent", None) or []]


def epsilon_caveat(demo: Demo, view) -> str | None:
    """Under central DP the server adds the noise: the device's epsilon holds against readers of the run only."""
    if demo.cfg.dp != "central" or view.epsilon is None:
        return None
    if any("un-noised" in s or "not the server" in s for s in also_sent(view)):
        return None  # the device view says it already
    return "against readers of the run, not the server (it receives this device's update un-noised)"


def recommend(demo: Demo, vector: np.ndarray, bias: float, rated_rows, n: int = TOP) -> list[Recommendation]:
    """The n best unrated items for a device's own (vector, bias) under the global model."""
    from fedrec.models.personal import UserFit, top_n

    best, scores = top_n(demo.items, UserFit(np.asarray(vector, dtype=np.float32), float(bias)),
                         np.asarray(rated_rows, dtype=np.int64), n, None if demo.implicit else demo.scale)
    return [Recommendation(str(demo.item_ids[i]), demo.titles[i], float(s)) for i, s in zip(best, scores)]


def parse_ratings(demo: Demo, form) -> dict[int, float]:
    """{model row: rating} from a cold-start form's `rating-<item id>` fields; BadInput otherwise."""
    ratings: dict[int, float] = {}
    low, high = demo.scale
    for name, value in form.items():
        if not name.startswith("rating-") or not value.strip():
            continue
        item = name.removeprefix("rating-")
        if item not in demo.item_row:
            raise BadInput(f"unknown movie {item!r} in the form; reload the page and rate again")
        try:
            rating = float(value)
        except ValueError:
            raise BadInput(f"rating {value!r} for {demo.titles[demo.item_row[item]]!r} is not a number; "
                           f"pick {low:g} to {high:g}") from None
        if not math.isfinite(rating) or not low <= rating <= high:
            raise BadInput(f"rating {value} for {demo.titles[demo.item_row[item]]!r} is outside the scale "
                           f"{low:g} to {high:g}")
        ratings[demo.item_row[item]] = rating
    if not ratings:
        raise BadInput(f"the form is empty: rate at least {MIN_RATINGS} movies")
    if len(ratings) < MIN_RATINGS:
        raise BadInput(f"{len(ratings)} rating(s) is too few to fit a taste: rate at least {MIN_RATINGS} movies")
    return ratings


@dataclass
class ColdStart:
    """A new device: its ratings, its private fit and its recommendations; nothing of it is sent."""

    rated: list[tuple[str, float]]
    vector: np.ndarray
    bias: float
    recommended: list[Recommendation]
    seconds: float  # fit + top-10, measured here (on the "device")
    opted_in: bool
    upload: dict | None  # what it would send in the next round, if it opted in


def cold_start(demo: Demo, ratings: dict[int, float], opt_in: bool) -> ColdStart:
    from fedrec.models.personal import fit_user

    rows = np.fromiter(ratings, dtype=np.int64)
    values = np.array([ratings[r] for r in rows.tolist()], dtype=np.float32)
    start = time.perf_counter()
    fit = fit_implicit(demo, rows) if demo.implicit else fit_user(demo.items, rows, values, demo.hyper)
    picks = recommend(demo, fit.emb, fit.bias, rows)
    seconds = time.perf_counter() - start
    return ColdStart([(demo.titles[r], float(v)) for r, v in zip(rows.tolist(), values.tolist())], fit.emb,
                     fit.bias, picks, seconds, opt_in, next_upload(demo, rows, values, fit) if opt_in else None)


def fit_implicit(demo: Demo, positives: np.ndarray):
    """A new device's (p_u, b_u) on implicit feedback: every rated movie is a positive, with
    train-negatives x as many unrated movies drawn from OS entropy as negatives, and local
    training's loss (BCE on the logits plus reg per row) minimized with the items fixed. The
    loss is convex in (p_u, b_u): Newton's method reaches its minimum in a few steps."""
    import torch

    from fedrec.models.personal import UserFit, scoring_vector

    unrated = np.setdiff1d(np.arange(demo.split.n_items), positives)
    negatives = np.random.default_rng().choice(unrated, len(positives) * max(1, demo.hyper.train_negatives))
    item = torch.as_tensor(np.concatenate([positives, negatives]))
    target = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))]).double()
    q = demo.items.emb.detach().double()[item, :demo.hyper.dim]
    features = torch.cat([q, torch.ones(len(item), 1, dtype=torch.float64)], 1)
    implicit = scoring_vector(demo.items, torch.zeros(demo.hyper.dim, dtype=torch.float64), positives)
    offset = demo.items.global_bias.double() + demo.items.bias.detach().double()[item] + q @ implicit
    penalty = 2 * len(item) * torch.tensor([demo.hyper.reg_user] * demo.hyper.dim + [demo.hyper.reg_bias]).double()
    weights = torch.zeros(features.shape[1], dtype=torch.float64)
    for _ in range(50):
        prob = torch.sigmoid(features @ weights + offset)
        gradient = features.T @ (prob - target) + penalty * weights
        hessian = features.T @ (features * (prob * (1 - prob))[:, None]) + torch.diag(penalty)
        step = torch.linalg.solve(hessian, gradient)
        weights -= step
        if float(step.abs().max()) < 1e-9:
            break
    return UserFit(weights[:-1].float().numpy(), float(weights[-1]))


def next_upload(demo: Demo, rows: np.ndarray, values: np.ndarray, fit) -> dict:
    """The upload this device would send if the federation ran one more round: the run's own
    device step on its ratings (clipping, noise and upload shape as the run's settings say)."""
    import torch

    from fedrec.datasets.partition import CohortData
    from fedrec.models.device import device_step
    from fedrec.models.mf import UserState
    from fedrec.run.build import device_policy

    empty = np.zeros(0, dtype=np.int64)
    cohort = CohortData(np.zeros(1, dtype=np.int64), np.zeros(len(rows), dtype=np.int64), rows, values,
                        empty, empty, np.zeros(0, dtype=np.float32), None)
    dim = demo.hyper.dim
    state = UserState(torch.as_tensor(fit.emb).reshape(1, dim), torch.tensor([fit.bias]), torch.zeros(1, dim + 1),
                      torch.zeros(1, dim + 1), torch.zeros(1))
    policy = device_policy(demo.cfg)
    result = device_step(demo.items, state, cohort, demo.split.n_items, demo.hyper, policy,
                         int(demo.summary.get("rounds", 0)) + 1)
    norm = float(result.update.norms[0])
    return {"arrays": [(name, tuple(a.shape), int(a.nbytes)) for name, a in result.upload.items()],
            "norm": norm, "clipped_norm": min(norm, policy.clip_norm) if policy.clip_norm > 0 else norm,
            "noise": device_side().NOISE[demo.cfg.dp],
            "secure_aggregation": demo.cfg.secure_aggregation != "none"}
