"""Consent on the device: an opted-out user is left out of training exactly like a device that
was not sampled, keeps evaluating, and the federation respects it in every later round."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedrec.client import controls, storage, uploads
from fedrec.client.app import app as client_app
from fedrec.client.node import node_data
from fedrec.client.storage import ENV_DIR
from fedrec.personal.device_view import device_view, erase_device, locate, set_consent
from fedrec.run import schema
from fedrec.run.build import load_data, make_algorithm
from fedrec.run.config import ConfigError
from fedrec.run.device_config import DeviceConfig
from fedrec.server import checkpoint
from fedrec.server.runner import run_server
from fedrec.server.sampling import sample_users, sampling_rng
from fedrec.simulations.federated import device_dir
from fedrec.simulations.inprocess import InProcessGrid

from ..conftest import round_config


def _shared(cfg, n_items: int) -> dict[str, np.ndarray]:
    """What a round broadcasts before the first: the algorithm's public starting state (mu 3.0 on 1..5)."""
    return make_algorithm(cfg, n_items, (1.0, 5.0)).init_server(cfg.strategy, cfg.server_lr).broadcast()


def _message(cfg, users, kind=MessageType.TRAIN) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    config = round_config(cfg, 1, users)
    meta = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=0, dst_node_id=7,
                    reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600, message_type=kind)
    arrays = ArrayRecord({k: Array(v) for k, v in _shared(cfg, load_data(cfg).n_items).items()})
    return Message(RecordDict({schema.ARRAYS: arrays, schema.CONFIG: config}), metadata=meta)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(),
                   run_config={})


def _reply(cfg, users, kind=MessageType.TRAIN):
    content = client_app(_message(cfg, users, kind), _context()).content
    arrays = {k: v.numpy() for k, v in content[schema.ARRAYS].items()} if schema.ARRAYS in content else {}
    return arrays, dict(content[schema.METRICS])


def test_a_reply_with_a_user_opted_out_is_the_reply_without_that_user(small_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "devices"))
    cfg = small_cfg.resolved()
    controls.set_training(tmp_path / "devices" / "node-0", 4, train=False)
    opted_out, metrics = _reply(cfg, [3, 4, 5])
    not_sampled, expected = _reply(cfg, [3, 5])
    assert metrics == expected and metrics[schema.WEIGHT] == 2
    assert opted_out.keys() == not_sampled.keys()
    for name, array in not_sampled.items():
        np.testing.assert_array_equal(opted_out[name], array)
    controls.set_training(tmp_path / "devices" / "node-0", 4, train=True)  # opted back in: it trains again
    assert _reply(cfg, [3, 4, 5])[1][schema.WEIGHT] == 3


def test_an_opted_out_user_is_held_out_of_evaluation_from_its_opt_out_round_and_an_erased_one_always(
        small_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "devices"))
    cfg = small_cfg.resolved()
    root = tmp_path / "devices" / "node-0"
    everyone = _reply(cfg, [], MessageType.EVALUATE)[1][schema.WEIGHT]  # the messages are of round 1
    controls.set_training(root, 4, train=False, from_round=2)  # not retroactive: round 1 is before it
    assert _reply(cfg, [], MessageType.EVALUATE)[1][schema.WEIGHT] == everyone
    assert _reply(cfg, [3, 4, 5])[1][schema.WEIGHT] == 3
    controls.set_training(root, 4, train=False, from_round=1)  # nothing of the user leaves the device now
    # a cohort node's weight drops by its held-back users: the server learns how many, not which
    assert _reply(cfg, [], MessageType.EVALUATE)[1][schema.WEIGHT] == everyone - 1
    assert _reply(cfg, [3, 4, 5])[1][schema.WEIGHT] == 2
    controls.erase(root, 4)
    assert _reply(cfg, [], MessageType.EVALUATE)[1][schema.WEIGHT] == everyone - 1
    assert controls.read(root) == {"opted-out": set(), "erased": {4}}
    with pytest.raises(ValueError, match="erased"):
        controls.set_training(root, 4, train=True)


def test_a_one_user_node_whose_user_opted_out_or_was_erased_fails_evaluation_like_a_dead_device(
        small_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "devices"))
    cfg = small_cfg.resolved()
    one_user = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": cfg.synthetic_users},
                       state=RecordDict(), run_config={})
    device = DeviceConfig.of(cfg)
    user = int(node_data(device, one_user).users[0])
    assert len(node_data(device, one_user).users) == 1
    assert schema.WEIGHT in client_app(_message(cfg, [], MessageType.EVALUATE), one_user).content[schema.METRICS]
    root = tmp_path / "devices" / "node-0"
    for withhold in (lambda: controls.set_training(root, user, train=False, from_round=1),
                     lambda: controls.erase(root, user)):
        withhold()
        with pytest.raises(Exception, match="dropped out in round 1$"):  # no reply of zero users: nothing told
            client_app(_message(cfg, [], MessageType.EVALUATE), one_user)


