"""Checks every reply must pass before the server uses it: the server trusts nothing it receives.

Any device may send anything. Each check returns None for a reply the server may use, or a
one-line reason for dropping it (logged in audit.jsonl, counted as nodes_rejected in
metrics.csv); a dropped reply is never applied. What is checked is what the protocol
promises: the schema (fedrec.run.schema, and what fedrec.client.app sends in each
mode), shapes, dtypes, finite values, row indices, the user count, and, when clipping is
on, the clipping bound: a reply summing n users' updates, each clipped to C, has norm at
most n·C (plus the noise or rounding that legitimately rides on it).
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedrec.models.algorithm import Statistic
from fedrec.privacy.upload import ITEM_INDEX
from fedrec.run import schema
from fedrec.run.config import RunConfig

from .directory import NodeDirectory
from .secagg import SecAggSetup, secagg_setup

FLOATS = (np.float32, np.float64)
# A Gaussian vector's norm is 1-Lipschitz in its entries, so it exceeds std·(√D + t) with
# probability at most exp(-t²/2): t = 8 makes an honest noised reply fail about once in 10^14.
NOISE_TAIL = 8.0
ROUNDING = 1e-5  # relative slack of the n·C bound for float32 sums (the device clips to C(1 - 1e-6))
LOSS_KEYS = ("loss-sum", "num-rows")


def train_array_names(statistics: dict[str, Statistic], cfg: RunConfig) -> set[str]:
    """Arrays a train reply holds: the algorithm's statistics, and their row indices unless dense."""
    names = set(statistics)
    return names if cfg.update_mode == "dense" or cfg.secure_aggregation != "none" else names | {ITEM_INDEX}


def train_metric_names(cfg: RunConfig) -> set[str]:
    """Metrics a train reply holds (fedrec.client.app.train): the user count always; loss and row
    sums only where they reveal nothing the upload does not (not under local DP, not with decoys),
    and never in the single summed reply of a SecAgg+ round."""
    if cfg.dp == "local" or cfg.update_mode == "padded" or cfg.secure_aggregation != "none":
        return {schema.WEIGHT}
    return {schema.WEIGHT, *LOSS_KEYS}


def check_train_reply(content: RecordDict, sent_users: int, statistics: dict[str, Statistic], n_items: int,
                      cfg: RunConfig) -> str | None:
    """Why a train reply (to a message that asked `sent_users` users to train) must not be applied."""
    problem = _records(content, {schema.ARRAYS: ArrayRecord, schema.METRICS: MetricRecord})
    if problem:
        return problem
    arrays, metrics = content[schema.ARRAYS], content[schema.METRICS]
    problem = _keys("arrays", arrays, train_array_names(statistics, cfg)) or _keys("metrics", metrics,
                                                                                    train_metric_names(cfg))
    if problem:
        return problem
    most = n_items * sum(s.width for s in statistics.values()) + n_items
    values = {}
    for name in arrays.keys():
        values[name], problem = _decode(name, arrays[name], most)
        if problem:
            return problem
    rows = n_items
    if ITEM_INDEX in values:
        index = values[ITEM_INDEX]
        if index.dtype.kind not in "iu" or index.ndim != 1:
            return f"{ITEM_INDEX} must be a 1-D integer array (got {index.dtype} {index.shape})"
        rows = len(index)
        if rows and (index.min() < 0 or index.max() >= n_items):
            return f"{ITEM_INDEX} holds rows outside [0, {n_items})"
        if len(np.unique(index)) != rows:  # a repeated row would be summed twice and dodge the norm check
            return f"{ITEM_INDEX} lists a row more than once"
    for name, stat in statistics.items():
        value, shape = values[name], (rows, stat.width) if stat.per_item else (stat.width,)
        if value.dtype not in FLOATS:
            return f"{name} has dtype {value.dtype}, expected float32 or float64"
        if value.shape != shape:
            return f"{name} has shape {value.shape}, expected {shape}"
        if not np.isfinite(value).all():
            return f"{name} holds non-finite values"
        if value.size and np.abs(value).max() > np.finfo(np.float32).max:  # would turn inf in the float32 model
            return f"{name} holds values beyond the float32 range"
    users = metrics[schema.WEIGHT]
    problem = _count(schema.WEIGHT, users, sent_users)
    if problem:
        return problem
    if "loss-sum" in metrics and not _number(metrics["loss-sum"], 0.0, math.inf):
        return f"loss-sum={metrics['loss-sum']!r} is not a finite number >= 0"
    if "num-rows" in metrics:  # at most every item, and its sampled negatives under implicit feedback
        problem = _count("num-rows", metrics["num-rows"], users * n_items * (1 + cfg.train_negatives))
        if problem:
            return problem
    if users == 0 and cfg.clipping_norm <= 0 and any(np.any(values[k]) for k in statistics):
        return "sums 0 users but carries a non-zero update"  # with clipping, the n·C check covers this
    return None


