"""Canary audit: an empirical lower bound on epsilon, measured through the real pipeline (Jagielski et
al. 2020; Nasr et al. 2021; many canaries per run after Steinke, Nasr & Jagielski 2023).

The instrument is an algorithm (`Canaries`) whose statistics are shaped like the audited run's, so that
SecAgg+'s sizing and the server's norm checks are the run's own. Every user of the federation is a
canary that owns one coordinate of those statistics. With probability 1/2 (OS entropy) it is a member
and its update is huge along its coordinate; otherwise it sends nothing (the add/remove neighbour, and the
zero-out one where every user takes part in every round) or the opposite update (the replace-one
neighbour: fixed-size sampling, local DP). The run is a real one:
fedrec's server (`run_server`) and ClientApp, in process. `device_step` clips each canary to C and adds
the device's noise, SecAgg+ quantizes and sums where set, and the Federation checks, weighs, sums,
noises and steps. The instrument's server step applies sums / weight (FedAvg, lr 1) and records it:
what the run releases into the model each round. A bug anywhere on that path (clipping that does not
bind, noise skipped in a round or sized for the wrong count) moves the bound.

Observers:
- aggregate (central and distributed DP, no DP): the model's steps. The attacker multiplies each back
  by the round's denominator (public under DP), estimates the round's noise from the release itself
  (most coordinates carry no canary in a round), and scores each canary by the likelihood ratio of its
  coordinate over the rounds, with a mixture per round since it does not know who was sampled;
- upload (local DP): the server reads each device's reply. Each canary has a node of its own (the
  deployment shape; a cohort's upload would carry its users' noise on every row), and its score is the
  sum of its coordinate over its uploads: the exact likelihood ratio of +C against -C.

A threshold is chosen on half of the canaries and TPR and FPR are bounded on the other half with
Clopper-Pearson. Any (eps, delta)-DP mechanism obeys TPR <= e^eps FPR + delta, so

    eps_lower = log((TPR_low - delta) / FPR_high)

holds with the stated confidence. Canaries own disjoint coordinates, the noise is independent per
coordinate, and the noise estimate reads the selection half only, so the held-out canaries are
independent trials of the per-user mechanism (fixed-size sampling couples who is sampled, weakly).
A lower bound above the accountant's epsilon is a bug.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from flwr.app import MessageType
from scipy import stats

from fedrec.client.app import app as client_app
from fedrec.models.algorithm import (
    CLIPPING,
    DP,
    SECURE_AGGREGATION,
    Algorithm,
    RowContributions,
    ServerState,
    Statistic,
)
from fedrec.models.randomness import private_rng
from fedrec.models.registry import algorithm_class, substituted
from fedrec.privacy.accountant import participation_cap
from fedrec.run import schema
from fedrec.run.build import make_algorithm
from fedrec.run.config import ConfigError, RunConfig
from fedrec.server.runner import run_server
from fedrec.simulations.inprocess import InProcessGrid

OVERSHOOT = 1e4  # a member's raw update is this many times C: clipping must bring it down
NODES = 3  # cohort nodes of the aggregate-observer runs (SecAgg+ needs several)
LOCAL_CANARIES = 400  # at most, under local DP: each has a node of its own, one ClientApp call per round
NOISE_FLOOR = 1e-9  # x C: the least noise std the attacker assumes for a round (a round without noise has 0)


@dataclass
class Instrument:
    """What the canaries of one audit run are: shared by the server's and the nodes' instances (one process)."""

    imitated: type[Algorithm]  # the audited algorithm, whose statistics the canaries' are shaped like
    member: np.ndarray  # [canaries] bool, from OS entropy; canary j is user j and owns coordinate j
    replace_one: bool  # a non-member sends the opposite update (else nothing)
    magnitude: float  # a member's raw update along its coordinate
    released: list[tuple[np.ndarray, float]] = field(default_factory=list)  # per applied round: the canaries'
    # coordinates of sums / weight, and weight


def per_item(statistics: dict[str, Statistic]) -> list[tuple[str, int]]:
    """(name, width) of the per-item statistics, in declared order: the canaries' coordinates."""
    return [(name, s.width) for name, s in statistics.items() if s.per_item]


def flat(arrays: dict[str, np.ndarray], statistics: dict[str, Statistic], count: int) -> np.ndarray:
    """The first `count` coordinates of the per-item statistics laid end to end (float64)."""
    parts = [np.asarray(arrays[name], np.float64).reshape(-1) for name, _ in per_item(statistics)]
    return np.concatenate(parts)[:count]


