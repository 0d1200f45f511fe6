"""Secure aggregation through Flower's SecAgg+, in process: the server gets the exact sum
(up to quantization), never one node's update, survives dropouts after key sharing, and
distributed DP puts the promised noise into that sum."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import Error, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity
from scipy import stats

from fedrec.client.app import app as client_app
from fedrec.privacy.accountant import PrivacyPlan
from fedrec.run import schema
from fedrec.run.build import make_algorithm
from fedrec.run.config import ConfigError, RunConfig
from fedrec.server.federation import array_record
from fedrec.server.runner import run_server
from fedrec.server.secagg import SecureGrid, auto_shares, secagg_setup
from fedrec.simulations.inprocess import InProcessGrid

from ..conftest import round_config

NODES = 10


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.fixture
def cfg(small_cfg):
    return dataclasses.replace(small_cfg, strategy="fedavg", server_lr=1.0, clipping_norm=0.5, users_per_round=20,
                               rounds=1, eval_every=1, secure_aggregation="secagg+")


class DroppingGrid(InProcessGrid):
    """Nodes in `drop` fail once they have shared their keys: their masked vector never comes."""

    def __init__(self, num_nodes: int, drop: set[int]):
        super().__init__(client_app, num_nodes)
        self.drop = drop

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            stage = message.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
            if stage == Stage.COLLECT_MASKED_VECTORS and message.metadata.dst_node_id in self.drop:
                message.metadata.__dict__["_message_id"] = "dropped"
                replies.append(Message(Error(code=0, reason="node killed"), reply_to=message))
            else:
                replies.extend(super().send_and_receive([message]))
        return replies


def _round_messages(cfg: RunConfig, grid: InProcessGrid, users_per_node: dict[int, list[int]], round_: int,
                    noise_share: float = 0.0) -> list[Message]:
    """One round's train messages, as Federation.configure_train builds them."""
    items = _algorithm(cfg).init_server("fedavg", 1.0).broadcast()
    messages = []
    for node, users in users_per_node.items():
        config = round_config(cfg, round_, users, noise_share)
        messages.append(Message(RecordDict({schema.ARRAYS: array_record(items), schema.CONFIG: config}),
                                dst_node_id=node, message_type=MessageType.TRAIN))
    return messages


def _users_per_node(grid: InProcessGrid) -> dict[int, list[int]]:
    population = 60
    bounds = np.linspace(0, population, NODES + 1).round().astype(int)
    return {node: list(range(bounds[i], bounds[i] + 2)) for i, node in enumerate(sorted(grid.contexts))}


def _setup(cfg, noise=0.0):
    return secagg_setup(cfg, NODES, 6, cfg.synthetic_items * (cfg.dim + 1) + 1, noise, 20, 60)


def _algorithm(cfg):
    return make_algorithm(cfg, cfg.synthetic_items, (1.0, 5.0))


def _grid(grid, cfg, setup):
    return SecureGrid(grid, cfg, setup, _algorithm(cfg).statistics())


@pytest.mark.parametrize("model", ["mf", "svdpp"])  # bpmf is refused with SecAgg+ (tests/models/test_bpmf.py)
def test_a_secure_run_trains_the_same_model_as_a_plain_one(cfg, model):
    # round 2: SVD++'s y rows are no longer 0. Seeded starting vectors on both sides (a SecAgg+ run draws
    # them from OS entropy otherwise): this compares the protocol's sum, not two random starts.
    cfg = dataclasses.replace(cfg, model=model, rounds=2, reproducible_noise=True)
    plain = run_server(InProcessGrid(client_app, 6), dataclasses.replace(cfg, secure_aggregation="none",
                                                                          out=cfg.out + "-plain"))
    secure = run_server(InProcessGrid(client_app, 6), cfg)
    step = secure.summary["secure_aggregation"]["quantization_step"]
    for name, value in plain.model.items():
        diff = abs(value - secure.model[name]).max()
        assert diff <= 6 * step + 1e-6, name  # every node rounds each coordinate by less than a step
    assert secure.summary["secure_aggregation"]["rounds_halted"] == 0