def reply_norm_bound(users: float, cfg: RunConfig, coords: int, secure: SecAggSetup | None = None,
                     nodes: int = 1) -> float:
    """The largest L2 norm an honest reply summing `users` users can have (inf without clipping).

    coords: coordinates of the dense update (items x (dim + 1) + 1). Each user's update is
    clipped to C, so the clipped sum is at most users·C (triangle inequality). Added to it:
    - local DP: each user's N(0, (zC)²) per coordinate, so the reply's noise has std
      zC·√users per coordinate; bounded by its norm's tail (NOISE_TAIL);
    - SecAgg+ (`secure`: the round's setup, `nodes`: nodes asked): each node's stochastic
      rounding moves each coordinate by less than one step 2r/L, and under distributed DP
      each user adds its noise share (std `noise_share_std` per coordinate).
    """
    c = cfg.clipping_norm
    if c <= 0:
        return math.inf
    noise_std = 0.0
    if cfg.dp == "local":
        noise_std = cfg.noise_multiplier * c * math.sqrt(users)
    slack = 0.0
    if secure is not None:
        noise_std = secure.noise_share_std * math.sqrt(users)
        slack = nodes * secure.step * math.sqrt(coords)
    return users * c * (1 + ROUNDING) + slack + noise_std * (math.sqrt(coords) + NOISE_TAIL) + 1e-12


def check_reply_norm(norm: float, users: float, cfg: RunConfig, coords: int = 0, secure: SecAggSetup | None = None,
                     nodes: int = 1) -> str | None:
    """Why a train reply whose dense update has L2 norm `norm` and sums `users` users must not be
    applied (arguments as for reply_norm_bound)."""
    if not math.isfinite(norm):
        return f"update norm {norm} is not finite"
    bound = reply_norm_bound(users, cfg, coords, secure, nodes)
    if norm > bound:
        return (f"update norm {norm:.6g} exceeds {bound:.6g}, "
                f"the bound for {users:g} user(s) clipped to C={cfg.clipping_norm:g}")
    return None


def check_reply_peak(peak: float, users: float, cfg: RunConfig, coords: int) -> str | None:
    """Under local DP the norm bound leaves room for the noise; a device that skips its noise could
    spend all that room on one coordinate. No honest coordinate exceeds users·C plus the
    largest of `coords` Gaussians of std zC·√users (a data-independent bound)."""
    if cfg.dp != "local" or cfg.clipping_norm <= 0:
        return None
    std = cfg.noise_multiplier * cfg.clipping_norm * math.sqrt(users)
    largest_gaussian = math.sqrt(2 * math.log(2 * max(coords, 1))) + NOISE_TAIL
    bound = users * cfg.clipping_norm * (1 + ROUNDING) + std * largest_gaussian
    if peak > bound:
        return f"update coordinate {peak:.6g} exceeds {bound:.6g}, the most one of {users:g} noised user(s) can move"
    return None


