"""The fedrec strategy: user-level sampling, summed item updates, server optimizer.

Built on Flower's FedAvg for message construction, reply validation and logging; the round
loop is fedrec's own (server/rounds.py), which opens and closes each round's record here
(begin_round, finish_round). What it changes, and why:
- sampling is per user, not per node, so results do not depend on how users are grouped
  on nodes (and Poisson sampling is possible, which DP accounting needs);
- replies carry the *sum* of their users' item changes and the number of users; the
  server divides by the total users, so every user weighs the same whether it shares a
  node or not (node-level weighted averaging would not give that);
- the mean change is applied by a server optimizer (fedrec.models.server_opt); the
  default, FedAdam, is what resolves the rarely-rated-item dilution of plain FedAvg.

Why not Flower's DifferentialPrivacy*FixedClipping wrappers and clipping mods: they clip
each *reply*, i.e. a whole node, while the privacy unit here is the user and a node may
host thousands; they need a plain FedAvg inside, equal reply weights and a fixed
num_sampled_clients, and their accountant has no sampling amplification. So each user's
update is clipped inside the node before anything is summed (fedrec.models.local_train),
and the noise is added here, to the sum, calibrated to the clipping norm.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedrec.models import ItemParams, ServerOptimizer, finish
from fedrec.models.bpmf import Sampler
from fedrec.models.randomness import private_rng
from fedrec.models.upload import scatter_upload
from fedrec.run import schema
from fedrec.run.build import hyper
from fedrec.run.config import ConfigError, RunConfig

from .directory import NodeDirectory
from .privacy import PrivacyPlan, add_central_noise
from .releases import is_evaluation, released_row
from .robust import reply_scales
from .sampling import sample_users, sampling_rng
from .validation import (
    check_eval_reply,
    check_reply_norm,
    check_reply_peak,
    check_statistics,
    check_train_reply,
    secure_setup,
)


class BudgetExhausted(RuntimeError):
    """The next round would spend more than the privacy budget."""


def array_record(items: ItemParams) -> ArrayRecord:
    return ArrayRecord({k: Array(v.copy()) for k, v in items.numpy().items()})


def record_bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


def _norm(dense: dict[str, np.ndarray]) -> float:
    """L2 norm of a reply's whole item-side update (every array, as clipping measures it)."""
    return float(np.sqrt(sum(float(np.square(dense[k], dtype=np.float64).sum()) for k in schema.ITEM_ARRAYS)))


