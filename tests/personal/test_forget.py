"""Forgetting a user: the exclusion leaves everyone else's draws alone, the device erases what it
holds, the upload log, and exact replay through the real engine equals a run that never had the user."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedrec.cli.main import cli
from fedrec.client import controls, storage, uploads
from fedrec.client.app import app as client_app
from fedrec.client.storage import ENV_DIR
from fedrec.models.saved import load_model
from fedrec.personal.device_view import erase_device, locate
from fedrec.personal.forget import forget, replay_start
from fedrec.run.config import ConfigError, RunConfig
from fedrec.server import checkpoint
from fedrec.server.runner import run_server
from fedrec.server.sampling import sample_users, sampling_rng
from fedrec.simulations.federated import device_dir
from fedrec.simulations.inprocess import InProcessGrid


@pytest.mark.parametrize("method", ["fixed", "poisson"])
def test_an_excluded_user_is_drawn_and_dropped_so_the_others_draws_do_not_change(method):
    cfg = RunConfig(seed=3)
    for round_ in range(1, 6):
        everyone = sample_users(500, 50, method, sampling_rng(cfg, round_))
        gone = everyone[:2]  # users this round would have drawn
        mask = np.ones(500, bool)
        mask[gone] = False
        np.testing.assert_array_equal(sample_users(500, 50, method, sampling_rng(cfg, round_), mask),
                                      np.setdiff1d(everyone, gone))


def _kept_run(small_cfg, tmp_path, monkeypatch, name="run", exclude=(), nodes=2, **changes):
    run = tmp_path / name
    settings = dict(rounds=4, eval_every=2, users_per_round=20, checkpoint_every=1) | changes
    cfg = dataclasses.replace(small_cfg, keep_checkpoints=True, out=str(run), **settings)
    monkeypatch.setenv(ENV_DIR, str(device_dir(run)))
    run_server(InProcessGrid(client_app, nodes), cfg, exclude=exclude)
    return cfg, run


def _first_rounds(cfg, population=60) -> dict[int, int]:
    first: dict[int, int] = {}
    for round_ in range(1, cfg.rounds + 1):
        for user in sample_users(population, cfg.users_per_round, cfg.sampling, sampling_rng(cfg, round_)):
            first.setdefault(int(user), round_)
    return first


def test_kept_checkpoints_count_participation_and_the_excluded_user_never_takes_part(small_cfg, tmp_path,
                                                                                    monkeypatch):
    cfg, run = _kept_run(small_cfg, tmp_path, monkeypatch)
    assert checkpoint.kept_rounds(run) == [0, 1, 2, 3, 4] and not (run / checkpoint.CHECKPOINT).exists()
    assert oct(checkpoint.kept_dir(run).stat().st_mode & 0o777) == "0o700" and device_dir(run).is_dir()
    first = _first_rounds(cfg)
    late = next(u for u, r in first.items() if r == 3)
    assert replay_start(run, checkpoint.kept_rounds(run), late) == 2
    never = next(u for u in range(60) if u not in first)
    assert replay_start(run, checkpoint.kept_rounds(run), never) == 4  # nothing to replay

    _, without = _kept_run(small_cfg, tmp_path, monkeypatch, "without", exclude=[late])
    counts, counts_without = (checkpoint.load_kept(r, 4).participation for r in (run, without))
    assert counts[late] > 0 and counts_without[late] == 0
    counts[late] = 0
    np.testing.assert_array_equal(counts, counts_without)  # everyone else was drawn exactly as before
    # what the released metrics count does not dip where the forgotten user was dropped (with the public
    # seed, a dip would tell who it was)
    released, released_without = (pd.read_csv(r / "metrics.csv") for r in (run, without))
    assert released["users_sampled"].equals(released_without["users_sampled"])
    assert released_without["users_failed"].isna().all()  # withheld with users forgotten


def test_a_run_without_the_counts_replays_from_round_0(small_cfg, tmp_path, monkeypatch):
    _, run = _kept_run(small_cfg, tmp_path, monkeypatch, dp="central", clipping_norm=0.5, noise_multiplier=1.0)
    assert len(checkpoint.load_kept(run, 2).participation) == 0  # central DP keeps no participation counts
    assert replay_start(run, checkpoint.kept_rounds(run), 7) == 0


def test_the_device_logs_each_round_its_users_uploaded_with_norms_before_and_after_clipping(small_cfg, tmp_path,
                                                                                          monkeypatch):
    cfg, run = _kept_run(small_cfg, tmp_path, monkeypatch, clipping_norm=0.05)
    (series,) = controls.series_dirs(device_dir(run) / "node-0")
    logged = {r: np.load(p)["users"].tolist() for r, p in uploads.entries(series)}
    hosted = range(30)  # node 0 of 2 hosts users 0..29
    assert logged == {r: [u for u in sample_users(60, 20, "fixed", sampling_rng(cfg, r)) if u in hosted]
                      for r in range(1, 5)}
    entries = [e for u in hosted for e in uploads.of_user(series, u)]
    assert entries and all(e.clipped <= 0.05 and e.clipped == pytest.approx(min(e.norm, 0.05), rel=1e-5)
                           for e in entries)
    assert any(e.norm > 0.05 for e in entries) and all(e.rows > 0 for e in entries)
    storage.discard_after(device_dir(run) / "node-0", series.name, "2-0badcafe")  # a resume from round 2
    assert [r for r, _ in uploads.entries(series)] == [1, 2]


def _digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        sha.update(path.name.encode() + path.read_bytes())
    return sha.hexdigest()


def test_erase_removes_the_users_state_and_log_on_its_device_and_leaves_the_shared_data_alone(
        small_cfg, tmp_path, monkeypatch):
    cfg, run = _kept_run(small_cfg, tmp_path, monkeypatch)
    user = next(u for u, r in _first_rounds(cfg).items() if r == 1 and u < 30)
    (series,) = controls.series_dirs(device_dir(run) / "node-0")
    before = storage.load(series, 4)[2]
    before = {k: np.array(v) for k, v in before.items()}
    shards = _digest(Path(os.environ["FEDREC_SHARD_CACHE"]))
    erase_device(run, str(user))
    after = {k: np.array(v) for k, v in storage.load(series, 4)[2].items()}
    assert after.keys() == before.keys() and {"emb", "bias"} <= after.keys()
    for key in after:  # every entry of the algorithm's user state the device keeps
        assert not after[key][user].any()
        others = np.arange(30) != user
        np.testing.assert_array_equal(after[key][others], before[key][others])
    for base in series.glob("base-r*"):
        assert not np.load(base / "emb.npy")[user].any()
    for delta in series.glob("delta-r*.npz"):
        assert user not in np.load(delta)["positions"]
    assert uploads.of_user(series, user) == [] and controls.read(series.parent)["erased"] == {user}
    assert _digest(Path(os.environ["FEDREC_SHARD_CACHE"])) == shards


def test_forget_without_kept_checkpoints_says_replay_is_impossible_and_what_bounds_the_user(small_cfg, tmp_path,
                                                                                           monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv(ENV_DIR, str(device_dir(run)))
    run_server(InProcessGrid(client_app, 2), dataclasses.replace(small_cfg, rounds=2, out=str(run)))
    with pytest.raises(ConfigError, match="kept no checkpoints.*retrain without the user"):
        forget(run, "3")
    result = CliRunner().invoke(cli, ["forget", "--run", str(run), "--user", "3"])
    assert result.exit_code == 2 and "replay" in result.output and "Traceback" not in result.output
    summary = json.loads((run / "summary.json").read_text())
    summary["privacy"] = {"epsilon": 2.5, "delta": 1e-5}  # what a DP run's summary holds
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ConfigError, match="epsilon 2.5 at delta 1e-05"):
        forget(run, "3")
    assert not controls.read(device_dir(run) / "node-0")["erased"]  # nothing done when nothing can be replayed


@pytest.mark.engine
def test_forget_equals_the_run_that_never_had_the_user(shared_data, tmp_path):
    from fedrec.simulations.federated import simulate

    run = tmp_path / "run"
    cfg = RunConfig(dataset="ml-100k", split="u1", data_dir=str(shared_data), rounds=4, eval_every=4,
                    users_per_round=100, checkpoint_every=1, keep_checkpoints=True, out=str(run))
    first = _first_rounds(cfg, 943)
    index = next(u for u, r in sorted(first.items()) if r == 3)  # first takes part in round 3
    simulate(cfg)
    before = load_model(run)
    user = str(index + 1)  # ML-100K's own user ids are 1..943
    report = forget(run, user, verify=True)
    assert report["from_round"] == 2 and report["rounds_replayed"] == 4 - 2 and report["exact"]
    assert max(report["verify"]["max_abs_diff"].values()) <= 1e-6
    after = load_model(run)
    assert max(float(np.abs(before[k] - after[k]).max()) for k in before) > 1e-4  # the user's influence was there
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["replayed"] == 1 and "replays" not in summary
    (kept,) = [json.loads(line) for line in (checkpoint.kept_dir(run) / "forget-reports.jsonl").open()]
    assert kept["from_round"] == 2 and kept["rounds_replayed"] == 2
    assert checkpoint.excluded(run) == [index] and not list(run.glob("excluded*"))
    assert checkpoint.kept_rounds(run) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("start", [0, 2, 4])
def test_a_replay_from_any_kept_checkpoint_without_changes_ends_where_the_run_ended(small_cfg, tmp_path, monkeypatch,
                                                                                   start):
    cfg, run = _kept_run(small_cfg, tmp_path, monkeypatch, rounds=6, checkpoint_every=2)
    assert checkpoint.kept_rounds(run) == [0, 2, 4, 6]  # the devices kept their state at those rounds too
    before = load_model(run)
    checkpoint.restore_kept(run, start)
    run_server(InProcessGrid(client_app, 2), dataclasses.replace(cfg, resume=str(run)))
    after = load_model(run)
    for name, array in before.items():
        np.testing.assert_array_equal(after[name], array)


def _inprocess(monkeypatch, stop_after: int | None = None):
    """forget's engine, in this process: the same run_server and resume path, on an InProcessGrid."""
    import threading

    from fedrec.server.runner import resumed_config

    def simulate(cfg, say=print, exclude=()):
        cfg = resumed_config(cfg) if cfg.resume else cfg
        monkeypatch.setenv(ENV_DIR, str(device_dir(Path(cfg.out))))
        stop = threading.Event()
        on_round = (lambda row: stop.set() if row["round"] == stop_after else None) if stop_after else None
        return run_server(InProcessGrid(client_app, 2), cfg, on_round, stop=stop, exclude=exclude)

    monkeypatch.setattr("fedrec.personal.forget.simulate", simulate)


