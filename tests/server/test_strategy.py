"""The federation's round (server/federation.py) on mock replies with known answers, and user-level sampling."""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedrec.models.defaults import Hyper
from fedrec.models.mf import MF
from fedrec.models.randomness import seeded_rng
from fedrec.run import schema
from fedrec.run.config import RunConfig
from fedrec.server.directory import NodeDirectory
from fedrec.server.federation import Federation
from fedrec.server.sampling import sample_users, sampling_rng

N_ITEMS, DIM = 6, 2


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _directory():
    return NodeDirectory(np.array([11, 22, 33], dtype=np.uint64), np.array([0, 4, 8]), np.array([4, 4, 2]),
                         population=10, num_items=N_ITEMS, rating_scale=(1.0, 5.0))


_GRID = Mock(get_node_ids=Mock(return_value=[11, 22, 33]))


def _reply(node, users, value, loss=1.0):
    arrays = ArrayRecord({"item-emb": Array(np.full((N_ITEMS, DIM), value, np.float32)),
                          "item-bias": Array(np.full((N_ITEMS, 1), value, np.float32)),
                          "global-bias": Array(np.full(1, value, np.float32))})
    metrics = MetricRecord({schema.WEIGHT: users, "loss-sum": loss, "num-rows": 10 * users})
    reply = Mock(spec=Message)
    reply.has_error.return_value = False
    reply.content = RecordDict({schema.ARRAYS: arrays, schema.METRICS: metrics})
    reply.metadata.src_node_id = node
    return reply


def _strategy(**cfg):
    run = RunConfig(**cfg)
    mf = MF(Hyper(dim=DIM), N_ITEMS, (1.0, 5.0))
    audit = []
    strategy = Federation(run, mf, mf.init_server(run.strategy, run.server_lr), _directory(), audit=audit.append)
    strategy._sent = {11: 4, 22: 4, 33: 2}  # as if every user had been asked to train: replies may count them
    return strategy, strategy.state.params, audit


def test_fedavg_weighs_every_user_equally_across_nodes():
    strategy, items, audit = _strategy(strategy="fedavg", server_lr=1.0)
    before = items["item-emb"].clone()
    strategy.begin_round(1)
    # Node 11 sums 1 user's change (2.0), node 22 sums 3 users' changes (6.0): mean per user 2.0.
    assert strategy.aggregate_train(1, [_reply(11, 1, 2.0, loss=4.0), _reply(22, 3, 6.0, loss=8.0)])
    model = strategy.state.model()
    np.testing.assert_allclose(model["item-emb"], before.numpy() + 2.0, rtol=1e-6)
    np.testing.assert_allclose(model["global-bias"], [5.0], rtol=1e-6)
    assert strategy._row["train_loss"] == pytest.approx(12.0 / 40)
    assert [line["node"] for line in audit] == [11, 22]
    assert audit[0]["arrays"]["item-emb"]["shape"] == [N_ITEMS, DIM]


def test_fedadam_moves_rare_and_popular_rows_alike():
    strategy, items, _ = _strategy(strategy="fedadam", server_lr=0.1)
    before = items["item-emb"].clone()
    reply = _reply(11, 1, 0.0)
    delta = np.zeros((N_ITEMS, DIM), np.float32)
    delta[0], delta[1] = 1.0, 1e-3  # a popular row and a rarely rated one
    reply.content[schema.ARRAYS]["item-emb"] = Array(delta)
    strategy.begin_round(1)
    strategy.aggregate_train(1, [reply])
    step = (items["item-emb"] - before).numpy()
    np.testing.assert_allclose(step[0], step[1], rtol=1e-3)  # same first step despite 1000x smaller change
    assert np.abs(step[2:]).max() == 0


def test_configure_train_sends_each_node_its_sampled_users():
    strategy, items, _ = _strategy(users_per_round=5, seed=4)
    strategy.begin_round(3)
    messages = strategy.configure_train(3, ConfigRecord({"dim": DIM}), grid=_GRID)
    # Without DP, who is sampled is the run seed's "sampling" stream for the round.
    sampled = sample_users(10, 5, "fixed", seeded_rng(4, "sampling", 3))
    np.testing.assert_array_equal(sampled, sample_users(10, 5, "fixed", sampling_rng(RunConfig(seed=4), 3)))
    got = {}
    for m in messages:
        users = list(m.content[schema.CONFIG][schema.USERS])
        node = int(m.metadata.dst_node_id)
        lo, hi = {11: (0, 4), 22: (4, 8), 33: (8, 10)}[node]
        assert all(lo <= u < hi for u in users)
        assert m.content[schema.CONFIG][schema.ROUND] == 3
        got[node] = users
    assert sorted(u for us in got.values() for u in us) == sampled.tolist()


