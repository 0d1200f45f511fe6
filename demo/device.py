"""What a device computes for the page: its view, its top-10, and a new device's cold start.

The server process stands in for the phone: recommendations come from the global item
model and the device's own vector, scored and refitted by the run's algorithm (its `top_n` and
`fit_user`), never from anything the server knows about the user.
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
    import torch

    from fedrec.models.factors import Users

    user = Users(torch.as_tensor(np.asarray(vector, dtype=np.float32))[None, :], torch.tensor([float(bias)]))
    best, scores = demo.algorithm.top_n(demo.model, user, np.asarray(rated_rows, dtype=np.int64), n)
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
    """A new device's fit (the run's algorithm's, on implicit feedback too) and its top-10, timed."""
    rows = np.fromiter(ratings, dtype=np.int64)
    values = np.array([ratings[r] for r in rows.tolist()], dtype=np.float32)
    start = time.perf_counter()
    fit = demo.algorithm.fit_user(demo.model, rows, values)
    vector, bias = fit.emb[0].numpy(), float(fit.bias[0])
    picks = recommend(demo, vector, bias, rows)
    seconds = time.perf_counter() - start
    return ColdStart([(demo.titles[r], float(v)) for r, v in zip(rows.tolist(), values.tolist())], vector, bias,
                     picks, seconds, opt_in, next_upload(demo, rows, values) if opt_in else None)


def next_upload(demo: Demo, rows: np.ndarray, values: np.ndarray) -> dict:
    """What this device would send if the federation ran one more round: the run's own device step
    (fedrec.privacy.device: training, clipping, noise and upload shape as the run's settings say) for a
    new user, on its ratings."""
    from fedrec.datasets.partition import CohortData
    from fedrec.privacy.clip import clip_scales
    from fedrec.privacy.device import device_step, new_users

    empty = np.zeros(0, dtype=np.int64)
    population = demo.split.n_users
    user = np.array([population])  # the next id after the run's users: this device joins as a new one
    cohort = CohortData(user, np.zeros(len(rows), dtype=np.int64), rows, values, empty, empty,
                        np.zeros(0, dtype=np.float32), None)
    policy = demo.cfg.device_policy(demo.cfg.seed)
    state = new_users(demo.algorithm, user, population + 1, policy)
    shared = {name: value.numpy() for name, value in demo.model.items()}
    result = device_step(demo.algorithm, shared, state, cohort, int(demo.summary.get("rounds", 0)) + 1, policy,
                         demo.cfg.seed)
    norms = result.sums.norms[0]
    norm = float(norms[0])
    side = device_side()
    secure = demo.cfg.secure_aggregation != "none"
    arrays = (side.upload_arrays(demo.cfg, demo.algorithm.statistics(), demo.split.n_items, len(rows)) if secure
              else [(name, tuple(a.shape), int(a.nbytes)) for name, a in result.upload.items()])
    return {"arrays": arrays, "norm": norm,
            "clipped_norm": norm * float(clip_scales(norms.double(), policy.clipping_norm)[0]),
            "noise": side.NOISE[demo.cfg.dp], "secure_aggregation": secure}