def test_a_replay_cut_short_is_finished_by_the_next_forget_and_equals_the_never_had_run(small_cfg, tmp_path,
                                                                                        monkeypatch):
    cfg, run = _kept_run(small_cfg, tmp_path, monkeypatch)
    late = next(u for u, r in _first_rounds(cfg).items() if r == 3)
    _inprocess(monkeypatch, stop_after=3)
    with pytest.raises(ConfigError, match="replay stopped"):
        forget(run, str(late))
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    _inprocess(monkeypatch)
    report = forget(run, str(late), verify=True)
    assert (report["from_round"], report["rounds_replayed"], report["last_round"]) == (3, 1, 4)
    assert max(report["verify"]["max_abs_diff"].values()) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["replayed"] == 1 and "replays" not in summary
    assert not (checkpoint.kept_dir(run) / "replay.json").exists()


@pytest.mark.parametrize("dp", ["central", "local"])
def test_under_dp_forget_erases_the_device_and_does_not_replay(small_cfg, tmp_path, monkeypatch, dp):
    """A replay would release a second model from the other users' data that no accounting covers."""
    cfg, run = _kept_run(small_cfg, tmp_path, monkeypatch, dp=dp, clipping_norm=0.5, noise_multiplier=1.0)
    model, summary = (run / "model.npz").read_bytes(), (run / "summary.json").read_text()
    epsilon = json.loads(summary)["privacy"]["epsilon"]
    result = CliRunner().invoke(cli, ["forget", "--run", str(run), "--user", "3"])
    assert result.exit_code == 0, result.output
    assert "not replayed" in result.output and f"epsilon {epsilon:.4g}" in result.output
    assert ("per user over its own uploads" in result.output) == (dp == "local")
    assert ("not covered: the un-noised evaluation sums" in result.output) == (dp == "local")
    assert (run / "model.npz").read_bytes() == model and (run / "summary.json").read_text() == summary
    device = locate(run, "3")
    assert controls.read(device.root)["erased"] == {device.index}
    assert checkpoint.excluded(run) == []