def place(coordinates: np.ndarray, statistics: dict[str, Statistic], n_items: int) -> list[tuple]:
    """Where flat coordinates lie: per per-item statistic, (name, which of `coordinates` lie in it, their items,
    their columns)."""
    out, start = [], 0
    for name, width in per_item(statistics):
        inside = np.flatnonzero((coordinates >= start) & (coordinates < start + n_items * width))
        local = coordinates[inside] - start
        out.append((name, inside, local // width, local % width))
        start += n_items * width
    return out


class Released(ServerState):
    """The instrument's server state: the sum of every step released so far, per statistic."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.params = {name: np.zeros(shape) for name, shape in shapes.items()}

    def broadcast(self) -> dict[str, np.ndarray]:
        return {k: v.astype(np.float32) for k, v in self.params.items()}  # what devices get (they ignore it)

    def model(self) -> dict[str, np.ndarray]:
        return self.broadcast()

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.params.items()}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        self.params = {k: np.array(arrays[k], np.float64) for k in self.params}


class Canaries(Algorithm):
    """The audit's instrument (see the module docstring); `instrument_class` binds it to one audit run."""

    name = "canary"
    title = "canary audit instrument"
    instrument: ClassVar[Instrument]

    def __init__(self, settings, n_items: int, rating_scale: tuple[float, float]):
        super().__init__(settings, n_items, rating_scale)
        self._statistics = self.instrument.imitated(settings, n_items, rating_scale).statistics()

    def statistics(self) -> dict[str, Statistic]:
        return self._statistics

    def new_users(self, users, population, rng):
        return {}  # no state of its own (fedrec.privacy.device adds the participation count)

    def train(self, shared, state, rows, round_, keys, decoys=None):
        inst, users = self.instrument, np.asarray(rows.users)
        sign = np.where(inst.member[users], 1.0, -1.0 if inst.replace_one else 0.0)
        sends = np.flatnonzero(sign != 0)  # positions of the users that send something
        values = torch.as_tensor(sign[sends] * inst.magnitude, dtype=torch.float32)
        item = np.zeros(len(sends), np.int64)
        rows_out = {}
        for name, which, items, column in place(users[sends], self._statistics, self.n_items):
            table = torch.zeros(len(sends), self._statistics[name].width)
            table[torch.as_tensor(which), torch.as_tensor(column)] = values[torch.as_tensor(which)]
            rows_out[name] = table
            item[which] = items
        totals = {name: torch.zeros(len(users), s.width) for name, s in self._statistics.items() if not s.per_item}
        return state, RowContributions(len(users), torch.as_tensor(sends), torch.as_tensor(item), rows_out, totals)

    def init_server(self, strategy: str, server_lr: float) -> Released:
        return Released({name: (self.n_items, s.width) if s.per_item else (s.width,)
                         for name, s in self._statistics.items()})

    def server_step(self, state: Released, sums, weight: float, round_: int, noise_std: float = 0.0) -> None:
        """FedAvg at lr 1, recording the step: exactly what the round releases into the model."""
        step = {name: sums[name].double().numpy() / weight for name in state.params}
        for name, value in step.items():
            state.params[name] += value
        self.instrument.released.append((flat(step, self._statistics, len(self.instrument.member)), weight))

    def evaluate(self, model, state, rows, k: int) -> dict[str, float]:
        return {}  # canaries have no held-out ratings

    def recommend(self, model, items, ratings, n, hide=None):
        raise TypeError("the canary audit's instrument recommends nothing")


def instrument_class(instrument: Instrument) -> type[Canaries]:
    """A Canaries class bound to `instrument`, admitting what the imitated algorithm admits."""
    imitated = instrument.imitated
    return type("Canaries", (Canaries,), {"instrument": instrument, "refuses": imitated.refuses,
                                          "settings_read": imitated.settings_read,
                                          "implicit_feedback": imitated.implicit_feedback,
                                          # the run's rounds, their weights and C are the imitated algorithm's
                                          "release_weights": imitated.release_weights,
                                          "bounded_norm": imitated.bounded_norm})


class UploadObserver(InProcessGrid):
    """An in-process grid that keeps no message log; with `statistics`, it sums what each one-user node's train
    replies carry on its canary's coordinate (the server's view of each upload, under local DP)."""

    def __init__(self, num_nodes: int, statistics: dict[str, Statistic] | None = None, n_items: int = 0):
        super().__init__(client_app, num_nodes)
        self.uploads = np.zeros(num_nodes)  # per canary (= user = partition): the sum of its coordinate
        self.where: dict[int, tuple[str, int, int]] = {}  # canary -> (statistic, item, column) of its coordinate
        for name, which, items, columns in place(np.arange(num_nodes), statistics or {}, n_items):
            self.where |= {int(w): (name, int(i), int(c)) for w, i, c in zip(which, items, columns)}

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        self.sent.clear()
        self.replies.clear()
        for reply in replies:
            if reply.metadata.message_type != MessageType.TRAIN or reply.has_error() or not self.where:
                continue
            user = int(self.contexts[reply.metadata.src_node_id].node_config["partition-id"])
            name, item, column = self.where[user]
            self.uploads[user] += float(reply.content[schema.ARRAYS][name].numpy()[item, column])
        return replies


def canary_config(cfg: RunConfig, n_items: int, population: int, count: int) -> RunConfig:
    """The canary run of `cfg`: its DP mode, noise, C, sampling rate and rounds, with `count` canary users
    (synthetic data of `n_items` items: the instrument ignores the ratings). Local DP: every user takes part
    in each of the run's cap rounds on a node of its own; otherwise 3 cohort nodes and cfg's rounds."""
    cfg = cfg.resolved()
    rate = (cfg.users_per_round or population) / population
    changes = dict(dataset="synthetic", split="random", validation=False, synthetic_users=count,
                   synthetic_items=n_items, synthetic_density=min(1.0, 4 / n_items), update_mode="dense",
                   clipping_norm=cfg.clipping_norm or 1.0, dropout=0.0, keep_checkpoints=False, resume="",
                   checkpoint_every=0, users_per_node=-(-count // NODES), eval_every=cfg.rounds,
                   users_per_round=0 if rate >= 1 else max(1, round(rate * count)))
    if cfg.dp == "local":
        cap = min(cfg.rounds, cfg.max_rounds_per_user or participation_cap(cfg.rounds, rate, population))
        changes |= dict(rounds=cap, eval_every=cap, users_per_round=0, users_per_node=1, max_rounds_per_user=cap)
    if cfg.dp == "distributed":
        changes["secure_aggregation"] = "secagg+"
    return dataclasses.replace(cfg, **changes)


def admitted(cfg: RunConfig) -> None:
    """Refuse (one line) a run whose algorithm does not admit what the audit needs, in its own words."""
    imitated = algorithm_class(cfg.resolved().model)
    needs = [CLIPPING] + ([DP] if cfg.dp != "none" else []) + ([SECURE_AGGREGATION] if cfg.dp == "distributed" else [])
    for mechanism in needs:
        if mechanism in imitated.refuses:
            raise ConfigError(f"the canary audit needs {mechanism}, which {imitated.title} refuses: "
                              f"{imitated.refuses[mechanism]}")


def canary_audit(cfg: RunConfig, n_items: int, population: int, canaries: int = 200_000,
                 confidence: float = 0.95) -> dict:
    """One audit row: `cfg`'s privacy settings run by a federation of canaries (see the module docstring),
    its empirical epsilon lower bound next to the epsilon its accountant reports. `n_items` and `population`:
    the audited data's, which set the statistics' shape and the sampling rate."""
    admitted(cfg)
    imitated = algorithm_class(cfg.resolved().model)
    statistics = make_algorithm(cfg, n_items, (1.0, 5.0)).statistics()  # the audited run's shape
    local = cfg.dp == "local"
    most = sum(n_items * width for _, width in per_item(statistics))  # one coordinate each
    count = min(canaries, most, LOCAL_CANARIES if local else most)
    run_cfg = canary_config(cfg, n_items, population, count)
    rng = private_rng("canaries")
    member, selection = rng.random(count) < 0.5, rng.random(count) < 0.5
    # replace-one where a fixed-size sample is drawn; with every user in every round the relation is zero-out
    # (a non-member's device answers with zeros), as it is accounted
    replace_one = local or (run_cfg.sampling == "fixed" and run_cfg.partial)
    instrument = Instrument(imitated, member, replace_one, OVERSHOOT * run_cfg.clipping_norm)
    nodes = count if local else -(-count // run_cfg.users_per_node)
    grid = UploadObserver(nodes, statistics if local else None, n_items)
    with tempfile.TemporaryDirectory() as tmp, substituted(run_cfg.model, instrument_class(instrument)):
        outcome = run_server(grid, dataclasses.replace(run_cfg, out=str(Path(tmp) / "run")))
    privacy = outcome.summary["privacy"]
    if local:
        score = grid.uploads  # the exact log-likelihood ratio of +C against -C, up to a positive factor
    else:
        rate = (run_cfg.users_per_round or count) / count
        score = aggregate_scores(instrument.released, selection, rate, run_cfg.clipping_norm, replace_one)
    row = {"attacker": "canary", "observer": "upload" if local else "aggregate", "dp": run_cfg.dp,
           "secure_aggregation": run_cfg.secure_aggregation, "epsilon": privacy.get("epsilon"),
           "canaries": count, "rounds": run_cfg.rounds, "noise_multiplier": privacy.get("noise_multiplier", 0.0),
           "noise_std": privacy.get("noise_multiplier", 0.0) * privacy.get("clipping_norm", 0.0),
           "relation": "replace-one" if replace_one else "add-remove" if run_cfg.partial else "zero-out"}
    return row | epsilon_lower_bound(score, member, selection, cfg.target_delta, confidence)


def aggregate_scores(released: list[tuple[np.ndarray, float]], selection: np.ndarray, rate: float, clip: float,
                     replace_one: bool) -> np.ndarray:
    """Log-likelihood ratio of each canary's presence from the model's steps: per round, the step times its
    denominator is the noised sum; the round's noise std is estimated on the selection half's coordinates
    (median absolute deviation), and sampling, unknown to the attacker, makes each round a mixture."""
    score = np.zeros(len(selection))
    for step, weight in released:
        o = step * weight
        reference = o[selection]
        sigma = max(1.4826 * float(np.median(np.abs(reference - np.median(reference)))), NOISE_FLOOR * clip)
        present = _log_mix(o, rate, clip, sigma)
        absent = _log_mix(o, rate, -clip, sigma) if replace_one else -(o**2) / (2 * sigma**2)
        score += present - absent
    return score


def _log_mix(o: np.ndarray, q: float, shift: float, sigma: float) -> np.ndarray:
    """log((1 - q) N(o; 0, s^2) + q N(o; shift, s^2)) up to a constant shared by both hypotheses."""
    a = math.log1p(-q) - o**2 / (2 * sigma**2) if q < 1 else np.full(o.shape, -np.inf)
    b = math.log(q) - (o - shift) ** 2 / (2 * sigma**2)
    return np.logaddexp(a, b)


def epsilon_lower_bound(score: np.ndarray, member: np.ndarray, selection: np.ndarray, delta: float,
                        confidence: float) -> dict:
    """Choose a threshold (and direction) on the `selection` canaries, bound TPR and FPR on the others with
    Clopper-Pearson, and turn them into a lower bound on epsilon."""
    alpha = 1 - confidence
    sign, threshold = _best_test(score[selection], member[selection], delta, alpha)
    held_score, held_member = score[~selection], member[~selection]
    guess = sign * held_score >= threshold
    pos, neg = (held_member, ~held_member) if sign > 0 else (~held_member, held_member)
    tp, fp = int((guess & pos).sum()), int((guess & neg).sum())
    tpr_low = _cp_low(tp, int(pos.sum()), alpha / 2)
    fpr_high = _cp_high(fp, int(neg.sum()), alpha / 2)
    eps = float(np.log((tpr_low - delta) / fpr_high)) if tpr_low > delta else 0.0
    return {"epsilon_lower": max(eps, 0.0), "confidence": confidence, "tpr": tp / max(pos.sum(), 1),
            "fpr": fp / max(neg.sum(), 1), "held_out_canaries": int(len(held_score))}


def _best_test(score: np.ndarray, member: np.ndarray, delta: float, alpha: float) -> tuple[int, float]:
    """(sign, threshold) whose bound is best on the selection half; sign -1 tests absence."""
    best, choice = -np.inf, (1, np.inf)
    for sign in (1, -1):
        s = sign * score
        pos, neg = (member, ~member) if sign > 0 else (~member, member)
        order = np.argsort(-s, kind="mergesort")
        tp, fp = np.cumsum(pos[order]), np.cumsum(neg[order])
        for cut in np.unique(np.geomspace(1, len(s), 200).astype(int)) - 1:
            low = _cp_low(int(tp[cut]), int(pos.sum()), alpha / 2)
            high = _cp_high(int(fp[cut]), int(neg.sum()), alpha / 2)
            if low > delta and np.log((low - delta) / high) > best:
                best, choice = np.log((low - delta) / high), (sign, float(s[order][cut]))
    return choice


def _cp_low(k: int, n: int, a: float) -> float:
    return 0.0 if k == 0 or n == 0 else float(stats.beta.ppf(a, k, n - k + 1))


def _cp_high(k: int, n: int, a: float) -> float:
    return 1.0 if k == n or n == 0 else float(stats.beta.ppf(1 - a, k + 1, n - k))