def test_a_node_whose_every_sampled_user_opted_out_replies_like_a_dropped_device(small_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "devices"))
    cfg = small_cfg.resolved()
    controls.set_training(tmp_path / "devices" / "node-0", 4, train=False)
    with pytest.raises(Exception, match="dropped out in round 1$"):  # the same words as --dropout: nothing told
        client_app(_message(cfg, [4]), _context())


def _kept_run(small_cfg, tmp_path, monkeypatch, **changes):
    run = tmp_path / "run"
    cfg = dataclasses.replace(small_cfg, rounds=4, eval_every=2, users_per_round=20, checkpoint_every=1,
                              keep_checkpoints=True, out=str(run), **changes)
    monkeypatch.setenv(ENV_DIR, str(device_dir(run)))
    run_server(InProcessGrid(client_app, 2), cfg)
    return cfg, run


def _trained_rounds(run: Path, user: int) -> list[int]:
    """The rounds `user`'s device logged an upload for (its own upload log)."""
    return [e.round for root in device_dir(run).iterdir() for d in controls.series_dirs(root)
            for e in uploads.of_user(d, user)]


def test_the_federation_respects_an_opt_out_from_its_round_and_not_before(small_cfg, tmp_path, monkeypatch):
    cfg, run = _kept_run(small_cfg, tmp_path, monkeypatch)
    sampled = {r: set(sample_users(60, 20, "fixed", sampling_rng(cfg, r)).tolist()) for r in (1, 2, 3, 4)}
    user = min(sampled[1] & sampled[3])  # trained in round 1, sampled again later
    trained = _trained_rounds(run, user)
    assert 1 in trained and 3 in trained
    set_consent(run, str(user), train=False)  # from round 5: a replay of rounds 2..4 trains the user as before
    assert device_view(run, str(user)).opted_out
    assert controls.opt_out_rounds(locate(run, str(user)).root) == {user: 5}
    checkpoint.restore_kept(run, 1)  # continue from round 1 with the run's own resume path
    run_server(InProcessGrid(client_app, 2), dataclasses.replace(cfg, resume=str(run)))
    assert _trained_rounds(run, user) == trained
    controls.set_training(locate(run, str(user)).root, user, train=False, from_round=3)  # as if opted out in round 2
    checkpoint.restore_kept(run, 1)
    run_server(InProcessGrid(client_app, 2), dataclasses.replace(cfg, resume=str(run)))
    assert _trained_rounds(run, user) == [r for r in trained if r < 3]  # sampled in round 3 again, but silent
    others = sampled[3] - {user}
    assert all(3 in _trained_rounds(run, u) for u in others)
    view = device_view(run, str(user))
    assert view.opted_out and [u.round for u in view.uploads] == [r for r in trained if r < 3] and view.ratings


def test_consent_of_an_unknown_user_or_a_run_without_a_model_is_a_config_error(small_cfg, tmp_path, monkeypatch):
    _, run = _kept_run(small_cfg, tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match="unknown user '60'"):
        set_consent(run, "60", train=False)
    with pytest.raises(ConfigError, match="has no model.npz"):
        set_consent(tmp_path, "1", train=False)
    erase_device(run, "5")
    with pytest.raises(ConfigError, match="user 5: erased"):
        set_consent(run, "5", train=True)


@pytest.mark.engine
def test_through_the_engine_an_opted_out_device_trains_in_no_later_round(tmp_path):
    from fedrec.personal.forget import replay
    from fedrec.simulations.federated import simulate

    run = tmp_path / "run"
    cfg = dataclasses.replace(_engine_cfg(), out=str(run))
    simulate(cfg)
    sampled = {r: set(sample_users(80, 30, "fixed", sampling_rng(cfg, r)).tolist()) for r in (1, 2, 3, 4)}
    user = min(sampled[1] & (sampled[3] | sampled[4]))
    controls.set_training(locate(run, str(user)).root, user, train=False, from_round=2)  # opted out in round 1
    steps_before = _steps(run, user, 1)
    replay(run, 1)  # the kept checkpoint of round 1, resumed through Ray to the last round
    assert _trained_rounds(run, user) == [1]
    assert _steps(run, user, 4) == steps_before  # its private state did not move after round 1
    assert all(max(_trained_rounds(run, u)) >= 3 for u in (sampled[3] | sampled[4]) - {user})


def _engine_cfg():
    from fedrec.run.config import RunConfig

    return RunConfig(dataset="synthetic", synthetic_users=80, synthetic_items=40, synthetic_density=0.2, dim=8,
                     rounds=4, eval_every=4, users_per_round=30, checkpoint_every=1, keep_checkpoints=True)