def test_after_a_forget_the_released_files_do_not_tell_who_was_forgotten(small_cfg, tmp_path, monkeypatch, caplog):
    """One user per node and the public seed: every round's draw is recomputable, so any count of
    replies, bytes or audit lines that dips where the forgotten user is drawn would name it. They
    are withheld in every round; the replay's report stays in the server's kept memory."""
    cfg, run = _kept_run(small_cfg, tmp_path, monkeypatch, nodes=60, users_per_node=1, rounds=3,
                         checkpoint_every=1)
    late = next(u for u, r in _first_rounds(cfg).items() if r == 2)

    def simulate(cfg, say=print, exclude=()):  # forget's engine in this process, one node per user
        from fedrec.server.runner import resumed_config

        return run_server(InProcessGrid(client_app, 60), resumed_config(cfg), exclude=exclude)

    monkeypatch.setattr("fedrec.personal.forget.simulate", simulate)
    caplog.clear()
    assert forget(run, str(late))["rounds_replayed"] == 2
    assert not [r for r in caplog.records if "received" in r.getMessage()]  # Flower's reply counts withheld
    metrics = pd.read_csv(run / "metrics.csv", dtype=str, keep_default_na=False)
    drawn = {r: late in sample_users(60, cfg.users_per_round, cfg.sampling, sampling_rng(cfg, r)) for r in (1, 2, 3)}
    assert set(drawn.values()) == {True, False}  # rounds with and without the user: nothing may tell them apart
    for _, row in metrics.iterrows():
        assert row["users_sampled"] == str(cfg.users_per_round)
        for column in ("nodes_replied", "nodes_failed", "users_failed", "bytes_up", "bytes_down", "train_loss"):
            assert row[column] == "", (column, row["round"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["replayed"] == 1 and "bytes_up" not in summary and "replays" not in summary
    assert not (run / "audit.jsonl").exists() and (checkpoint.kept_dir(run) / "audit.jsonl").is_file()
    released = " ".join(p.read_text(errors="ignore") for p in run.iterdir() if p.suffix in (".json", ".csv", ".toml"))
    assert "from_round" not in released and "excluded" not in released


def test_an_opt_out_after_the_run_leaves_forget_exact(small_cfg, tmp_path, monkeypatch):
    """Consent is not retroactive: the replay trains an opted-out user in the rounds before its
    opt-out, as the run did, so forgetting another user still equals the never-had run."""
    from fedrec.personal.device_view import set_consent

    cfg, run = _kept_run(small_cfg, tmp_path, monkeypatch)
    first = _first_rounds(cfg)
    late = next(u for u, r in first.items() if r == 3)
    early = next(u for u, r in first.items() if r == 1 and u != late)
    set_consent(run, str(early), train=False)
    _inprocess(monkeypatch)
    report = forget(run, str(late), verify=True)
    assert report["exact"] and report["rounds_replayed"] == 2
    assert max(report["verify"]["max_abs_diff"].values()) <= 1e-6
    erase_device(run, str(early))  # erased but not forgotten: it sits out only the rounds a replay redoes
    other = next(u for u, r in first.items() if r == 2 and u not in (late, early))
    assert not forget(run, str(other))["exact"]


def test_a_second_forget_while_one_runs_fails_at_once_and_any_error_is_one_line(small_cfg, tmp_path, monkeypatch):
    import fcntl

    cfg, run = _kept_run(small_cfg, tmp_path, monkeypatch)
    late = next(u for u, r in _first_rounds(cfg).items() if r == 3)
    with open(checkpoint.kept_dir(run) / "forget.lock", "w") as held:  # as a running forget holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another fedrec forget is running on .*; wait for it"):
            forget(run, str(late))
        result = CliRunner().invoke(cli, ["forget", "--run", str(run), "--user", str(late)])
        assert result.exit_code == 2 and "another fedrec forget is running" in result.output
    assert late not in checkpoint.excluded(run)  # the second did nothing

    def failing(device):
        raise PermissionError("node-0")

    with monkeypatch.context() as patch:  # fails before any replay began: nothing to run again for
        patch.setattr("fedrec.personal.forget.erase_on_device", failing)
        result = CliRunner().invoke(cli, ["forget", "--run", str(run), "--user", str(late)])
    assert result.exit_code == 2 and "PermissionError" in result.output and "run it again" not in result.output

    def broken(*args, **kwargs):
        raise FileNotFoundError("checkpoint.npz")

    monkeypatch.setattr("fedrec.personal.forget.simulate", broken)
    result = CliRunner().invoke(cli, ["forget", "--run", str(run), "--user", str(late)])
    assert result.exit_code == 2 and "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2
    assert "FileNotFoundError" in result.output and "run it again to finish" in result.output  # a replay was cut


def test_after_a_forget_no_released_timing_dates_the_replay(small_cfg, tmp_path, monkeypatch):
    """A replay's seconds (summary.json) and the rewritten files' mtimes would bound its start round:
    the forgotten user's first participation."""
    cfg, run = _kept_run(small_cfg, tmp_path, monkeypatch)
    assert "wall_seconds" in json.loads((run / "summary.json").read_text())
    for path in run.rglob("*"):  # files the replay leaves alone would keep the run's older times
        os.utime(path, (1_000_000, 1_000_000))
    _inprocess(monkeypatch)
    assert forget(run, str(next(u for u, r in _first_rounds(cfg).items() if r == 3)))["rounds_replayed"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert not {"wall_seconds", "seconds", "bytes_up"} & set(summary)
    assert len({p.stat().st_mtime for p in run.rglob("*") if p.is_file()}) == 1


def test_consent_and_erasure_wait_for_no_forget_and_an_opt_out_after_a_cut_short_replay_is_not_retroactive(
        small_cfg, tmp_path, monkeypatch):
    """A replay cuts metrics.csv back to its start round: an opt-out read from there would land in the run's past."""
    import fcntl

    from fedrec.personal.device_view import set_consent

    cfg, run = _kept_run(small_cfg, tmp_path, monkeypatch)
    first = _first_rounds(cfg)
    early = next(u for u, r in first.items() if r == 1)
    other = next(u for u in first if u != early)
    with open(checkpoint.kept_dir(run) / "forget.lock", "w") as held:  # as a running forget holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        for act in (lambda: set_consent(run, str(other), train=False), lambda: erase_device(run, str(other))):
            with pytest.raises(ConfigError, match="^a fedrec forget is running on .*; try again when it ends$"):
                act()
    device = locate(run, str(other))
    assert controls.read(device.root) == {"opted-out": set(), "erased": set()}  # neither did anything
    _inprocess(monkeypatch, stop_after=1)
    with pytest.raises(ConfigError, match="replay stopped"):
        forget(run, str(early))
    assert pd.read_csv(run / "metrics.csv")["round"].max() == 1  # the replay cut the run back
    set_consent(run, str(other), train=False)
    assert controls.opt_out_rounds(device.root) == {device.index: cfg.rounds + 1}  # after the run's last round


def test_forget_on_a_real_dp_run_without_kept_checkpoints_erases_says_the_bound_and_that_verify_has_nothing(
        small_cfg, tmp_path, monkeypatch):
    run = tmp_path / "dp"
    cfg = dataclasses.replace(small_cfg, rounds=2, eval_every=2, users_per_round=20, dp="central", clipping_norm=0.5,
                              noise_multiplier=1.0, keep_checkpoints=False, out=str(run))
    monkeypatch.setenv(ENV_DIR, str(device_dir(run)))
    run_server(InProcessGrid(client_app, 2), cfg)
    epsilon = json.loads((run / "summary.json").read_text())["privacy"]["epsilon"]
    result = CliRunner().invoke(cli, ["forget", "--run", str(run), "--user", "3", "--verify"])
    assert result.exit_code == 0, result.output
    assert "not replayed" in result.output and f"epsilon {epsilon:.4g}" in result.output
    assert [line for line in result.output.splitlines() if line.startswith("--verify: nothing to verify")]
    device = locate(run, "3")
    assert controls.read(device.root)["erased"] == {device.index}
