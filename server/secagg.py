"""Secure aggregation with Flower's SecAgg+ (Bell et al. 2020): the server learns only the sum.

Flower 1.42 ships SecAgg+ only for the legacy API: `SecAggPlusWorkflow` runs under a
`LegacyContext` and asks a legacy `Strategy` for FitIns and hands it the unmasked result.
fedrec's strategy is a Message-API strategy, so instead of writing the round loop twice,
`SecureGrid` wraps the Grid: when the strategy sends its train messages, the grid runs the
SecAgg+ protocol with those very messages (as FitIns) and hands back one reply holding the
unmasked sum. Everything fedrec does with a sum (noise, the expected-count denominator,
the server optimizer, the privacy ledger) stays in FedRecStrategy.aggregate_train, the
same code for both paths. The protocol, its crypto and its dropout recovery are Flower's.

The sum arrives averaged over the surviving nodes (each node weighs 1), so it is
multiplied back by their number; the count of users trained travels inside the masked
vector (scaled by C to share the quantization range), so no per-node count is seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedrec.privacy.secagg import COUNT, MODULUS, SecAggSetup, SecAggSizeError, secure_order
from fedrec.privacy.secagg import secagg_setup as sizing
from fedrec.run import schema
from fedrec.run.config import ConfigError, RunConfig


def secagg_setup(cfg: RunConfig, num_nodes: int, max_users_per_node: int, coords: int, noise_multiplier: float,
                 expected_users: int, population: int) -> SecAggSetup:
    """The run's SecAgg+ sizing (fedrec.privacy.secagg), as a one-line ConfigError where it cannot be met."""
    try:
        return sizing(cfg.clipping_norm, cfg.secagg_min_fraction, num_nodes, max_users_per_node, coords,
                      noise_multiplier if cfg.dp == "distributed" else 0.0, expected_users, population)
    except SecAggSizeError as error:
        raise ConfigError(str(error)) from None


class _SumStrategy(Strategy):
    """The legacy interface SecAggPlusWorkflow needs, and nothing else: it hands out the
    FitIns fedrec's strategy built and keeps the unmasked result."""

    def __init__(self, fitins: dict[int, FitIns], proxies: dict[int, ClientProxy]):
        self.fitins, self.proxies = fitins, proxies
        self.result: tuple[Parameters, int] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(self.proxies[node], ins) for node, ins in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):
        if results:
            self.result = (results[0][1].parameters, len(results))
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+, halted before unmasking when too few sampled users' updates
    arrived: distributed DP's noise shares add up to the promised noise only above that."""

    users_on: dict[int, int] = {}
    min_users: int = 1
    halted: str = ""

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        if not super().collect_masked_vectors_stage(grid, context, state):
            return False
        arrived = sum(self.users_on.get(n, 0) for n in state.active_node_ids)
        if arrived < self.min_users:
            self.halted = f"only {arrived} of the round's sampled users arrived (at least {self.min_users} needed)"
            return False
        return True


def auto_shares(nodes: int) -> int | float:
    """SecAgg+'s point: each node masks with O(log n) neighbours, not all n (which is SecAgg,
    quadratic in the nodes). 2 log2(n) + 1, odd as Flower wants; everyone (1.0) when that
    is not fewer than the nodes."""
    shares = 2 * math.ceil(math.log2(max(nodes, 2))) + 1
    return shares if shares < nodes else 1.0


def _count(value: float | int) -> float | int:
    """Flower reads an int as a count and a float as a share."""
    return int(value) if value >= 2 else float(value)


