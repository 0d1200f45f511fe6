"""Recency re-scoring on the device (models/recency.py): the score it defines, a user's own rows and
timestamps alone behind it, shards carrying the timestamps, federated = central with it on, and
no timestamp in anything a device sends."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedrec.client.app import app as client_app
from fedrec.datasets import DataError, cohort
from fedrec.datasets.shards import node_name, open_shard
from fedrec.models.defaults import Hyper
from fedrec.models.factors import ItemParams, Users, evaluate_view, init_items, predict, seeded_vectors
from fedrec.models.recency import Recency, latest_items, with_recency
from fedrec.privacy.device import device_step, new_users
from fedrec.privacy.policy import DevicePolicy
from fedrec.run import schema
from fedrec.run.build import ensure_shards, hyper, load_data, make_algorithm
from fedrec.run.config import RunConfig, ignored_settings
from fedrec.server.runner import run_server
from fedrec.simulations.central import run_central
from fedrec.simulations.inprocess import InProcessGrid

from ..conftest import round_config


@pytest.fixture
def loo_cfg(small_cfg) -> RunConfig:
    return dataclasses.replace(small_cfg, split="loo", negatives=20).resolved()


def _model(cfg: RunConfig, users: int, seed: int = 1) -> tuple[ItemParams, Users]:
    h = dataclasses.replace(hyper(cfg), seed=seed)
    items = init_items(load_data(cfg).n_items, h.dim, h.init_std, seed, 0.0)
    items.bias.copy_(torch.randn(len(items.bias), generator=torch.Generator().manual_seed(seed)))
    return items, Users(seeded_vectors(np.arange(users), users, h.dim, h.init_std, seed), torch.zeros(users))


def _take(users: Users, index) -> Users:
    return Users(users.emb[torch.as_tensor(index)], users.bias[torch.as_tensor(index)])


def evaluate_rows(items: ItemParams, users: Users, rows, implicit: bool, recency: Recency | None = None):
    """Metric sums as a device scores them (MF.evaluate), with the recency term only when given."""
    if recency is not None:
        items, users = with_recency(items, users, rows, recency)
    return evaluate_view(items, users, rows, implicit, 10, (1.0, 5.0))


def _by_hand(items: ItemParams, state: Users, rows, user: int, item: torch.Tensor, r: Recency) -> torch.Tensor:
    """The score as models/recency.py defines it, one user at a time with a Python sort."""
    mine = np.flatnonzero(rows.train_segment == user)
    order = sorted(mine, key=lambda j: -int(rows.train_time[j]))[:r.items]  # sorted() is stable too
    unit = items.emb / items.emb.norm(dim=1, keepdim=True)
    weights = torch.tensor([r.decay ** k for k in range(len(order))])
    profile = (unit[torch.as_tensor(rows.train_item[order])] * weights[:, None]).sum(0) / weights.sum()
    seg = torch.full((len(item),), user)
    return predict(items, state, seg, item) + r.weight * unit[item] @ profile


def test_the_score_is_mf_plus_weight_times_the_recent_profile_match(loo_cfg):
    rows = cohort(load_data(loo_cfg), np.arange(12))
    items, state = _model(loo_cfg, 12)
    r = Recency(items=3, decay=0.5, weight=4.0)
    view_items, view_state = with_recency(items, state, rows, r)
    for user in range(12):
        item = torch.arange(items.emb.shape[0])
        torch.testing.assert_close(predict(view_items, view_state, torch.full_like(item, user), item),
                                   _by_hand(items, state, rows, user, item, r), rtol=1e-5, atol=1e-5)


def test_weight_0_gives_todays_scores_exactly(loo_cfg):
    rows = cohort(load_data(loo_cfg), np.arange(20))
    items, state = _model(loo_cfg, 20)
    off = Recency(weight=0.0)
    assert with_recency(items, state, rows, off) == (items, state)
    today = evaluate_rows(items, state, rows, True)
    assert evaluate_rows(items, state, rows, True, recency=off) == today
    assert evaluate_rows(items, state, rows, True, recency=Recency()) != today  # on, it does change the scores


def test_latest_items_are_by_the_users_own_timestamps_with_stable_ties():
    segment = np.array([0, 0, 0, 0, 1, 1])
    item = np.array([10, 11, 12, 13, 20, 21])
    time_ = np.array([5, 9, 9, 1, 3, 4])
    np.testing.assert_array_equal(latest_items(segment, item, time_, 3, 3),
                                  [[11, 12, 10], [21, 20, -1], [-1, -1, -1]])  # equal times: row order


def test_a_users_profile_depends_only_on_its_own_rows_and_timestamps(loo_cfg):
    split = load_data(loo_cfg)
    items, state = _model(loo_cfg, split.n_users)
    rows = cohort(split, np.arange(split.n_users))
    others = rows.train_segment != 7
    shuffled = dataclasses.replace(rows, train_time=np.where(others, np.random.default_rng(0).permutation(
        rows.train_time), rows.train_time))
    alone = cohort(split, [7])
    _, in_batch = with_recency(items, state, rows, Recency())
    _, with_others_shuffled = with_recency(items, state, shuffled, Recency())
    _, by_itself = with_recency(items, _take(state, [7]), alone, Recency())
    torch.testing.assert_close(in_batch.emb[7], by_itself.emb[0])
    torch.testing.assert_close(in_batch.emb[7], with_others_shuffled.emb[7])
    on = Recency()
    together = evaluate_rows(items, _take(state, [3, 7]), rows.subset(np.array([3, 7])), True, recency=on)
    apart = [evaluate_rows(items, _take(state, [u]), cohort(split, [u]), True, recency=on) for u in (3, 7)]
    assert together == pytest.approx({k: apart[0][k] + apart[1][k] for k in together})


def test_the_latest_item_gets_the_largest_boost(loo_cfg):
    rows = cohort(load_data(loo_cfg), [4])
    items, state = _model(loo_cfg, 1)
    every = torch.arange(items.emb.shape[0])
    seg = torch.zeros_like(every)
    before = predict(items, state, seg, every)

    def boost(train_time):
        view = with_recency(items, state, dataclasses.replace(rows, train_time=train_time), Recency(items=1, weight=3))
        return predict(*view, seg, every) - before

    latest = rows.train_item[np.argmax(rows.train_time)]
    now = boost(rows.train_time)
    assert now[latest] == pytest.approx(3.0, rel=1e-5)  # q^_j . q^_j = 1
    assert int(now.argmax()) == latest  # and no other item's direction matches it better
    other = rows.train_item[rows.train_item != latest][0]
    later = np.where(rows.train_item == other, rows.train_time.max() + 1, rows.train_time)
    assert int(boost(later).argmax()) == other  # another rated item made the latest: the boost moves with it


def test_rows_without_timestamps_are_refused_when_recency_is_on(loo_cfg):
    rows = dataclasses.replace(cohort(load_data(loo_cfg), [0, 1]), train_time=None)
    items, state = _model(loo_cfg, 2)
    with pytest.raises(ValueError, match="no training timestamps"):
        evaluate_rows(items, state, rows, True, recency=Recency())
    evaluate_rows(items, state, rows, True, recency=Recency(weight=0.0))


def test_shards_carry_the_training_timestamps(loo_cfg, tmp_path):
    split = load_data(loo_cfg)
    root = ensure_shards(loo_cfg, 3, out=tmp_path / "set")
    for p in range(3):
        shard = open_shard(root / node_name(p))
        expected = cohort(split, shard.users)
        np.testing.assert_array_equal(shard.cohort(np.arange(len(shard.users))).train_time, expected.train_time)
        np.testing.assert_array_equal(shard.cohort(np.array([0, 2])).train_time,
                                      expected.subset(np.array([0, 2])).train_time)
    meta = root / node_name(0) / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": 1}))  # a set cut before train_time
    with pytest.raises(DataError, match="write it again"):
        open_shard(root / node_name(0))


def test_federated_equals_central_with_recency_on(loo_cfg):
    cfg = dataclasses.replace(loo_cfg, rounds=8, epochs=8, eval_every=4)
    assert cfg.recency_weight > 0
    federated = run_server(InProcessGrid(client_app, 3), cfg).summary["metrics"]
    central = run_central(dataclasses.replace(cfg, out=cfg.out + "-central"), write=False).summary["metrics"]
    for key in ("hr@10", "ndcg@10", "recall@10", "full-ndcg@10"):
        assert federated[key] == pytest.approx(central[key], rel=1e-5, abs=1e-6)
    off = run_central(dataclasses.replace(cfg, recency_weight=0.0), write=False).summary["metrics"]
    assert off["ndcg@10"] != central["ndcg@10"]  # the term is really applied on both sides


def _message(cfg: RunConfig, users, kind: str, n_items: int) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    config = round_config(cfg, 1, users)
    shared = make_algorithm(cfg, n_items, (1.0, 5.0)).init_server("fedavg", 1.0).broadcast()
    arrays = ArrayRecord({k: Array(v) for k, v in shared.items()})
    meta = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=0, dst_node_id=7,
                    reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600, message_type=kind)
    return Message(RecordDict({schema.ARRAYS: arrays, schema.CONFIG: config}), metadata=meta)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(),
                   run_config={})


def test_no_timestamp_leaves_the_device(loo_cfg):
    split = load_data(loo_cfg)
    rows = cohort(split, np.arange(10))
    algorithm = make_algorithm(loo_cfg, split.n_items, split.rating_scale)
    shared, state = algorithm.init_server("fedavg", 1.0).broadcast(), new_users(algorithm, np.arange(10), 10,
                                                                                 DevicePolicy())
    step = device_step(algorithm, shared, state, rows, 1, DevicePolicy(), loo_cfg.seed)
    moved = device_step(algorithm, shared, state, dataclasses.replace(rows, train_time=rows.train_time[::-1].copy()),
                        1, DevicePolicy(), loo_cfg.seed)
    assert set(step.upload) == set(algorithm.statistics())
    for name in step.upload:  # training is unchanged: the timestamps do not reach the upload at all
        np.testing.assert_array_equal(step.upload[name], moved.upload[name])
    reply = client_app(_message(loo_cfg, [], MessageType.EVALUATE, split.n_items), _context())
    assert set(reply.content.keys()) == {schema.METRICS}
    assert set(reply.content[schema.METRICS].keys()) == {schema.WEIGHT, *schema.EVAL_SUMS}
    train = client_app(_message(loo_cfg, [0, 1, 2], MessageType.TRAIN, split.n_items), _context())
    assert set(train.content[schema.ARRAYS].keys()) == set(algorithm.statistics())
    assert set(train.content[schema.METRICS].keys()) <= set(schema.TRAIN_METRICS)


def test_recency_settings_are_checked_and_moot_outside_leave_one_out():
    for bad in ({"recency_items": 0}, {"recency_decay": 1.5}, {"recency_decay": -0.1}, {"recency_weight": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad)).replace("_", "-")):
            RunConfig(**bad).validate()
    cfg = RunConfig(split="random", recency_weight=2.0)
    assert ignored_settings(cfg)["recency_weight"] == "with --split random"
    assert "recency_weight" not in ignored_settings(dataclasses.replace(cfg, split="loo"))
    assert Recency.of(Hyper()) == Recency() and Recency.of(hyper(dataclasses.replace(cfg, recency_items=2))).items == 2
