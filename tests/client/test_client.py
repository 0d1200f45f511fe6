"""The ClientApp called in-process with hand-built Messages and a Context (no Ray)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedrec.client import storage
from fedrec.client.app import app
from fedrec.run import schema
from fedrec.run.build import load_data, make_algorithm
from fedrec.run.device_config import DeviceConfig

from ..conftest import round_config


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _message(content: RecordDict, kind: str) -> Message:
    meta = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=0, dst_node_id=7,
                    reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600, message_type=kind)
    return Message(content, metadata=meta)


def _request(cfg, users, rnd=1, kind=MessageType.TRAIN):
    split = load_data(cfg)
    shared = make_algorithm(cfg, split.n_items, split.rating_scale).init_server("fedavg", 1.0).broadcast()
    config = round_config(cfg, rnd, users)
    arrays = ArrayRecord({k: Array(v) for k, v in shared.items()})
    return _message(RecordDict({schema.ARRAYS: arrays, schema.CONFIG: config}), kind), split


def _context(pid=0, parts=1):
    return Context(run_id=1, node_id=7, node_config={"partition-id": pid, "num-partitions": parts}, state=RecordDict(),
                   run_config={})


def test_train_reply_carries_only_item_side_arrays_and_sums(small_cfg):
    cfg = small_cfg.resolved()
    msg, split = _request(cfg, [3, 4, 5])
    reply = app(msg, _context())
    assert set(reply.content.keys()) == {schema.ARRAYS, schema.METRICS}
    arrays = reply.content[schema.ARRAYS]
    statistics = make_algorithm(cfg, split.n_items, split.rating_scale).statistics()
    assert set(arrays.keys()) == set(statistics)  # MF's: item rows, item biases, mu
    assert arrays["item-emb"].shape == (split.n_items, cfg.dim)
    assert set(reply.content[schema.METRICS].keys()) == set(schema.TRAIN_METRICS)
    assert reply.content[schema.METRICS][schema.WEIGHT] == 3
    # Only rows of items that users 3-5 rated can have moved.
    rated = set(split.train.item[np.isin(split.train.user, [3, 4, 5])].tolist())
    moved = set(np.flatnonzero(np.abs(arrays["item-emb"].numpy()).sum(1) > 0).tolist())
    assert moved and moved <= rated


def test_private_state_persists_across_rounds_and_stays_in_context(small_cfg):
    cfg = small_cfg.resolved()
    ctx = _context()
    msg, _ = _request(cfg, [2], rnd=1)
    app(msg, ctx)
    first = ctx.state[schema.STATE_KEY]["emb"].numpy().copy()
    rounds = ctx.state[schema.STATE_KEY]["rounds"].numpy()
    assert rounds[2] == 1 and rounds.sum() == 1  # only the sampled user trained
    msg, _ = _request(cfg, [2], rnd=2)
    app(msg, ctx)
    second = ctx.state[schema.STATE_KEY]
    assert second["rounds"].numpy()[2] == 2
    assert not np.allclose(second["emb"].numpy()[2], first[2])  # the user vector moved on-device


def test_evaluate_replies_with_sums_over_the_nodes_users(small_cfg):
    cfg = small_cfg.resolved()
    msg, split = _request(cfg, [], kind=MessageType.EVALUATE)
    reply = app(msg, _context(pid=1, parts=2))
    metrics = reply.content[schema.METRICS]
    assert set(metrics.keys()) == {schema.WEIGHT, *schema.EVAL_SUMS}
    hosted = np.arange(split.n_users // 2, split.n_users)
    assert metrics["num-ratings"] == np.isin(split.test.user, hosted).sum()
    assert schema.ARRAYS not in reply.content


def test_node_without_partition_config_gets_a_clear_error(small_cfg):
    msg, _ = _request(small_cfg.resolved(), [0])
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="neither a shard nor partition-id"):
        app(msg, ctx)  # the engines turn this into an error reply carrying the message


def test_a_node_reads_data_where_its_own_config_says_never_where_the_server_says(shared_data, tmp_path):
    from fedrec.run.config import RunConfig

    server_pick = tmp_path / "chosen-by-the-server"
    cfg = RunConfig(dataset="ml-100k", split="u1", data_dir=str(server_pick))
    hello = _message(RecordDict({schema.CONFIG: ConfigRecord(DeviceConfig.of(cfg.resolved()).record())}),
                     MessageType.QUERY)
    node_config = {"partition-id": 0, "num-partitions": 1, "data-dir": str(shared_data)}
    reply = app(hello, Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={}))
    assert reply.content[schema.METRICS]["population"] == 943
    assert not server_pick.exists()  # nothing created or downloaded where the server pointed


def _state(n: int, value: float) -> dict[str, np.ndarray]:
    """An MF device's state entries, and the participation count the cap reads."""
    return {k: np.full((n, 3) if k in ("emb", "m", "v") else n, value, np.float32)
            for k in ("emb", "bias", "m", "v", "step", storage.ROUNDS)}