def test_sampling_is_seeded_and_user_level():
    def rng(seed, round_):
        return seeded_rng(seed, "sampling", round_)

    a = sample_users(1000, 100, "fixed", rng(1, 5))
    assert len(a) == 100 and len(set(a.tolist())) == 100
    np.testing.assert_array_equal(a, sample_users(1000, 100, "fixed", rng(1, 5)))
    assert not np.array_equal(a, sample_users(1000, 100, "fixed", rng(1, 6)))
    sizes = [len(sample_users(1000, 100, "poisson", rng(1, r))) for r in range(200)]
    assert 95 < np.mean(sizes) < 105 and np.std(sizes) > 3  # binomial(1000, 0.1): std 9.5
    np.testing.assert_array_equal(sample_users(50, 0, "fixed", rng(0, 1)), np.arange(50))


@pytest.mark.parametrize("method", ["fixed", "poisson"])
def test_ineligible_users_are_dropped_and_nobody_else_changes(method):
    # Capped users are drawn and then removed, so the others' chances are those of the full draw.
    eligible = np.arange(1000) % 3 != 0
    full = sample_users(1000, 100, method, seeded_rng(1, "sampling", 5))
    kept = sample_users(1000, 100, method, seeded_rng(1, "sampling", 5), eligible)
    np.testing.assert_array_equal(kept, full[eligible[full]])
    assert 0 < len(kept) < len(full)
    everyone = sample_users(50, 0, method, seeded_rng(0, "sampling", 1), eligible[:50])
    np.testing.assert_array_equal(everyone, np.flatnonzero(eligible[:50]))


def test_evaluation_only_every_few_rounds_and_at_the_end():
    strategy, items, _ = _strategy(rounds=7, eval_every=3)
    due = [r for r in range(1, 8) if strategy.configure_evaluate(r, ConfigRecord(), _GRID)]
    assert due == [3, 6, 7]


def _eval_replies():
    replies = []
    for node, (sse, n) in {11: (4.0, 4), 22: (12.0, 12)}.items():
        reply = Mock(spec=Message)
        reply.has_error.return_value = False
        reply.metadata.src_node_id = node
        sums = {k: 0.0 for k in schema.EVAL_SUMS} | {"sse": sse, "sae": sse, "num-ratings": n}
        reply.content = RecordDict({schema.METRICS: MetricRecord({schema.WEIGHT: 1, **sums})})
        replies.append(reply)
    return replies


def test_evaluation_sums_become_metrics():
    strategy, _, _ = _strategy()
    strategy.begin_round(1)
    metrics = strategy.aggregate_evaluate(1, _eval_replies())
    assert metrics["rmse"] == pytest.approx(1.0) and metrics["mae"] == pytest.approx(1.0)


def test_a_round_record_is_released_when_the_round_finishes():
    rows = []
    strategy, items, _ = _strategy(users_per_round=5, seed=4)
    strategy.on_round = rows.append
    strategy.begin_round(1)
    messages = strategy.configure_train(1, ConfigRecord({"dim": DIM}), grid=_GRID)
    strategy.aggregate_train(1, [_reply(int(m.metadata.dst_node_id), 1, 0.1) for m in messages[:1]])
    assert strategy.history == []  # still open: evaluation may add to it
    strategy.aggregate_evaluate(1, _eval_replies())
    row = strategy.finish_round()
    assert rows == strategy.history == [row]
    assert row["round"] == 1 and row["users_sampled"] == 5 and row["rmse"] == pytest.approx(1.0)
    assert strategy.bytes_down == row["bytes_down"] > 0 and strategy.bytes_up == row["bytes_up"] > 0


def test_final_evaluation_adds_a_row_only_when_the_last_round_did_not_evaluate():
    strategy, _, _ = _strategy(rounds=10, eval_every=5)
    grid = Mock(get_node_ids=Mock(return_value=[11, 22, 33]), send_and_receive=Mock(return_value=_eval_replies()))
    strategy.history = [{"round": 1, "users_sampled": 4}, {"round": 2, "users_sampled": 4}]
    strategy.final_evaluation(grid, ConfigRecord(), last_round=2)
    assert [r["round"] for r in strategy.history] == [1, 2, 2]
    assert strategy.history[-1]["users_sampled"] == 0 and strategy.history[-1]["rmse"] == pytest.approx(1.0)
    sent = grid.send_and_receive.call_args[0][0]
    assert len(sent) == 3 and all(m.content[schema.CONFIG][schema.ROUND] == 10 for m in sent)  # always due
    strategy.final_evaluation(grid, ConfigRecord(), last_round=2)  # the last row holds metrics now
    assert len(strategy.history) == 3 and grid.send_and_receive.call_count == 1