def test_the_server_never_holds_one_nodes_update(cfg):
    grid = InProcessGrid(client_app, 6)
    run_server(grid, cfg)
    train = [r for r in grid.replies if RECORD_KEY_CONFIGS in r.content.config_records]
    assert train, "no SecAgg+ traffic"
    for reply in train:  # the mod empties the arrays; what remains is protocol data
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        assert schema.ARRAYS not in reply.content.array_records


@pytest.mark.parametrize("dropped", [0, 2])
def test_nodes_killed_after_key_sharing_leave_the_exact_sum_of_the_survivors(cfg, dropped):
    cfg = dataclasses.replace(cfg, reproducible_noise=True)  # seeded starts: the plain round below trains the same
    grid = DroppingGrid(NODES, drop=set(sorted(range(1000, 1000 + NODES))[:dropped]))
    users = _users_per_node(grid)
    secure = _grid(grid, cfg, _setup(cfg))
    (reply,) = secure.send_and_receive(_round_messages(cfg, grid, users, 1))
    # The same round, in the clear, from fresh nodes, for the survivors only.
    plain = InProcessGrid(client_app, NODES)
    survivors = {n: u for n, u in users.items() if n not in grid.drop}
    names = list(_algorithm(cfg).statistics())
    expected = {k: 0.0 for k in names}
    for r in plain.send_and_receive(_round_messages(dataclasses.replace(cfg, secure_aggregation="none"), plain,
                                                    survivors, 1)):
        for k in names:
            expected[k] = expected[k] + r.content[schema.ARRAYS][k].numpy().astype(np.float64)
    step = _setup(cfg).step
    for k in names:
        np.testing.assert_allclose(reply.content[schema.ARRAYS][k].numpy(), expected[k], rtol=0,
                                   atol=len(survivors) * step + 1e-6)
    assert reply.content[schema.METRICS][schema.WEIGHT] == 2 * len(survivors)
    assert secure.survivors == [len(survivors)]


def test_a_round_with_too_few_survivors_is_not_unmasked(cfg):
    cfg = dataclasses.replace(cfg, secagg_shares=0.99, secagg_min_fraction=0.9)  # every node shares with all
    grid = DroppingGrid(NODES, drop={1000, 1001})
    secure = _grid(grid, cfg, _setup(cfg))  # min users: 0.9 x 20 expected = 18; 16 arrive
    assert secure.send_and_receive(_round_messages(cfg, grid, _users_per_node(grid), 1)) == []
    assert "arrived" in secure.halted[0]


def test_distributed_dp_puts_the_promised_noise_into_the_sum(cfg):
    """Same users, same starting point, two rounds with fresh noise shares: the difference of
    the two unmasked sums is pure noise with std sqrt(2 x users) x share (chi-square, 1e-6)."""
    cfg = dataclasses.replace(cfg, dp="distributed", noise_multiplier=1.0, reproducible_noise=True)
    share = 0.3
    sums = []
    for round_ in (1, 2):  # reproducible mode: the round keys the noise, everything else repeats
        grid = InProcessGrid(client_app, NODES)
        (reply,) = _grid(grid, cfg, _setup(cfg)).send_and_receive(
            _round_messages(cfg, grid, _users_per_node(grid), round_, noise_share=share))
        record = reply.content[schema.ARRAYS]
        sums.append(np.concatenate([record[k].numpy().ravel() for k in record.keys()]))
    users = 2 * NODES
    diff = (sums[0] - sums[1]).astype(np.float64)
    statistic = (diff**2).sum() / (2 * users * share**2)
    n = len(diff)
    assert stats.chi2.ppf(0.5e-6, n) < statistic < stats.chi2.ppf(1 - 0.5e-6, n)


