"""The poisoning experiment on a small population: the attack hurts, the defences undo it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flwr.app import Message, MessageType
from flwr.supercore.task_identity import TaskIdentity

from fedrec.audit.poisoning import HostileClientApp, run_poisoning
from fedrec.client.app import app as client_app
from fedrec.models.factors import GLOBAL_BIAS, ITEM_BIAS, ITEM_EMB
from fedrec.run import schema
from fedrec.server.runner import run_server
from fedrec.simulations.inprocess import InProcessGrid


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _train_reply(grid: InProcessGrid, node: int) -> Message:
    return next(r for m, r in zip(grid.sent, grid.replies)
                if m.metadata.message_type == MessageType.TRAIN and m.metadata.dst_node_id == node)


def test_a_hostile_node_scales_its_train_upload_and_nothing_else(small_cfg, tmp_path):
    cfg = dataclasses.replace(small_cfg, update_mode="sparse", rounds=1, eval_every=1)
    honest, hostile = InProcessGrid(client_app, 60), InProcessGrid(HostileClientApp(client_app, {3}, -1000.0), 60)
    for name, grid in (("honest", honest), ("hostile", hostile)):
        run_server(grid, dataclasses.replace(cfg, out=str(tmp_path / name)))
    good, bad = _train_reply(honest, 1003), _train_reply(hostile, 1003)
    np.testing.assert_array_equal(bad.content[schema.ARRAYS][schema.ITEM_INDEX].numpy(),
                                  good.content[schema.ARRAYS][schema.ITEM_INDEX].numpy())
    for key in (ITEM_EMB, ITEM_BIAS, GLOBAL_BIAS):  # MF's statistics
        np.testing.assert_allclose(bad.content[schema.ARRAYS][key].numpy(),
                                   -1000 * good.content[schema.ARRAYS][key].numpy(), rtol=1e-6)
    assert dict(bad.content[schema.METRICS]) == dict(good.content[schema.METRICS])
    for node in (1002, 1004):  # the others are untouched
        assert _train_reply(hostile, node).content[schema.ARRAYS][ITEM_EMB].numpy().tolist() == \
            _train_reply(honest, node).content[schema.ARRAYS][ITEM_EMB].numpy().tolist()


def test_the_attack_hurts_and_the_defences_undo_it(small_cfg, tmp_path):
    cfg = dataclasses.replace(small_cfg, rounds=4, eval_every=4, users_per_round=20, out=str(tmp_path / "p"))
    report = run_poisoning(cfg, log=lambda line: None, hostile_every=10)  # 6 hostile users of 60
    rows = {r["run"]: r for r in report["results"]}
    assert rows["attacked, no defences"]["hostile_replies"] > 0
    assert rows["attacked, no defences"]["rmse"] > 1.15 * rows["clean"]["rmse"]  # defended: within 3%
    assert rows["attacked, defences"]["scaled"] == rows["attacked, defences"]["hostile_replies"]
    assert rows["attacked, defences"]["rmse"] == pytest.approx(rows["clean"]["rmse"], rel=0.03)
    assert rows["clean, norm-bound"]["scaled"] == 0
    assert rows["central DP attacked, no checks"]["rmse"] > 1.15 * rows["central DP clean"]["rmse"]
    dp = rows["central DP attacked, checks"]
    assert dp["rejected"] == dp["hostile_replies"] > 0 and dp["scaled"] == 0
    assert dp["rmse"] == pytest.approx(rows["central DP clean"]["rmse"], rel=0.03)
    assert json.loads((tmp_path / "p" / "poisoning.json").read_text())["results"] == report["results"]