class FedRecStrategy(FedAvg):
    def __init__(self, cfg: RunConfig, directory: NodeDirectory, items: ItemParams,
                 on_round: Callable[[dict], None] | None = None, audit: Callable[[dict], None] | None = None,
                 privacy: PrivacyPlan | None = None):
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                         min_available_nodes=1, weighted_by_key=schema.WEIGHT)
        self.cfg = cfg
        self.directory = directory
        self.items = items
        self.optimizer = ServerOptimizer(items, cfg.strategy, cfg.server_lr)
        # BPMF: the summed statistics feed a Gibbs draw of the items instead of an optimizer step;
        # self.items is then the mean of the draws after burn-in (what is evaluated and saved)
        self.sampler = Sampler(items, hyper(cfg), cfg.seed) if cfg.model == "bpmf" else None
        # ITEM_EMB columns of a reply: the items' own, or BPMF's statistics
        self.upload_width = hyper(cfg).upload_width if self.sampler is not None else items.emb.shape[1]
        self.on_round = on_round
        self.audit = audit
        self.history: list[dict] = []  # one released row per round (and one for a final evaluation)
        self._row: dict = {"bytes_up": 0, "bytes_down": 0}  # the open round's record, see begin_round
        self._started = 0.0
        self._sent: dict[int, int] = {}  # node id -> users asked to train this round
        self.bytes_up = self.bytes_down = 0
        self.privacy = privacy
        self.epsilon = 0.0
        self.rounds_trained = 0
        self.participation = np.zeros(directory.population, np.int64)  # rounds each user took part in
        # users `fedrec forget` removed: drawn like everyone, then dropped, so the others' draws do not change
        self.excluded: np.ndarray | None = None
        self._epsilons: dict[int, float] = {}  # composition count -> epsilon; the budget check and the ledger share it

    # ---------------------------------------------------------------- privacy
    def epsilon_after(self, releases: int, participation_max: int) -> float:
        """Epsilon once `releases` rounds are out (local DP: the most active user's rounds). Every
        round is the same event, so this is one composition of `count` copies. Releases, not the
        round number: after a crash and --resume, the rounds the lost run got through count too."""
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

    # ---------------------------------------------------------------- round record
    def begin_round(self, server_round: int) -> None:
        """Open the record of a round: its row in history and metrics.csv. The train and evaluate
        steps that follow fill it in; finish_round closes it."""
        self._started = time.perf_counter()
        self._row = {"round": server_round, "users_sampled": 0, "bytes_up": 0, "bytes_down": 0}

    def finish_round(self) -> dict:
        """Close the open record: time the round, add its bytes to the run's totals, and append the
        part that may be released (released_row: a DP run keeps epsilon and evaluation metrics only)
        to history and hand it to on_round. Returns that row."""
        self._row["seconds"] = time.perf_counter() - self._started
        self.bytes_up += self._row["bytes_up"]
        self.bytes_down += self._row["bytes_down"]
        row = released_row(self._row, self.privacy is not None)
        self.history.append(row)
        if self.on_round:
            self.on_round(row)
        return row

    def final_evaluation(self, grid: Grid, config: ConfigRecord, last_round: int) -> None:
        """After a budget stop: evaluate the model as it stands (evaluation spends no budget), in a
        row of its own for `last_round`, the last round trained. Nothing to do when that round's
        row holds evaluation metrics already (a second row would repeat them)."""
        if last_round and self.history and any(is_evaluation(k) for k in self.history[-1]):
            return
        self.begin_round(last_round)
        # Asked as round cfg.rounds, which always evaluates, whatever --eval-every says.
        messages = self.configure_evaluate(self.cfg.rounds, array_record(self.items), config, grid)
        self.aggregate_evaluate(last_round, grid.send_and_receive(messages))
        self.finish_round()

    def _account(self, server_round: int) -> None:
        if self.privacy:
            self.epsilon = self.epsilon_after(self.rounds_trained, int(self.participation.max()))
            self._row["epsilon"] = self.epsilon

    # ---------------------------------------------------------------- train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The round's train messages, one per node hosting sampled users (after begin_round)."""
        self._check_budget(server_round)
        if self.sampler is not None:  # devices draw against the chain's current sample, not the mean
            arrays = array_record(self.sampler.current)
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
            self._sent[node_id] = len(node_users)
            messages.append(Message(RecordDict({schema.ARRAYS: arrays, schema.CONFIG: node_config}),
                                    dst_node_id=node_id, message_type=MessageType.TRAIN))
        self._row["bytes_down"] += record_bytes(arrays) * len(messages)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        n_items, dim = self.items.emb.shape[0], self.upload_width
        accepted: list[tuple[dict, float, Message, float]] = []  # (dense update, users, reply, its norm)
        # Under SecAgg+ the one reply is the sum of every node asked: it answers for all their users.
        secure = secure_setup(self.cfg, self.directory, n_items, dim)
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
            problem = check_train_reply(reply.content, sent, n_items, dim, self.cfg)  # before anything is read
            dense = None
            if problem is None:
                record = reply.content[schema.ARRAYS]
                dense = scatter_upload({k: record[k].numpy() for k in record.keys()}, n_items, dim)
                users = float(reply.content[schema.METRICS][schema.WEIGHT])
                norm = _norm(dense)
                problem = check_reply_norm(norm, users, self.cfg, n_items * (dim + 1) + 1, secure,
                                           len(self._sent) if secure else 1) or check_reply_peak(
                    max(float(np.abs(dense[k]).max(initial=0.0)) for k in schema.ITEM_ARRAYS), users, self.cfg,
                    n_items * (dim + 1) + 1)
                if problem is None and self.sampler is not None:
                    problem = check_statistics(dense, users, self.items.emb.shape[1], self.cfg,
                                               self.directory.rating_scale)
            if problem is not None:
                self._count("nodes_rejected", server_round, node, problem)
                continue
            self._row["bytes_up"] += record_bytes(reply.content[schema.ARRAYS])
            self._audit(server_round, reply)
            accepted.append((dense, users, reply, norm))
        self._row["nodes_replied"] = len(accepted)
        users = float(sum(a[1] for a in accepted))
        self._row["users_failed"] = max(self._asked() - users, 0)
        central = self.privacy is not None and self.privacy.mode == "central"
        rejected = self._row.get("nodes_rejected", 0)
        if not accepted and rejected and self._row.get("_non_finite", 0) == rejected:
            # Every reply came back with inf/nan: honest devices whose training blew up, not an attack.
            raise ConfigError(f"training diverged in round {server_round} (every reply held non-finite values); "
                              f"lower --server-lr ({self.cfg.server_lr}) or --lr ({self.cfg.lr})")
        if not self._enough(users):
            # Too few updates arrived to be worth a step. Nothing is released, but a DP run still
            # counts the round: epsilon then does not tell that the round was skipped.
            self._row["skipped"] = 1
            self.rounds_trained += 1
            self._account(server_round)
            return None, None
        if not accepted and not central:  # nobody was sampled (or a halted secure round): nothing to release
            self.rounds_trained += 1
            self._account(server_round)
            return None, None
        # BPMF: statistics grow with a user's ratings, so a heavy user's honest reply passes MF's norm bound
        # (red-team: 30 of 60 rounds dropped); check_statistics bounds them by what users can sum to instead
        scales = np.ones(len(accepted)) if self.sampler is not None else reply_scales(
            np.array([a[3] for a in accepted]), np.array([a[1] for a in accepted]), self.cfg, self.privacy is not None)
        total = {schema.ITEM_EMB: np.zeros((n_items, dim)), schema.ITEM_BIAS: np.zeros(n_items),
                 schema.GLOBAL_BIAS: np.zeros(1)}
        loss = rows = 0.0
        for (dense, _, reply, _), scale in zip(accepted, scales):
            for k in schema.ITEM_ARRAYS:
                total[k] += dense[k] * scale
            metrics = reply.content[schema.METRICS]
            loss += float(metrics["loss-sum"]) if "loss-sum" in metrics else 0.0  # local-DP devices do not send it
            rows += float(metrics["num-rows"]) if "num-rows" in metrics else 0.0
        self._row["replies_scaled"] = int((scales < 1).sum())
        denominator = max(users, 1.0)
        if self.privacy and self.privacy.mode == "distributed":
            denominator = float(self.privacy.sample_size)  # the devices' noise shares are in the sum already
        if central:
            # Noise on the sum of clipped updates (an empty Poisson round too: skipping it would
            # tell that nobody was sampled), then a fixed denominator: the expected number of
            # users, so that the count of participants is not released (McMahan et al., 2018).
            # OS entropy, fresh each round: neither the seed nor a checkpoint regenerates it.
            noise = private_rng("central-noise", self.cfg.seed if self.cfg.reproducible_noise else None, server_round)
            total = add_central_noise(total, self.privacy, noise)
            denominator = float(self.privacy.sample_size)
        if self.sampler is not None:  # sums, not means: they are the items' sufficient statistics
            self.sampler.step({k: torch.as_tensor(v) for k, v in total.items()}, server_round)
        else:
            self.optimizer.step({k: torch.as_tensor(v / denominator, dtype=torch.float32) for k, v in total.items()})
        if not all(torch.isfinite(t).all() for t in self.items.tensors().values()):
            if self.sampler is not None:  # no step size to lower: only a hostile reply gets the draw this far
                raise ConfigError(f"round {server_round}: the item draw overflowed (a reply far beyond honest "
                                  "statistics?); use --robust-aggregation norm-bound")
            raise ConfigError(f"training diverged in round {server_round} (non-finite item parameters); "
                              f"lower --server-lr ({self.cfg.server_lr}) or --lr ({self.cfg.lr})")
        self._row["train_loss"] = loss / max(rows, 1.0)
        self.rounds_trained += 1
        self._account(server_round)
        if self.privacy:  # what Flower logs is a release too: no loss, no head count
            return array_record(self.items), None
        return array_record(self.items), MetricRecord({"train-loss": self._row["train_loss"], "users": users})

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

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.evaluates(server_round):
            return []
        config = ConfigRecord(dict(config))
        config[schema.ROUND] = server_round
        self.directory.refresh(grid, config)
        nodes = self.directory.present_ids()
        self._row["bytes_down"] += record_bytes(arrays) * len(nodes)
        return [Message(RecordDict({schema.ARRAYS: arrays, schema.CONFIG: config}), dst_node_id=n,
                        message_type=MessageType.EVALUATE) for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
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
        return MetricRecord(metrics)