def test_distributed_dp_shares_are_sized_for_the_least_accepted_survivors(cfg):
    cfg = dataclasses.replace(cfg, dp="distributed", noise_multiplier=1.2)
    setup = _setup(cfg, noise=1.2)
    assert setup.min_users == 16  # 0.8 of the 20 expected
    assert setup.noise_share_std == pytest.approx(1.2 * setup.sensitivity / np.sqrt(16))
    assert cfg.clipping_norm < setup.sensitivity < cfg.clipping_norm * 1.001  # quantization, accounted


@pytest.mark.parametrize("settings,message", [
    (dict(dp="distributed", noise_multiplier=1.0, clipping_norm=0.1), "needs --secure-aggregation"),
    (dict(secure_aggregation="secagg+", clipping_norm=0.1, update_mode="sparse"), "dense"),
    (dict(secure_aggregation="secagg+"), "clipping-norm"),
    (dict(secure_aggregation="secagg+", clipping_norm=0.1, secagg_shares=2.0), "secagg-shares"),
])
def test_settings_secure_aggregation_cannot_honour_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**settings).validate()


def test_a_run_whose_every_round_halts_says_why(cfg):
    grid = DroppingGrid(NODES, drop={1000})
    with pytest.raises(ConfigError, match="every SecAgg\\+ round was halted.*arrived"):
        run_server(grid, dataclasses.replace(cfg, users_per_round=0, secagg_shares=0.99, secagg_min_fraction=1.0,
                                             rounds=2, eval_every=2))


def test_secure_aggregation_needs_two_nodes(cfg):
    with pytest.raises(ConfigError, match="at least 2 SuperNodes"):
        run_server(InProcessGrid(client_app, 1), cfg)


def test_against_the_server_distributed_dp_gets_no_amplification(cfg):
    """The server chose who took part: its epsilon composes the rounds a user was in, without
    sampling amplification, and is reported apart from the release readers' epsilon."""
    cfg = dataclasses.replace(cfg, dp="distributed", noise_multiplier=1.0, rounds=3, eval_every=3, sampling="poisson",
                              secagg_min_fraction=0.5)
    privacy = run_server(InProcessGrid(client_app, 6), cfg).summary["privacy"]
    plan = PrivacyPlan("local", 1.0, privacy["clipping_norm"], "poisson", 20, 60, cfg.target_delta, "rdp",
                       max_rounds=privacy["max_rounds_per_user"])
    assert privacy["epsilon_against_server_at_cap"] == pytest.approx(plan.epsilon(plan.max_rounds))
    assert privacy["epsilon_against_server"] > privacy["epsilon"]  # amplification only hides from readers
    assert "no amplification" in privacy["guarantee"]


def test_the_noise_share_and_sensitivity_solve_the_range_equations_exactly(cfg):
    cfg = dataclasses.replace(cfg, dp="distributed", noise_multiplier=3.0)
    setup = secagg_setup(cfg, 2, 50_000, 5_000 * 33 + 1, 3.0, 10_000, 100_000)
    coords = 5_000 * 33 + 2
    assert setup.noise_share_std == pytest.approx(3.0 * setup.sensitivity / np.sqrt(setup.min_users))
    assert setup.sensitivity == pytest.approx(cfg.clipping_norm + 2 * setup.step * np.sqrt(coords))
    assert setup.clip_range >= setup.max_sampled * cfg.clipping_norm + 8 * setup.noise_share_std * np.sqrt(
        setup.max_sampled)
    with pytest.raises(ConfigError, match="quantization"):
        secagg_setup(cfg, 60_000, 1, 200_000 * 65 + 1, 50.0, 2, 60_000)


def test_auto_shares_grow_with_the_log_of_the_nodes():
    assert [auto_shares(n) for n in (3, 4, 10, 50, 200, 1000)] == [1.0, 1.0, 9, 13, 17, 21]