def check_eval_reply(content: RecordDict, hosted_users: int, cfg: RunConfig, rating_scale: tuple[float, float],
                     *, n_items: int) -> str | None:
    """Why an evaluate reply from a node hosting `hosted_users` users (of a catalogue of
    `n_items` items) must not be used: its sums must be ones its users' held-out rows can give."""
    problem = _records(content, {schema.METRICS: MetricRecord})
    if problem:
        return problem
    metrics = content[schema.METRICS]
    problem = _keys("metrics", metrics, {schema.WEIGHT, *schema.EVAL_SUMS})
    if problem:
        return problem
    for key in metrics.keys():
        if not _number(metrics[key], 0.0, math.inf):
            return f"{key}={metrics[key]!r} is not a finite number >= 0"
    s = {k: float(metrics[k]) for k in schema.EVAL_SUMS}
    problem = _count(schema.WEIGHT, metrics[schema.WEIGHT], hosted_users)
    if problem:
        return problem
    if cfg.implicit:  # leave-one-out: one positive per user, ranking sums only
        checks = [("num-ratings", s["num-ratings"], 0), ("num-ranked", s["num-ranked"], hosted_users),
                  ("num-full", s["num-full"], hosted_users), ("hits", s["hits"], s["num-ranked"])]
        # a hit at rank r < k scores 1/log2(r + 2): between 1/log2(k + 1) and 1
        bounds = [("sse", s["sse"], 0.0, 0.0), ("sae", s["sae"], 0.0, 0.0),
                  ("ndcg", s["ndcg"], s["hits"] / math.log2(cfg.top_k + 1), s["hits"]),
                  ("recall-full", s["recall-full"], 0.0, s["num-full"]),
                  ("ndcg-full", s["ndcg-full"], 0.0, s["num-full"])]
    else:
        # random holdout: rint(test_fraction x rated) of each user's ratings, rated <= n_items
        per_user = n_items if cfg.split.startswith("u") else round(cfg.test_fraction * n_items)
        n = s["num-ratings"]
        spread = rating_scale[1] - rating_scale[0]  # predictions are clamped to the scale
        checks = [("num-ratings", n, hosted_users * per_user)] + [(k, s[k], 0) for k in ("num-ranked", "num-full")]
        # each |error| <= spread, so sse <= n·spread² and sse <= spread·sae; Cauchy-Schwarz: sae² <= n·sse
        bounds = [("sse", s["sse"], 0.0, n * spread**2),
                  ("sae", s["sae"], s["sse"] / spread if spread else 0.0, math.sqrt(n * s["sse"])),
                  *((k, s[k], 0.0, 0.0) for k in ("hits", "ndcg", "recall-full", "ndcg-full"))]
    # validation items (--validation-item): one per user, ranking sums only, bounded like the test item's
    held = cfg.validation_item and cfg.implicit
    checks += [("val-num-ranked", s["val-num-ranked"], hosted_users if held else 0),
               ("val-hits", s["val-hits"], s["val-num-ranked"])]
    bounds += [("val-ndcg", s["val-ndcg"], s["val-hits"] / math.log2(cfg.top_k + 1), s["val-hits"])]
    for key, value, most in checks:
        problem = _count(key, value, most)
        if problem:
            return problem
    for key, value, low, high in bounds:
        tolerance = 1e-6 * max(abs(low), abs(high)) + 1e-9  # float sums of float32 predictions
        if not low - tolerance <= value <= high + tolerance:
            return f"{key}={value:.6g} is outside [{low:.6g}, {high:.6g}], what its counts allow"
    return None


# ---------------------------------------------------------------- helpers
def _records(content: RecordDict, want: dict[str, type]) -> str | None:
    if not isinstance(content, RecordDict) or set(content.keys()) != set(want):
        keys = sorted(content.keys()) if isinstance(content, RecordDict) else type(content).__name__
        return f"records {keys}, expected {sorted(want)}"
    for key, kind in want.items():
        if not isinstance(content[key], kind):
            return f"record {key!r} is a {type(content[key]).__name__}, expected {kind.__name__}"
    return None


def _keys(what: str, record, want: set[str]) -> str | None:
    got = set(record.keys())
    return None if got == want else f"{what} {sorted(got)}, expected {sorted(want)}"


def _decode(name: str, array: Array, most: int) -> tuple[np.ndarray | None, str | None]:
    """The array as NumPy, refusing anything larger than a dense update before reading it."""
    if len(array.data) > 8 * most + 4096:  # 8 bytes per value at most, plus the .npy header
        return None, f"{name} is {len(array.data)} bytes, more than a whole dense update"
    try:
        value = array.numpy()
    except Exception as error:  # malformed bytes, another serialization type, pickled objects
        return None, f"{name} cannot be read as a NumPy array ({type(error).__name__})"
    if not isinstance(value, np.ndarray):
        return None, f"{name} is not a NumPy array"
    return value, None


def _number(value, low: float, high: float) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and low <= value <= high
    except OverflowError:  # an int beyond float range
        return False


def _count(key: str, value, most: float) -> str | None:
    """A count: a whole number in [0, most]."""
    if not _number(value, 0.0, math.inf) or value != int(value):
        return f"{key}={value!r} is not a whole number >= 0"
    if value > most:
        return f"{key}={value:g} exceeds {most:g}, the most this node can report"
    return None


def secure_setup(cfg: RunConfig, directory: NodeDirectory, coords: int) -> SecAggSetup | None:
    """The SecAgg+ setup of the run (None without SecAgg+), from the facts server/app.py sizes it with."""
    if cfg.secure_aggregation == "none":
        return None
    return secagg_setup(cfg, len(directory.node_ids), int(directory.num_users.max()), coords, cfg.noise_multiplier,
                        cfg.users_per_round or directory.population, directory.population)