def test_a_device_keeps_its_state_on_its_own_disk_as_a_base_and_a_journal(tmp_path):
    directory = storage.series_dir(tmp_path, "0123456789abcdef")
    storage.save_base(directory, 0, _state(4, 0.0))
    storage.start_steps(directory, np.zeros(4, np.float32))
    for round_ in (1, 2, 3):  # user `round_` trains in round `round_`; the server checkpointed round 2
        storage.save_delta(directory, round_, np.array([round_]), _state(1, float(round_)), keep_from=2)
    names = sorted(p.name[:12] for p in directory.iterdir())
    assert names == ["base-r000002", "delta-r00000", "steps.npy"]  # rounds 1-2 folded into a base
    for up_to, expected in ((2, [0, 1, 2, 0]), (3, [0, 1, 2, 3])):
        np.testing.assert_array_equal(storage.load(directory, up_to)[2]["bias"], expected)
    assert storage.load(directory, 1) is None  # nothing older than the last checkpoint survives
    np.testing.assert_array_equal(storage.rounds_taken(directory), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="16 hex digits"):  # the server names no path
        storage.series_dir(tmp_path, "../../etc")


def test_a_process_reuses_the_state_it_holds_only_while_its_journal_entry_exists(tmp_path):
    directory = storage.series_dir(tmp_path, "0123456789abcdef")
    base = storage.save_base(directory, 0, _state(2, 0.0))
    held = (0, base, _state(2, 7.0))  # what this process holds (differs from disk on purpose)
    storage.save_delta(directory, 1, np.array([1]), _state(1, 1.0), keep_from=0)
    assert storage.load(directory, 1, held)[2]["bias"].tolist() == [7.0, 1.0]  # held + the new delta
    storage.save_base(directory, 0, _state(2, 0.0))  # another process rewrote the base: held is stale
    assert storage.load(directory, 1, held)[2]["bias"].tolist() == [0.0, 1.0]  # read again from disk




def test_a_device_receives_only_its_part_of_the_config():
    from fedrec.run.config import ConfigError, RunConfig

    cfg = RunConfig(out="/srv/runs/x", ray_address="10.0.0.5:6379", data_dir="/srv/data", dp="local",
                    clipping_norm=0.5, noise_multiplier=1.5, rounds=7, target_delta=1e-6).resolved().validate()
    device = DeviceConfig.of(cfg)
    record = device.record()
    assert DeviceConfig.from_record(record) == device  # the wire format round-trips
    assert not any("/srv" in str(v) or "10.0.0.5" in str(v) for v in record.values())  # no paths, no addresses
    names = {key.rpartition(".")[2] for key in record}
    assert not names & {"rounds", "target_delta", "accountant", "secagg_shares", "out", "resume", "ray_address",
                        "users_per_round", "sampling"}
    assert record["data.data_dir"] == ""  # a node reads its own data directory
    assert device.policy.noise_std == 1.5 * 0.5 and device.model.model == cfg.model  # resolved on the server
    with pytest.raises(ConfigError, match="unknown device setting 'policy.nope'"):
        DeviceConfig.from_record(record | {"policy.nope": 1})
