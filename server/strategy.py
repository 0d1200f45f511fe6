"""The fedrec strategy: user-level sampling, summed item updates, server optimizer.

Built on Flower's FedAvg for the round loop (`start`), message construction, reply
validation and logging. What it changes, and why:
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

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedrec.common import schema
from fedrec.common.config import ConfigError, RunConfig
from fedrec.models import ItemParams, ServerOptimizer, finish
from fedrec.models.randomness import private_rng
from fedrec.models.upload import scatter_upload

from .directory import NodeDirectory
from .privacy import PrivacyPlan, add_central_noise
from .releases import released_row
from .sampling import sample_users, sampling_rng


class BudgetExhausted(RuntimeError):
    """The next round would spend more than the privacy budget."""


def array_record(items: ItemParams) -> ArrayRecord:
    return ArrayRecord({k: Array(v.copy()) for k, v in items.numpy().items()})


def record_bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


class FedRecStrategy(FedAvg):
    def __init__(self, cfg: RunConfig, directory: NodeDirectory, items: ItemParams,
                 on_round: Callable[[dict], None] | None = None, audit: Callable[[dict], None] | None = None,
                 privacy: PrivacyPlan | None = None):
        n_nodes = len(directory.node_ids)
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                         min_available_nodes=n_nodes, weighted_by_key=schema.WEIGHT)
        self.cfg = cfg
        self.directory = directory
        self.items = items
        self.optimizer = ServerOptimizer(items, cfg.strategy, cfg.server_lr)
        self.on_round = on_round
        self.audit = audit
        self.history: list[dict] = []
        self._row: dict = {"bytes_up": 0, "bytes_down": 0}
        self._started = 0.0
        self.bytes_up = self.bytes_down = 0
        self.privacy = privacy
        self.epsilon = 0.0
        self.rounds_trained = 0
        self.participation = np.zeros(directory.population, np.int64)  # rounds each user took part in
        # Central DP noise: OS entropy, so neither the seed nor anything else written down regenerates it.
        self._noise = private_rng("central-noise", cfg.seed if cfg.reproducible_noise else None)
        self._epsilons: dict[int, float] = {}  # composition count -> epsilon; the budget check and the ledger share it

    # ---------------------------------------------------------------- privacy
    def _spent_after(self, server_round: int, participation_max: int) -> float:
        """Epsilon once `server_round` rounds are released (local DP: the most active user's rounds).
        Every round is the same event, so this is one composition of `count` copies."""
        count = min(participation_max, self.privacy.max_rounds) if self.privacy.mode == "local" else server_round
        if count not in self._epsilons:
            self._epsilons[count] = self.privacy.epsilon(count)
        return self._epsilons[count]

    def _check_budget(self, server_round: int) -> None:
        target = self.cfg.target_epsilon
        if not self.privacy or target <= 0:
            return
        upcoming = self._spent_after(server_round, int(self.participation.max()) + 1)
        if upcoming > target * (1 + 1e-6):
            raise BudgetExhausted(f"round {server_round} would spend epsilon {upcoming:.3f} beyond the target {target}")

    def _account(self, server_round: int) -> None:
        if self.privacy:
            self.epsilon = self._spent_after(server_round, int(self.participation.max()))
            self._row["epsilon"] = self.epsilon

    # ---------------------------------------------------------------- train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._started = time.perf_counter()
        self._check_budget(server_round)
        eligible = None
        if self.privacy and self.privacy.max_rounds:  # local/distributed: devices refuse past their cap anyway
            eligible = self.participation < self.privacy.max_rounds
        users = sample_users(self.directory.population, self.cfg.users_per_round, self.cfg.sampling,
                             sampling_rng(self.cfg, server_round), eligible)
        self.participation[users] += 1
        self._row = {"round": server_round, "users_sampled": len(users), "bytes_up": 0, "bytes_down": 0}
        messages = []
        for node_id, node_users in self.directory.group(users).items():
            node_config = ConfigRecord(dict(config))
            node_config[schema.ROUND] = server_round
            node_config[schema.USERS] = [int(u) for u in node_users]
            messages.append(Message(RecordDict({schema.ARRAYS: arrays, schema.CONFIG: node_config}),
                                    dst_node_id=node_id, message_type=MessageType.TRAIN))
        self._row["bytes_down"] += record_bytes(arrays) * len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, errors = self._check_and_log_replies(list(replies), is_train=True)
        if errors:
            raise RuntimeError(f"round {server_round}: {len(errors)} node(s) failed: {errors[0].error.reason}")
        central = self.privacy is not None and self.privacy.mode == "central"
        if not valid and not central:  # nobody replied (or a halted secure round): nothing to release
            self.rounds_trained += 1
            self._account(server_round)
            return None, None
        n_items, dim = self.items.emb.shape
        total = {schema.ITEM_EMB: np.zeros((n_items, dim)), schema.ITEM_BIAS: np.zeros(n_items),
                 schema.GLOBAL_BIAS: np.zeros(1)}
        users = loss = rows = 0.0
        for reply in valid:
            record = reply.content[schema.ARRAYS]
            self._row["bytes_up"] += record_bytes(record)
            self._audit(server_round, reply)
            dense = scatter_upload({k: record[k].numpy() for k in record.keys()}, n_items, dim)
            for k in schema.ITEM_ARRAYS:
                total[k] += dense[k]
            metrics = reply.content[schema.METRICS]
            users += metrics[schema.WEIGHT]
            loss += metrics["loss-sum"] if "loss-sum" in metrics else 0.0  # local-DP devices do not send it
            rows += metrics["num-rows"] if "num-rows" in metrics else 0.0
        denominator = max(users, 1.0)
        if self.privacy and self.privacy.mode == "distributed":
            denominator = float(self.privacy.sample_size)  # the devices' noise shares are in the sum already
        if central:
            # Noise on the sum of clipped updates (an empty Poisson round too: skipping it would
            # tell that nobody was sampled), then a fixed denominator: the expected number of
            # users, so that the count of participants is not released (McMahan et al., 2018).
            total = add_central_noise(total, self.privacy, self._noise)
            denominator = float(self.privacy.sample_size)
        self.optimizer.step({k: torch.as_tensor(v / denominator, dtype=torch.float32) for k, v in total.items()})
        if not all(torch.isfinite(t).all() for t in self.items.tensors().values()):
            raise ConfigError(f"training diverged in round {server_round} (non-finite item parameters); "
                              f"lower --server-lr ({self.cfg.server_lr}) or --lr ({self.cfg.lr})")
        self._row["train_loss"] = loss / max(rows, 1.0)
        self.rounds_trained += 1
        self._account(server_round)
        if self.privacy:  # what Flower logs is a release too: no loss, no head count
            return array_record(self.items), None
        return array_record(self.items), MetricRecord({"train-loss": self._row["train_loss"], "users": users})

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

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if not self.evaluates(server_round):
            return []
        config = ConfigRecord(dict(config))
        config[schema.ROUND] = server_round
        nodes = [int(n) for n in self.directory.node_ids]
        self._row["bytes_down"] += record_bytes(arrays) * len(nodes)
        return [Message(RecordDict({schema.ARRAYS: arrays, schema.CONFIG: config}), dst_node_id=n,
                        message_type=MessageType.EVALUATE) for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        result = None
        if replies:
            valid, errors = self._check_and_log_replies(replies, is_train=False)
            if errors:
                raise RuntimeError(f"evaluation in round {server_round} failed: {errors[0].error.reason}")
            sums: dict[str, float] = {}
            for reply in valid:
                for key in schema.EVAL_SUMS:
                    sums[key] = sums.get(key, 0.0) + float(reply.content[schema.METRICS][key])
            metrics = finish(sums, self.cfg.top_k)
            self._row.update(metrics)
            result = MetricRecord(metrics)
        self._close_row()
        return result

    def _close_row(self) -> None:
        self._row["seconds"] = time.perf_counter() - self._started
        self.bytes_up += self._row["bytes_up"]
        self.bytes_down += self._row["bytes_down"]
        row = released_row(self._row, self.privacy is not None)
        self.history.append(row)
        if self.on_round:
            self.on_round(row)
