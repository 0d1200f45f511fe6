"""Runs that survive: failed devices, nodes that leave and rejoin, a stop and a resume
(in-process, no Ray; the real engines are in test_engines.py)."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedrec.client.app import app as client_app
from fedrec.client.storage import ENV_DIR
from fedrec.models.randomness import dropped
from fedrec.models.saved import load_model
from fedrec.run.config import RunConfig
from fedrec.server import checkpoint
from fedrec.server.runner import run_server
from fedrec.simulations.inprocess import InProcessGrid


@pytest.fixture
def devices(tmp_path, monkeypatch):
    """The simulated devices' own disks (what simulate() gives the engine's workers)."""
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "devices"))
    return tmp_path / "devices"


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_a_run_reports_its_status_and_each_round_as_it_ends(small_cfg, devices):
    seen = []

    def on_round(row):  # what `tail -f metrics.csv` and a reader of summary.json see meanwhile
        run_dir = outcome_dir[0]
        seen.append((_summary(run_dir)["status"], len(pd.read_csv(run_dir / "metrics.csv"))))

    cfg = dataclasses.replace(small_cfg, rounds=4, checkpoint_every=2)
    outcome_dir = [Path(cfg.out)]
    outcome = run_server(InProcessGrid(client_app, 3), cfg, on_round)
    assert seen == [("running", 1), ("running", 2), ("running", 3), ("running", 4)]
    assert _summary(outcome.run_dir)["status"] == "completed"
    assert not (outcome.run_dir / checkpoint.CHECKPOINT).exists()  # the server's memory is not an output
    saved = load_model(outcome.run_dir)
    for name, value in outcome.model.items():
        np.testing.assert_array_equal(saved[name], value)


def _stopping_after(round_: int, stop: threading.Event):
    def on_round(row):
        if row["round"] == round_:
            stop.set()  # what the first Ctrl-C does
    return on_round


@pytest.mark.parametrize("dp", ["none", "central"])
def test_stop_and_resume_gives_the_uninterrupted_result(small_cfg, devices, dp):
    cfg = dataclasses.replace(small_cfg, rounds=6, eval_every=2, checkpoint_every=2, users_per_round=20)
    if dp == "central":  # seeded noise (not private) so that the two runs can be compared
        cfg = dataclasses.replace(cfg, dp="central", clipping_norm=0.5, noise_multiplier=0.8, reproducible_noise=True)
    whole = run_server(InProcessGrid(client_app, 3), dataclasses.replace(cfg, out=cfg.out + "-whole"))

    stop = threading.Event()
    first = run_server(InProcessGrid(client_app, 3), cfg, _stopping_after(3, stop), stop=stop)
    assert first.status == "interrupted" and _summary(first.run_dir)["status"] == "interrupted"
    assert checkpoint.load(first.run_dir).round == 3
    # Fresh devices (new processes: empty context.state) that kept their state on their own disks.
    resumed = run_server(InProcessGrid(client_app, 3), dataclasses.replace(cfg, resume=str(first.run_dir)))
    assert resumed.status == "completed" and _summary(resumed.run_dir)["status"] == "completed"
    for name, value in whole.model.items():
        np.testing.assert_array_equal(resumed.model[name], value)
    assert resumed.summary["metrics"] == whole.summary["metrics"]
    frame = pd.read_csv(resumed.run_dir / "metrics.csv")
    assert list(frame["round"]) == [1, 2, 3, 4, 5, 6]
    if dp == "central":
        assert resumed.summary["privacy"]["epsilon"] == pytest.approx(whole.summary["privacy"]["epsilon"])


def test_a_crash_mid_run_leaves_a_failed_status_and_a_checkpoint_to_resume(small_cfg, devices):
    cfg = dataclasses.replace(small_cfg, rounds=5, eval_every=5, checkpoint_every=1)
    whole = run_server(InProcessGrid(client_app, 2), dataclasses.replace(cfg, out=cfg.out + "-whole"))

    def crash(row):
        if row["round"] == 2:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        run_server(InProcessGrid(client_app, 2), cfg, crash)
    summary = json.loads((Path(cfg.out) / "summary.json").read_text())
    assert summary["status"].startswith("failed: power cut") and summary["resumable"]
    resumed = run_server(InProcessGrid(client_app, 2), dataclasses.replace(cfg, resume=cfg.out))
    assert resumed.summary["metrics"] == whole.summary["metrics"]


def test_dropped_devices_are_counted_and_the_round_goes_on(small_cfg):
    cfg = dataclasses.replace(small_cfg, rounds=4, eval_every=4, dropout=0.3, users_per_round=30)
    outcome = run_server(InProcessGrid(client_app, 60), cfg)  # one user per node: a drop is a failed node
    frame = pd.read_csv(outcome.run_dir / "metrics.csv")
    assert frame["nodes_failed"].sum() > 0
    assert (frame["nodes_replied"] + frame["nodes_failed"] == frame["users_sampled"]).all()
    assert (frame["users_failed"] == frame["nodes_failed"]).all()
    assert np.isfinite(outcome.summary["metrics"]["rmse"])


def test_a_device_drops_the_same_way_whoever_hosts_it():
    users = np.arange(1000)
    together = dropped(7, 3, users, 0.3)
    apart = np.concatenate([dropped(7, 3, users[:400], 0.3), dropped(7, 3, users[400:], 0.3)])
    np.testing.assert_array_equal(together, apart)
    assert 0.25 < together.mean() < 0.35
    assert not np.array_equal(together, dropped(7, 4, users, 0.3))  # a new draw each round


def test_too_few_replies_skip_the_round(small_cfg):
    cfg = dataclasses.replace(small_cfg, rounds=3, eval_every=3, dropout=0.9, min_reply_fraction=0.5,
                              users_per_round=30)
    outcome = run_server(InProcessGrid(client_app, 60), cfg)
    frame = pd.read_csv(outcome.run_dir / "metrics.csv")
    assert frame["skipped"].fillna(0).sum() == 3  # ~3 of 30 replies per round: below half
    np.testing.assert_array_equal(outcome.model["item-emb"], run_server(
        InProcessGrid(client_app, 60), dataclasses.replace(cfg, rounds=1, out=cfg.out + "-0")).model["item-emb"])


def test_a_node_that_leaves_is_skipped_and_used_again_when_it_rejoins(small_cfg):
    grid = InProcessGrid(client_app, 3)
    gone = {}

    def on_round(row):
        if row["round"] == 1:  # node 1001 dies
            gone["context"] = grid.contexts.pop(1001)
        if row["round"] == 3:  # and comes back as a new node (a new node id, same partition)
            grid.contexts[2001] = gone["context"]

    cfg = dataclasses.replace(small_cfg, rounds=5, eval_every=1, users_per_round=0)
    outcome = run_server(grid, cfg, on_round)
    frame = pd.read_csv(outcome.run_dir / "metrics.csv")
    by_round = frame.set_index("round")
    assert by_round.loc[2, "users_unreachable"] == 20 and by_round.loc[3, "users_unreachable"] == 20
    assert np.isnan(by_round.loc[4, "users_unreachable"]) and by_round.loc[4, "nodes_replied"] == 3
    trained = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"}
    assert 2001 in trained


def test_under_central_dp_a_dropped_node_changes_neither_the_noise_nor_the_denominator():
    """Three nodes asked, one fails: the step is (sum of the two replies + full noise) / expected users."""
    from unittest.mock import Mock

    from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.models.defaults import Hyper
    from fedrec.models.mf import MF
    from fedrec.models.randomness import private_rng
    from fedrec.privacy.accountant import PrivacyPlan
    from fedrec.privacy.noise import add_central_noise
    from fedrec.run import schema
    from fedrec.run.config import RunConfig
    from fedrec.server.directory import NodeDirectory
    from fedrec.server.federation import Federation

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    n_items, dim, z, clip, expected = 5, 2, 1.3, 1.0, 6
    cfg = RunConfig(strategy="fedavg", server_lr=1.0, dp="central", noise_multiplier=z, clipping_norm=clip,
                    users_per_round=expected, sampling="poisson", seed=3, reproducible_noise=True, dim=dim,
                    min_reply_fraction=0.0)
    mf = MF(Hyper(dim=dim, init_std=0.0), n_items, (1.0, 5.0))
    plan = PrivacyPlan("central", z, clip, "poisson", expected, 9, 1e-5, "rdp")
    directory = NodeDirectory(np.array([11, 22, 33], np.uint64), np.array([0, 3, 6]), np.array([3, 3, 3]), 9, n_items,
                              (1.0, 5.0))
    state = mf.init_server("fedavg", 1.0)
    state.params["global-bias"].zero_()
    strategy = Federation(cfg, mf, state, directory, privacy=plan)
    grid = Mock(get_node_ids=Mock(return_value=[11, 22, 33]))
    strategy.begin_round(1)
    strategy.configure_train(1, ConfigRecord({"dim": dim}), grid)
    sent = dict(strategy._sent)

    def reply(node, value):
        update = {"item-emb": np.full((n_items, dim), value, np.float32),
                  "item-bias": np.zeros((n_items, 1), np.float32), "global-bias": np.zeros(1, np.float32)}
        message = Mock(spec=Message)
        message.has_error.return_value = False
        message.content = RecordDict({schema.ARRAYS: ArrayRecord({k: Array(v) for k, v in update.items()}),
                                      schema.METRICS: MetricRecord({schema.WEIGHT: 1, "loss-sum": 0.0, "num-rows": 1})})
        message.metadata.src_node_id = node
        return message

    failed = Mock(spec=Message)
    failed.has_error.return_value = True
    failed.error = Error(code=0, reason="node unavailable")
    failed.metadata.src_node_id = 33
    live = [n for n in sent if n != 33][:2]
    value = 0.1 / np.sqrt(n_items * dim)  # each reply well inside 1 user x C
    strategy.aggregate_train(1, [reply(n, value) for n in live] + [failed])
    total = {"item-emb": np.full((n_items, dim), value * len(live)), "item-bias": np.zeros((n_items, 1)),
             "global-bias": np.zeros(1)}
    expected_step = add_central_noise(total, plan.noise_std, private_rng("central-noise", 3, 1))["item-emb"] / expected
    np.testing.assert_allclose(state.model()["item-emb"], expected_step, rtol=1e-5, atol=1e-7)
    assert strategy._row["nodes_failed"] == 1


def test_rounds_released_after_the_last_checkpoint_are_accounted_on_resume(small_cfg, devices):
    """A crash after round 3 with the checkpoint at round 2: round 3 went out, so the resumed run
    composes 2 + 1 + 4 releases, not 6."""
    cfg = dataclasses.replace(small_cfg, rounds=6, eval_every=6, checkpoint_every=2, users_per_round=20,
                              dp="central", clipping_norm=0.5, noise_multiplier=0.8, sampling="poisson")

    def crash(row):
        if row["round"] == 3:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        run_server(InProcessGrid(client_app, 3), cfg, crash)
    resumed = run_server(InProcessGrid(client_app, 3), dataclasses.replace(cfg, resume=cfg.out))
    privacy = resumed.summary["privacy"]
    assert privacy["rounds"] == 7
    from fedrec.server.runner import privacy_plan
    assert privacy["epsilon"] == pytest.approx(privacy_plan(cfg, 60)[1].epsilon(7))


def test_central_dp_never_skips_a_round(small_cfg):
    """Whether enough replies came depends on who was sampled: under central DP every round is
    applied, noise included, so an unchanged model cannot tell that a sampled device failed."""
    cfg = dataclasses.replace(small_cfg, rounds=3, eval_every=3, dropout=0.9, users_per_round=30, dp="central",
                              clipping_norm=0.5, noise_multiplier=1.0)
    outcome = run_server(InProcessGrid(client_app, 60), cfg)
    assert not [r for r in outcome.history if r.get("skipped")]
    assert outcome.summary["privacy"]["rounds"] == 3


def test_a_resumed_device_never_loads_the_timeline_a_crash_cut_off(tmp_path):
    from fedrec.client import storage

    series = "00112233445566aa"
    directory = storage.series_dir(tmp_path, series)
    rounds = storage.ROUNDS  # the entry the participation cap counts
    step = {k: np.zeros(1, np.float32) for k in ("emb", "bias", "m", "v", "step", rounds)}
    storage.save_base(directory, 0, step)
    storage.start_steps(directory, step[rounds])
    for round_ in (2, 3, 4):  # checkpoint at 2; the crashed session got to 4
        storage.save_delta(directory, round_, np.array([0]), step | {rounds: np.array([float(round_)])}, keep_from=2)
    storage.discard_after(tmp_path, series, "2-0a0b0c0d")
    assert storage.load(directory, 10)[2][rounds][0] == 2.0
    assert storage.rounds_taken(directory)[0] == 4.0  # the cap still counts the cut-off rounds
    storage.save_delta(directory, 3, np.array([0]), step | {rounds: np.array([3.5])}, keep_from=2)
    storage.discard_after(tmp_path, series, "2-0a0b0c0d")  # the same session again (a device restart): keeps it
    assert storage.load(directory, 10)[2][rounds][0] == 3.5




def test_a_resumed_run_that_stops_on_its_budget_evaluates_the_checkpoints_timeline(tmp_path, monkeypatch):
    """Red-team finding: the final evaluation after a budget stop carried no resumed-from, so the
    devices evaluated with the state of the round the crash cut off."""
    import fedrec.client.node as node_mod
    from fedrec.server.runner import privacy_plan

    monkeypatch.setenv("FEDREC_DEVICE_STATE_DIR", str(tmp_path / "devices"))
    monkeypatch.delenv("FEDREC_SHARDS", raising=False)
    base = RunConfig(dataset="synthetic", synthetic_users=60, synthetic_items=40, synthetic_density=0.2, dim=8,
                     rounds=20, eval_every=20, out=str(tmp_path / "run"), checkpoint_every=2, users_per_round=60,
                     dp="central", clipping_norm=0.5, noise_multiplier=1.0, sampling="poisson")
    cfg = dataclasses.replace(base, target_epsilon=privacy_plan(base, 60)[1].epsilon(5))  # 5 releases fit
    loads = []
    real_load = node_mod.load

    def spy(directory, up_to, have=None):
        out = real_load(directory, up_to, have)
        loads.append(None if out is None else out[0])
        return out

    def crash(row):
        if row["round"] == 5:
            raise RuntimeError("power cut after round 5 (checkpoint at 4)")

    with pytest.raises(RuntimeError, match="power cut"):
        run_server(InProcessGrid(client_app, 2), cfg, crash)
    node_mod._HELD.clear()  # a new process for the resumed session
    monkeypatch.setattr(node_mod, "load", spy)
    run_server(InProcessGrid(client_app, 2), dataclasses.replace(cfg, resume=cfg.out))
    assert loads and set(loads) == {4}  # the state of round 4, never of the cut-off round 5


def test_the_cap_survives_a_crash_between_a_devices_first_state_and_its_counts(tmp_path, monkeypatch, small_cfg):
    from flwr.app import Context, RecordDict

    import fedrec.client.node as node_mod
    from fedrec.client import storage
    from fedrec.run.device_config import DeviceConfig

    monkeypatch.setenv("FEDREC_DEVICE_STATE_DIR", str(tmp_path / "devices"))
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                      run_config={})
    device = DeviceConfig.of(small_cfg.resolved())
    node = node_mod.node_data(device, context)
    config = {"run-series": "00112233445566aa"}
    node_mod.load_state(context, node, device.policy, config, 0)
    directory = storage.series_dir(tmp_path / "devices" / "node-0", "00112233445566aa")
    (directory / "steps.npy").unlink()  # as if the process died right after writing the base
    node_mod._HELD.clear()
    node_mod.load_state(context, node, device.policy, config, 0)
    assert (directory / "steps.npy").is_file()
    other = Context(run_id=1, node_id=2, node_config={"state-dir": str(tmp_path / "devices" / "node-0"),
                                                      "partition-id": 1, "num-partitions": 2},
                    state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="belongs to other users"):  # two nodes sharing one state-dir
        node_mod.load_state(other, node_mod.node_data(device, other), device.policy, config, 0)
    assert oct(directory.stat().st_mode & 0o777) == "0o700"
