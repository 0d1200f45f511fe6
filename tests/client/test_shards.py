"""Per-node shards: a node holds exactly its users' rows, read from its own shard only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedrec.client.node import node_data
from fedrec.datasets import DataError, SyntheticSpec, cohort
from fedrec.datasets.catalog import synthetic_split
from fedrec.datasets.shards import node_name, open_shard
from fedrec.datasets.synthetic import BLOCK_USERS, generate, generate_users
from fedrec.run.build import ensure_shards, load_data
from fedrec.run.device_config import DeviceConfig


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_each_shard_holds_exactly_its_users_rows(small_cfg, tmp_path):
    split = load_data(small_cfg)
    root = ensure_shards(small_cfg, 4, out=tmp_path / "set")
    seen = []
    for p in range(4):
        shard = open_shard(root / node_name(p))
        assert isinstance(shard.train_item, np.memmap)  # opened memory-mapped, not read whole
        users = shard.users
        seen.extend(users.tolist())
        mine, expected = shard.cohort(np.arange(len(users))), cohort(split, users)
        for field in ("train_segment", "train_item", "train_rating", "test_segment", "test_item", "test_rating"):
            np.testing.assert_array_equal(getattr(mine, field), getattr(expected, field))
        picked = np.array([1, 3])  # a subset, as sampled in a round
        np.testing.assert_array_equal(shard.cohort(picked).train_item, cohort(split, users[picked]).train_item)
    assert seen == list(range(split.n_users))


def test_a_supernode_with_a_shard_reads_nothing_else(small_cfg, tmp_path, monkeypatch):
    root = ensure_shards(small_cfg, 3, out=tmp_path / "set")
    empty = tmp_path / "no-data-here"
    monkeypatch.setenv("FEDREC_DATA_DIR", str(empty))  # where a node would look for the data set
    monkeypatch.delenv("FEDREC_SHARDS", raising=False)
    node = node_data(DeviceConfig.of(small_cfg.resolved()), _context({"shard": str(root / node_name(2))}))
    assert node.meta.partition_id == 2 and node.users[0] == node.meta.first_user > 0
    assert not empty.exists()


def test_a_shard_cut_for_other_data_is_refused(small_cfg, tmp_path):
    root = ensure_shards(small_cfg, 2, out=tmp_path / "set")
    other = dataclasses.replace(small_cfg, seed=small_cfg.seed + 1)
    with pytest.raises(DataError, match="cut for other data"):
        node_data(DeviceConfig.of(other.resolved()), _context({"shard": str(root / node_name(0))}))
    with pytest.raises(DataError, match="other data or another split"):
        ensure_shards(other, 2, out=root)  # an existing set is never mixed with another's


def test_a_set_is_written_once_and_reused(small_cfg, tmp_path):
    root = ensure_shards(small_cfg, 2, out=tmp_path / "set")
    stamp = (root / node_name(0) / "train_item.npy").stat().st_mtime_ns
    assert ensure_shards(small_cfg, 2, out=root) == root
    assert (root / node_name(0) / "train_item.npy").stat().st_mtime_ns == stamp
    assert not [p for p in root.parent.iterdir() if p.name.endswith(".tmp")]


def test_synthetic_users_come_out_the_same_whatever_range_is_generated():
    spec = SyntheticSpec(users=2 * BLOCK_USERS + 100, items=50, density=0.02, seed=4)
    whole = generate(spec)[0].data
    lo, hi = BLOCK_USERS - 10, 2 * BLOCK_USERS + 5  # straddles two block boundaries
    part = generate_users(spec, lo, hi)
    keep = (whole.user >= lo) & (whole.user < hi)
    for field in ("user", "item", "rating", "timestamp"):
        np.testing.assert_array_equal(getattr(part, field), getattr(whole, field)[keep])
    full, piece = synthetic_split(spec, "random", 4, 0.2, 99), synthetic_split(spec, "random", 4, 0.2, 99, lo, hi)
    users = np.arange(lo, hi)
    np.testing.assert_array_equal(cohort(piece, users).test_item, cohort(full, users).test_item)


def test_the_server_can_only_ask_a_node_for_its_own_users(small_cfg, tmp_path, monkeypatch):
    from fedrec.client.app import app

    from .test_client import _request

    monkeypatch.setenv("FEDREC_SHARDS", str(ensure_shards(small_cfg, 2)))
    cfg = small_cfg.resolved()
    msg, _ = _request(cfg, [59])  # user 59 lives on node 1
    with pytest.raises(ValueError, match="does not host"):  # the engine turns it into an error reply
        app(msg, _context({"partition-id": 0, "num-partitions": 2}))
    twice, _ = _request(cfg, [3, 3])  # a user sent twice would upload twice its clipped update
    with pytest.raises(ValueError, match="more than once"):
        app(twice, _context({"partition-id": 0, "num-partitions": 2}))