def _steps(run: Path, user: int, round_: int) -> float:
    for root in device_dir(run).iterdir():
        for directory in controls.series_dirs(root):
            owner = json.loads((directory / "owner.json").read_text())
            position = user - owner["first_user"]
            if 0 <= position < owner["num_users"]:
                return float(storage.load(directory, round_)[2]["step"][position])
    raise AssertionError(f"no device holds user {user}")


def test_under_distributed_dp_every_user_sent_adds_its_noise_share(small_cfg, tmp_path, monkeypatch):
    """Users held back on their device (here: opted out; a whole node of them too) add a zero
    update plus their share, so the unmasked sum carries the noise of every user the server
    counts: two rounds' sums differ by noise of std sqrt(2 x users sent) x share (chi-square)."""
    from scipy import stats

    from fedrec.server.federation import array_record
    from fedrec.server.runner import coordinates
    from fedrec.server.secagg import SecureGrid, secagg_setup

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "devices"))
    cfg = dataclasses.replace(small_cfg, strategy="fedavg", server_lr=1.0, clipping_norm=0.5, users_per_round=20,
                              rounds=1, eval_every=1, secure_aggregation="secagg+", dp="distributed",
                              noise_multiplier=1.0, reproducible_noise=True)
    share, nodes, sums = 0.3, 10, []
    bounds = np.linspace(0, 60, nodes + 1).round().astype(int)
    for partition in range(nodes):  # the first half of the nodes: both users opted out; the rest: one
        for user in (bounds[partition], bounds[partition] + 1)[:2 if partition < nodes // 2 else 1]:
            controls.set_training(tmp_path / "devices" / f"node-{partition}", int(user), train=False)
    algorithm = make_algorithm(cfg, cfg.synthetic_items, (1.0, 5.0))
    shared = _shared(cfg, cfg.synthetic_items)
    for round_ in (1, 2):  # reproducible mode: the round keys the noise, everything else repeats
        grid = InProcessGrid(client_app, nodes)
        users = {node: list(range(bounds[i], bounds[i] + 2)) for i, node in enumerate(sorted(grid.contexts))}
        setup = secagg_setup(cfg, nodes, 6, coordinates(algorithm, cfg.synthetic_items), share, 20, 60)
        messages = []
        for node, sent in users.items():
            config = round_config(cfg, round_, sent, share)
            messages.append(Message(RecordDict({schema.ARRAYS: array_record(shared), schema.CONFIG: config}),
                                    dst_node_id=node, message_type=MessageType.TRAIN))
        (reply,) = SecureGrid(grid, cfg, setup, algorithm.statistics()).send_and_receive(messages)
        assert reply.content[schema.METRICS][schema.WEIGHT] == nodes // 2  # the trained count stays masked
        sums.append(np.concatenate([reply.content[schema.ARRAYS][k].numpy().ravel() for k in algorithm.statistics()]))
    diff = (sums[0] - sums[1]).astype(np.float64)
    statistic = (diff**2).sum() / (2 * 2 * nodes * share**2)
    assert stats.chi2.ppf(0.5e-6, len(diff)) < statistic < stats.chi2.ppf(1 - 0.5e-6, len(diff))


def test_consent_on_a_central_run_is_recorded(small_cfg, tmp_path):
    from fedrec.simulations.central import run_central

    run = run_central(dataclasses.replace(small_cfg, epochs=1, out=str(tmp_path / "central"))).run_dir
    set_consent(run, "3", train=False)  # its metrics.csv counts epochs, not rounds
    assert controls.opt_out_rounds(locate(run, "3").root) == {3: 1}


def test_consent_forget_and_the_device_view_take_a_compare_directory(small_cfg, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fedrec.cli.main import cli

    compare = tmp_path / "compare"
    cfg = dataclasses.replace(small_cfg, rounds=2, eval_every=2, out=str(compare / "federated"))
    monkeypatch.setenv(ENV_DIR, str(device_dir(compare / "federated")))
    run_server(InProcessGrid(client_app, 2), cfg)
    (compare / "central").mkdir()
    note = f"note: {compare} is a compare directory; using its federated run, {compare / 'federated'}"
    result = CliRunner().invoke(cli, ["consent", "--run", str(compare), "--user", "3", "--opt-out"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [note] and "user 3: opted out of training" in result.stdout
    assert controls.opt_out_rounds(locate(compare / "federated", "3").root) == {3: 3}
    assert device_view(compare, "3").opted_out  # the device page's account, from the compare directory
    result = CliRunner().invoke(cli, ["forget", "--run", str(compare), "--user", "4"])  # kept no checkpoints
    assert result.exit_code == 2 and result.stderr.splitlines()[0] == note
    assert len(result.stderr.splitlines()) == 2 and "--keep-checkpoints" in result.stderr
    result = CliRunner().invoke(cli, ["consent", "--run", str(tmp_path), "--user", "3", "--opt-in"])
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: {tmp_path} has no model.npz; pass the directory of a finished federated or compare run")
