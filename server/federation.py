"""The server's side of a run: who trains each round, what they are sent, and how their replies become
the next shared state, in named steps: check -> weigh -> sum -> noise -> step.

- check (server/validation.py): every reply is decoded and checked against what the protocol
  promises (schema, shapes, finite values, counts, the clipping bound, the algorithm's own
  consistency) before anything of it is used;
- weigh (server/robust.py): a factor per accepted reply (--robust-aggregation norm-bound);
- sum: the accepted replies' statistics, scattered to dense per-item arrays;
- noise (fedrec.privacy): central DP's Gaussian noise on the sum and the fixed denominator that keeps
  the count of participants out of the release; distributed DP's denominator;
- step: the algorithm's server_step (an optimizer step, a Gibbs draw).
Sampling is per user, not per node, so results do not depend on how users are grouped on nodes (and
Poisson sampling, which DP accounting needs, is possible). The round loop is server/rounds.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedrec.models.algorithm import Algorithm, ServerState
from fedrec.models.metrics import finish
from fedrec.models.randomness import private_rng
from fedrec.privacy.accountant import PrivacyPlan
from fedrec.privacy.ledger import is_evaluation, released_row
from fedrec.privacy.noise import add_central_noise
from fedrec.privacy.upload import scatter
from fedrec.run import schema
from fedrec.run.config import ConfigError, RunConfig
from fedrec.run.device_config import NOISE_SHARE_KEY

from .directory import NodeDirectory
from .robust import reply_scales
from .sampling import sample_users, sampling_rng
from .validation import check_eval_reply, check_reply_norm, check_reply_peak, check_train_reply, secure_setup


class BudgetExhausted(RuntimeError):
    """The next round would spend more than the privacy budget."""


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v).copy()) for k, v in arrays.items()})


def record_bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


@dataclass
class Accepted:
    """A reply that passed the checks: its statistics (dense), the users it sums, its norm."""

    sums: dict[str, np.ndarray]
    users: float
    norm: float
    metrics: MetricRecord


class Federation:
    def __init__(self, cfg: RunConfig, algorithm: Algorithm, state: ServerState, directory: NodeDirectory,
                 on_round: Callable[[dict], None] | None = None, audit: Callable[[dict], None] | None = None,
                 privacy: PrivacyPlan | None = None):
        self.cfg, self.algorithm, self.state, self.directory = cfg, algorithm, state, directory
        self.statistics = algorithm.statistics()
        self.coords = sum(directory.num_items * s.width if s.per_item else s.width for s in self.statistics.values())
        self.on_round, self.audit, self.privacy = on_round, audit, privacy
        self.history: list[dict] = []  # one released row per round (and one for a final evaluation)
        self._row: dict = {"bytes_up": 0, "bytes_down": 0}  # the open round's record, see begin_round
        self._started = 0.0
        self._sent: dict[int, int] = {}  # node id -> users asked to train this round
        self.bytes_up = self.bytes_down = 0
        self.epsilon = 0.0
        self.rounds_trained = 0
        self.participation = np.zeros(directory.population, np.int64)  # rounds each user took part in
        # users `fedrec forget` removed: drawn like everyone, then dropped, so the others' draws do not change
        self.excluded: np.ndarray | None = None
        self._epsilons: dict[int, float] = {}  # composition count -> epsilon; the budget check and the ledger share it
        # distributed DP: each user's noise share in the release-th round (set by the runner from SecAgg+'s sizing)
        self.device_noise: Callable[[int], float] | None = None

    # ---------------------------------------------------------------- privacy budget
    def epsilon_after(self, releases: int, participation_max: int) -> float:
        """Epsilon once `releases` rounds are out (local DP: the most active user's rounds). Every round is
        the same event, so this is one composition of `count` copies. Releases, not the round number: after
        a crash and --resume, the rounds the lost run got through count too."""
        count = min(participation_max, self.privacy.max_rounds) if self.privacy.mode == "local" else releases
        if count not in self._epsilons:
            self._epsilons[count] = self.privacy.epsilon(count)
        return self._epsilons[count]

    def _check_budget(self, server_round: int) -> None:
        target = self.cfg.target_epsilon
        if not self.privacy or target <= 0:
            return
        upcoming = self.epsilon_after(self.rounds_trained + 1, int(self.participation.max()) + 1)
        if upcoming > target * (1 + 1e-6):
            raise BudgetExhausted(f"round {server_round} would spend epsilon {upcoming:.3f} beyond the target {target}")

    def _account(self) -> None:
        if self.privacy:
            self.epsilon = self.epsilon_after(self.rounds_trained, int(self.participation.max()))
            self._row["epsilon"] = self.epsilon

    # ---------------------------------------------------------------- round record
    def begin_round(self, server_round: int) -> None:
        """Open the record of a round: its row in history and metrics.csv. The train and evaluate steps
        that follow fill it in; finish_round closes it."""
        self._started = time.perf_counter()
        self._row = {"round": server_round, "users_sampled": 0, "bytes_up": 0, "bytes_down": 0}

    def finish_round(self) -> dict:
        """Close the open record: time the round, add its bytes to the run's totals, and append the part
        that may be released (a DP run keeps epsilon and evaluation metrics only) to history and hand it to
        on_round. Returns that row."""
        self._row["seconds"] = time.perf_counter() - self._started
        self.bytes_up += self._row["bytes_up"]
        self.bytes_down += self._row["bytes_down"]
        row = released_row(self._row, self.privacy is not None)
        self.history.append(row)
        if self.on_round:
            self.on_round(row)
        return row

    def final_evaluation(self, grid: Grid, config: ConfigRecord, last_round: int) -> None:
        """After a budget stop: evaluate the model as it stands (evaluation spends no budget), in a row of
        its own for `last_round`, unless that round's row holds evaluation metrics already."""
        if last_round and self.history and any(is_evaluation(k) for k in self.history[-1]):
            return
        self.begin_round(last_round)
        messages = self.configure_evaluate(self.cfg.rounds, config, grid)  # round cfg.rounds always evaluates
        self.aggregate_evaluate(last_round, grid.send_and_receive(messages))
        self.finish_round()

    # ---------------------------------------------------------------- train
    def configure_train(self, server_round: int, config: ConfigRecord, grid: Grid) -> list[Message]:
        """The round's train messages, one per node hosting sampled users (after begin_round)."""
        self._check_budget(server_round)
        arrays = array_record(self.state.broadcast())
        eligible = None
        if self.privacy and self.privacy.max_rounds:  # local/distributed: devices refuse past their cap anyway
            eligible = self.participation < self.privacy.max_rounds
        users = sample_users(self.directory.population, self.cfg.users_per_round, self.cfg.sampling,
                             sampling_rng(self.cfg, server_round), eligible)
        left_out = 0
        if self.excluded is not None:  # forgotten users: drawn like everyone (the others' draws stay), then dropped
            kept = ~self.excluded[users]
            users, left_out = users[kept], int((~kept).sum())
        self.participation[users] += 1
        # The released count is of the users drawn: with the public seed, a dip in it would tell who was forgotten.
        self._row["users_sampled"] = len(users) + left_out
        self._row["_left_out"] = left_out
        self._sent = {}
        joined = self.directory.refresh(grid, config)
        if joined:
            log(INFO, "round %s: %s node(s) joined", server_round, len(joined))
        groups, absent = self.directory.group(users)
        if absent:  # their node is not connected: they count as failed, like a device that is off
            self._row["users_unreachable"] = absent
        messages = []
        for node_id, node_users in groups.items():
            node_config = ConfigRecord(dict(config))
            node_config[schema.ROUND] = server_round
            node_config[schema.USERS] = [int(u) for u in node_users]
            if self.device_noise is not None:  # releases of unequal weight: this round's share (z_r, not z)
                node_config[NOISE_SHARE_KEY] = self.device_noise(self.rounds_trained + 1)
            self._sent[node_id] = len(node_users)
            messages.append(Message(RecordDict({schema.ARRAYS: arrays, schema.CONFIG: node_config}),
                                    dst_node_id=node_id, message_type=MessageType.TRAIN))
        self._row["bytes_down"] += record_bytes(arrays) * len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> bool:
        """The round's replies through check, weigh, sum, noise and step. True if the state moved."""
        accepted = self.check(server_round, replies)
        users = float(sum(a.users for a in accepted))
        self._row["nodes_replied"] = len(accepted)
        self._row["users_failed"] = max(self._asked() - users, 0)
        central = self.privacy is not None and self.privacy.mode == "central"
        rejected = self._row.get("nodes_rejected", 0)
        if not accepted and rejected and self._row.get("_non_finite", 0) == rejected:
            # Every reply came back with inf/nan: honest devices whose training blew up, not an attack.
            raise ConfigError(f"training diverged in round {server_round} (every reply held non-finite values); "
                              f"lower --server-lr ({self.cfg.server_lr}) or --lr ({self.cfg.lr})")
        self.rounds_trained += 1  # a DP run counts a skipped round too: epsilon must not tell it was skipped
        if not self._enough(users) or (not accepted and not central):
            # Too few updates arrived to be worth a step, or nobody was sampled (a halted secure round):
            # nothing is released (central DP never skips: an empty round's noise is released as any other).
            self._row["skipped"] = int(not self._enough(users))
            self._account()
            return False
        total = self.sum(accepted, self.weigh(accepted))
        total, weight = self.noise(server_round, total, users)
        self.step(server_round, total, weight)
        self._row["train_loss"] = self._loss(accepted)
        self._account()
        return True

    def check(self, server_round: int, replies: Iterable[Message]) -> list[Accepted]:
        """Step 1: decode and check every reply; the rejected ones are counted with their reason."""
        accepted = []
        # Under SecAgg+ the one reply is the sum of every node asked: it answers for all their users.
        secure = secure_setup(self.cfg, self.directory, self.coords)
        seen: set[int] = set()
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if reply.has_error():
                self._count("nodes_failed", server_round, node, f"error reply: {reply.error.reason}")
                continue
            if node in seen and not secure:  # one reply per node and round (the SuperLink enforces it too)
                self._count("nodes_rejected", server_round, node, "a second reply in one round")
                continue
            seen.add(node)
            sent = sum(self._sent.values()) if secure else self._sent.get(node, 0)
            problem = check_train_reply(reply.content, sent, self.statistics, self.directory.num_items, self.cfg)
            if problem is None:
                record = reply.content[schema.ARRAYS]
                dense = scatter({k: record[k].numpy() for k in record.keys()}, self.statistics,
                                self.directory.num_items)
                users = float(reply.content[schema.METRICS][schema.WEIGHT])
                norm = float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in dense.values())))
                peak = max(float(np.abs(v).max(initial=0.0)) for v in dense.values())
                senders = len(self._sent) if secure else 1
                problem = (check_reply_norm(norm, users, self.cfg, self.coords, secure, senders)
                           or check_reply_peak(peak, users, self.cfg, self.coords)
                           or self.algorithm.check_sums({k: torch.as_tensor(v) for k, v in dense.items()}, users))
            if problem is not None:
                self._count("nodes_rejected", server_round, node, problem)
                continue
            self._row["bytes_up"] += record_bytes(reply.content[schema.ARRAYS])
            self._audit(server_round, reply)
            accepted.append(Accepted(dense, users, norm, reply.content[schema.METRICS]))
        return accepted

    def weigh(self, accepted: list[Accepted]) -> np.ndarray:
        """Step 2: a factor in {0, 1} per reply (robust aggregation; never under DP)."""
        scales = np.ones(len(accepted))
        if self.algorithm.comparable_norms:  # else heavy users' honest statistics would be dropped
            scales = reply_scales(np.array([a.norm for a in accepted]), np.array([a.users for a in accepted]),
                                  self.cfg, self.privacy is not None)
        self._row["replies_scaled"] = int((scales < 1).sum())
        return scales

    def sum(self, accepted: list[Accepted], scales: np.ndarray) -> dict[str, np.ndarray]:
        """Step 3: the weighed replies added up (float64)."""
        total = {name: np.zeros((self.directory.num_items, s.width) if s.per_item else (s.width,))
                 for name, s in self.statistics.items()}
        for reply, scale in zip(accepted, scales):
            for name in total:
                total[name] += reply.sums[name] * scale
        return total

    def noise(self, server_round: int, total: dict[str, np.ndarray],
              users: float) -> tuple[dict[str, np.ndarray], float]:
        """Step 4: the sum as it may be released, and how many users it stands for. Central DP: Gaussian
        noise on every coordinate (an empty Poisson round too: skipping it would tell that nobody was
        sampled), from OS entropy fresh each round, then the expected number of users as denominator, so
        that the count of participants is not released (McMahan et al., 2018). Distributed DP: the devices'
        noise shares are in the sum already; the denominator is the expected count too."""
        if self.privacy is None:
            return total, max(users, 1.0)
        if self.privacy.mode == "central":
            rng = private_rng("central-noise", self.cfg.seed if self.cfg.reproducible_noise else None, server_round)
            total = add_central_noise(total, self.privacy.round_noise_std(self.rounds_trained), rng)
        if self.privacy.mode in ("central", "distributed"):
            return total, float(self.privacy.sample_size)
        return total, max(users, 1.0)

    def sum_noise_std(self) -> float:
        """The std per coordinate of the noise in this round's released sum (0 without DP): public, from the
        plan and the expected number of users, never from who answered. Algorithms whose regularization
        knows the noise level read it (server_step's noise_std)."""
        if self.privacy is None:
            return 0.0
        if self.privacy.mode == "central":
            return self.privacy.round_noise_std(self.rounds_trained)
        if self.privacy.mode == "distributed" and self.device_noise is not None:
            return self.device_noise(self.rounds_trained) * float(np.sqrt(self.privacy.sample_size))
        return self.privacy.round_noise_std(self.rounds_trained) * float(np.sqrt(self.privacy.sample_size))

    def step(self, server_round: int, total: dict[str, np.ndarray], weight: float) -> None:
        """Step 5: the algorithm's server step; a non-finite result stops the run with a hint."""
        self.algorithm.server_step(self.state, {k: torch.as_tensor(v) for k, v in total.items()}, weight, server_round,
                                   noise_std=self.sum_noise_std())
        if not all(np.isfinite(v).all() for v in self.state.broadcast().values()):
            raise ConfigError(f"training diverged in round {server_round} (non-finite shared parameters); "
                              f"lower --server-lr ({self.cfg.server_lr}) or --lr ({self.cfg.lr}), or use "
                              "--robust-aggregation norm-bound against hostile replies")

    def _loss(self, accepted: list[Accepted]) -> float:
        loss = sum(float(a.metrics["loss-sum"]) for a in accepted if "loss-sum" in a.metrics)
        rows = sum(float(a.metrics["num-rows"]) for a in accepted if "num-rows" in a.metrics)
        return loss / max(rows, 1.0)

    def _asked(self) -> int:
        """Users of the round asked to train: those drawn, less the forgotten ones dropped."""
        return self._row.get("users_sampled", 0) - self._row.get("_left_out", 0)

    def _enough(self, users: float) -> bool:
        """Did enough of the round's sampled users' updates arrive (and pass the checks)?"""
        sampled = self._asked()
        if self.cfg.secure_aggregation != "none" or sampled == 0:
            return True  # SecAgg+ enforces its own least share (--secagg-min-fraction) before unmasking
        if self.privacy is not None and self.privacy.mode == "central":
            # Never skip under central DP: whether a round is skipped depends on who was sampled
            # (un-noised counts), and a skipped round would show as an unchanged model.
            return True
        return users >= self.cfg.min_reply_fraction * sampled

    def _count(self, column: str, server_round: int, node: int, reason: str) -> None:
        """A reply that is not used: counted in the round's row and logged with its reason."""
        self._row[column] = self._row.get(column, 0) + 1
        if "finite" in reason:
            self._row["_non_finite"] = self._row.get("_non_finite", 0) + 1
        log(WARNING, "round %s: reply of node %s %s: %s", server_round, node, column.split("_")[1], reason)
        if self.audit is not None:
            self.audit({"round": server_round, "node": node, "dropped": column.split("_")[1], "reason": reason})

    def _audit(self, server_round: int, reply: Message) -> None:
        if self.audit is None:
            return
        content = reply.content
        self.audit({
            "round": server_round, "node": int(reply.metadata.src_node_id),
            "records": sorted(content.keys()),
            "arrays": {name: {"shape": list(a.shape), "dtype": a.dtype, "bytes": len(a.data)}
                       for rec in content.array_records.values() for name, a in rec.items()},
            "metrics": sorted(k for rec in content.metric_records.values() for k in rec.keys()),
            "configs": sorted(k for rec in content.config_records.values() for k in rec.keys()),
        })

    # ------------------------------------------------------------- evaluate
    def evaluates(self, server_round: int) -> bool:
        return server_round % self.cfg.eval_every == 0 or server_round == self.cfg.rounds

    def configure_evaluate(self, server_round: int, config: ConfigRecord, grid: Grid) -> list[Message]:
        if not self.evaluates(server_round):
            return []
        arrays = array_record(self.state.model())
        config = ConfigRecord(dict(config))
        config[schema.ROUND] = server_round
        self.directory.refresh(grid, config)
        nodes = self.directory.present_ids()
        self._row["bytes_down"] += record_bytes(arrays) * len(nodes)
        return [Message(RecordDict({schema.ARRAYS: arrays, schema.CONFIG: config}), dst_node_id=n,
                        message_type=MessageType.EVALUATE) for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> dict[str, float] | None:
        sums: dict[str, float] = {}
        answered = 0
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if reply.has_error():
                self._count("nodes_failed", server_round, node, f"evaluation error reply: {reply.error.reason}")
                continue
            problem = check_eval_reply(reply.content, self.directory.hosted(node), self.cfg,
                                       self.directory.rating_scale, n_items=self.directory.num_items)
            if problem is not None:
                self._count("nodes_rejected", server_round, node, f"evaluation: {problem}")
                continue
            answered += 1
            for key in schema.EVAL_SUMS:
                sums[key] = sums.get(key, 0.0) + float(reply.content[schema.METRICS][key])
        if not answered:
            return None
        metrics = finish(sums, self.cfg.top_k)
        self._row.update(metrics)
        return metrics