class SecureGrid(Grid):
    """A Grid whose train round is a SecAgg+ round; everything else passes through."""

    def __init__(self, grid: Grid, cfg: RunConfig, setup: SecAggSetup, statistics: dict):
        self.inner = grid
        self.order = secure_order(statistics)  # the masked vector's arrays, as the devices build it
        self.context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
        self.clip_norm = cfg.clipping_norm
        self.auto_shares = cfg.secagg_shares == 0
        self.workflow = _Workflow(1.0 if self.auto_shares else _count(cfg.secagg_shares), _count(cfg.secagg_threshold),
                                  max_weight=1.0,
                                  clipping_range=setup.clip_range, quantization_range=setup.levels,
                                  modulus_range=MODULUS, timeout=cfg.secagg_timeout or None)
        self.workflow.min_users = setup.min_users
        self.max_sampled = setup.max_sampled
        self.rounds = 0
        self.survivors: list[int] = []  # nodes whose masked vectors entered each round's sum
        self.halted: list[str] = []  # why rounds were not unmasked

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return self.inner.send_and_receive(messages, timeout=timeout)
        reply = self._secure_round(messages)
        return [] if reply is None else [reply]

    def _secure_round(self, messages: list[Message]) -> Message | None:
        self.rounds += 1
        fitins, proxies = {}, {}
        for m in messages:
            node = m.metadata.dst_node_id
            arrays = m.content[schema.ARRAYS]
            names = list(arrays.keys())
            params = ndarrays_to_parameters([arrays[k].numpy() for k in names])
            fitins[node] = FitIns(params, {**dict(m.content[schema.CONFIG]), schema.SHARED_NAMES: names})
            proxies[node] = GridClientProxy(node, self.inner, self.context.run_id)
        self.workflow.users_on = {m.metadata.dst_node_id: len(m.content[schema.CONFIG][schema.USERS]) for m in messages}
        if max(self.workflow.users_on.values()) > self.max_sampled:  # ~1e-9 per round by construction
            raise RuntimeError(f"a node was sampled {max(self.workflow.users_on.values())} users, more than the "
                               f"{self.max_sampled} the SecAgg+ range was sized for")
        self.workflow.halted = ""
        if self.auto_shares:
            self.workflow.num_shares = auto_shares(len(messages))
        strategy = _SumStrategy(fitins, proxies)
        manager = SimpleClientManager()
        for proxy in proxies.values():
            manager.register(proxy)
        legacy = LegacyContext(self.context, ServerConfig(num_rounds=1), strategy, manager)
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: self.rounds})
        legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        self.workflow(self.inner, legacy)
        if strategy.result is None:  # nothing was unmasked: the round releases nothing
            why = self.workflow.halted or "fewer nodes answered than the reconstruction threshold needs"
            self.halted.append(why)
            log(WARNING, "SecAgg+ round %s halted: %s", self.rounds, why)
            return None
        parameters, survivors = strategy.result
        self.survivors.append(survivors)
        vectors = [v * survivors for v in parameters_to_ndarrays(parameters)]  # mean over nodes -> sum
        arrays = dict(zip(self.order, vectors))
        users = float(np.rint(arrays.pop(COUNT).sum() / self.clip_norm))
        content = RecordDict({
            schema.ARRAYS: ArrayRecord({k: Array(v.astype(np.float32)) for k, v in arrays.items()}),
            schema.METRICS: MetricRecord({schema.WEIGHT: users}),
        })
        return Message(content, reply_to=messages[0])  # the sum, as if one node had sent it

    # The rest of the Grid interface: the inner grid's.
    def get_node_ids(self):
        return self.inner.get_node_ids()

    def set_run(self, run_id):
        return self.inner.set_run(run_id)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, *args, **kwargs):
        return self.inner.create_message(*args, **kwargs)

    def push_messages(self, messages):
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.inner.pull_messages(message_ids)


def secure_summary(cfg: RunConfig, setup: SecAggSetup, grid: SecureGrid) -> dict:
    """What summary.json says about the protocol and its trust model."""
    return {
        "protocol": "SecAgg+ (Flower's SecAggPlusWorkflow and secaggplus_mod)",
        "shares": cfg.secagg_shares, "threshold": cfg.secagg_threshold, "clip_range": setup.clip_range,
        "quantization_levels": setup.levels, "quantization_step": setup.step,
        "sensitivity_with_quantization": setup.sensitivity, "clipping_norm": cfg.clipping_norm,
        "min_users_to_unmask": setup.min_users, "noise_share_std": setup.noise_share_std,
        "rounds_halted": len(grid.halted),
        "trust_model": {
            "server": "honest but curious: sees each node's masked vector and the unmasked sum of the nodes "
                      "that survived, never one node's update" + (
                          "; a node hosting a cohort is one participant, so masking hides the cohort's sum, "
                          "not each user's" if cfg.users_per_node != 1 else ""),
            "other devices": "learn nothing from the protocol unless at least `threshold` of a node's neighbours "
                             "collude with the server",
            "release readers": "see what the DP mode covers (summary.json privacy)",
            "assumptions": "the server follows the protocol (it could otherwise drop honest nodes to isolate one); "
                           "Flower's masks come from 32-bit seeds expanded with NumPy's Mersenne Twister",
        },
    }
