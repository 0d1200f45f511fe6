"""`fedrec forget`: erase a user on its device and remove its influence from the model by exact replay.

The run must keep its checkpoints (--keep-checkpoints). The user's device erases its state
(device_view.erase_device); the server adds the user to its exclusion list (server memory,
RUN_DIR.checkpoints/, never sent to a device) and replays the federation, through the same
engine and resume machinery as `fedrec simulate --resume`, from the last kept checkpoint
before the user first took part (its participation count there is 0; round 0 always
qualifies) to the run's last round. The excluded user is drawn like everyone and then
dropped, so every other user's randomness (sampling, negatives, initial vectors) is what it
was, and a seeded run ends exactly where a run that never had the user ends. A run whose
noise, sampling or decoys come from OS entropy replays with fresh draws: not the same numbers
as a run without the user, only the same distribution.

The released run must not tell who was forgotten: with users excluded the server withholds
metrics.csv's counts of replies and bytes in every round and its Flower log lines counting
replies, keeps audit.jsonl and the replay's report (start round, rounds, seconds) in its kept
memory (RUN_DIR.checkpoints/), and summary.json says only `replayed: N`. A user erased on its
device (e.g. from the demo page) but not forgotten sits out the replayed rounds only; the
replay is then not exact (the report says why) until `fedrec forget` of that user excludes it.

Under differential privacy (central, local or distributed) forget erases the device and does
not replay: a replay would release a second model from every other user's data, which no
accounting covers; the run's guarantee is what bounds the user's remaining influence.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedrec.client import controls
from fedrec.models.saved import load_model
from fedrec.run.config import ConfigError, RunConfig
from fedrec.run.rundir import write_json
from fedrec.server import checkpoint
from fedrec.simulations.federated import device_dir, simulate

from .device_view import erase_on_device, locate
from .forget_lock import forget_lock, pending_path


def forget(run_dir: Path, user: str, verify: bool = False, say: Callable[[str], None] = print) -> dict:
    """Erase `user` (the data set's own id) on its device and replay the run without it; returns
    {"rounds_replayed", "seconds", "from_round", "last_round", "exact", "note"} (+ "verify")."""
    device = locate(run_dir, user)
    with forget_lock(device.run_dir, device.cfg, exclusive=True):  # a second would race the first's replay
        return _forget(device, user, verify, say)


def _forget(device, user: str, verify: bool, say: Callable[[str], None]) -> dict:
    run_dir, cfg = device.run_dir, device.cfg
    summary = json.loads((run_dir / "summary.json").read_text())
    if cfg.dp != "none":
        return erase_only(device, summary, say, verify)
    pending = pending_path(run_dir)  # a replay cut short (Ctrl-C, a crash): what the run said before it
    if summary.get("status") != "completed" and not pending.is_file():
        raise ConfigError(f"{run_dir} is not a completed run (status {summary.get('status')!r}); "
                          "finish it first (fedrec simulate --resume)")
    rounds = checkpoint.kept_rounds(run_dir)
    if not cfg.keep_checkpoints or 0 not in rounds:
        raise ConfigError(no_replay(summary, run_dir))
    before = json.loads(pending.read_text()) if pending.is_file() else {
        "last": max(rounds), "replayed": summary.get("replayed", 0), "privacy": summary.get("privacy")}
    erase_on_device(device)
    last, start = before["last"], replay_start(run_dir, rounds, device.index)
    checkpoint.exclude(run_dir, device.index)  # before the replay: a crashed replay resumes without the user too
    write_json(pending, before)
    began = time.perf_counter()
    if start < last:
        replay(run_dir, start, say)
    seconds = time.perf_counter() - began
    why = inexact(run_dir, cfg, last)
    report = {"rounds_replayed": last - start, "seconds": round(seconds, 3), "from_round": start,
              "last_round": last, "exact": not why,
              "note": "seeded run: the replay equals a run that never had the user (or anyone forgotten)" if not why
              else "the replay is a run without the user, not equal to a run that never had it: " + "; ".join(why)}
    _record(run_dir, report, before.get("replayed", 0))
    pending.unlink()
    same_mtime(run_dir)
    say(f"erased on its device; replayed rounds {start + 1}..{last} ({report['rounds_replayed']} rounds) in "
        f"{seconds:.1f} s from the checkpoint of round {start}" if start < last else
        "erased on its device; it never took part in training: nothing to replay")
    if verify:
        report["verify"] = never_had(run_dir, cfg, checkpoint.excluded(run_dir), say)
        worst = max(report["verify"]["max_abs_diff"].values())
        say(f"against a run that never had the user: max |difference| {worst:.3g} over every model array"
            + (f" (not expected to be 0: {'; '.join(why)})" if why else ""))
    return report


def inexact(run_dir: Path, cfg: RunConfig, last: int) -> list[str]:
    """Facts that keep a replay from equalling the run that never had the forgotten users (none: exact)."""
    why = [] if reproducible(cfg) else ["its decoys come from OS entropy, drawn afresh"]
    roots, forgotten = list(device_dir(run_dir).glob("node-*")), set(checkpoint.excluded(run_dir))
    if any(controls.read(root)["erased"] - forgotten for root in roots):
        why.append("users erased on their devices but not forgotten sat out the replayed rounds only (the next "
                   "fedrec forget of each removes the rest)")
    if any(since <= last for root in roots for since in controls.opt_out_rounds(root).values()):
        why.append("users who opted out during the run sat out its later rounds, which a run from scratch repeats")
    return why


def erase_only(device, summary: dict, say: Callable[[str], None], verify: bool = False) -> dict:
    """A DP run: erase the device, replay nothing, and say what bounds the user's remaining influence.
    Kept checkpoints do not matter: there is never a replay."""
    cfg = device.cfg
    erase_on_device(device)
    note = (f"erased on its device; the model was not replayed: under {cfg.dp} differential privacy a replay would "
            "release a second model from every other user's data, which no privacy accounting covers; "
            + dp_bound(cfg, summary.get("privacy") or {}))
    say(note)
    if verify:
        say("--verify: nothing to verify, no replay under differential privacy (the model is the run's)")
    return {"rounds_replayed": 0, "seconds": 0.0, "from_round": None, "last_round": summary.get("rounds"),
            "exact": False, "replayed": False, "note": note}


def dp_bound(cfg: RunConfig, privacy: dict) -> str:
    """What bounds a user's remaining influence on a DP run's model, from its summary.json privacy."""
    if "epsilon" not in privacy:
        return "the run's DP guarantee bounds the user's remaining influence (its summary.json records no epsilon)"
    eps = f"epsilon {privacy['epsilon']:.4g} at delta {privacy['delta']:g} (summary.json)"
    if cfg.dp == "local":
        return (f"each of the user's uploads was noised on its device: {eps}, per user over its own uploads, bounds "
                "what the model and the server learned from this user's training uploads; not covered: the "
                "un-noised evaluation sums its device returned (summary.json privacy releases)")
    against = ("; the server saw the user's un-noised uploads" if cfg.dp == "central" else
               "; against the server see epsilon_against_server")
    return f"the run's user-level guarantee, {eps}, bounds the user's remaining influence on the model{against}"


REPORTS = "forget-reports.jsonl"


def same_mtime(run_dir: Path) -> None:
    """Every released file gets the end time: files the replay rewrote would otherwise date from
    its start (model.npz's mtime minus config.toml's is the replay's length: its start round)."""
    now = time.time()
    for path in run_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, (now, now))


def no_replay(summary: dict, run_dir: Path) -> str:
    """Why replay is impossible and what bounds the user's remaining influence."""
    privacy = summary.get("privacy") or {}
    bound = (f"the model bounds the user's influence only by its DP guarantee, epsilon {privacy['epsilon']:.4g} at "
             f"delta {privacy['delta']:g} (summary.json)" if "epsilon" in privacy else
             "without DP nothing bounds the user's influence on the model: retrain without the user")
    return (f"cannot replay {run_dir.name} without the user: it kept no checkpoints (run with --keep-checkpoints); "
            f"{bound}")


def reproducible(cfg: RunConfig) -> bool:
    """Does every random draw of the run come from its seed (so a replay repeats the others' draws)?"""
    return cfg.reproducible_noise or (cfg.dp == "none" and cfg.update_mode != "padded")


def replay_start(run_dir: Path, rounds: list[int], user: int) -> int:
    """The last kept checkpoint before `user` first took part (round 0 if the counts were not kept)."""
    start = 0
    for round_ in rounds:
        counts = checkpoint.load_kept(run_dir, round_).participation
        if round_ > 0 and (not len(counts) or counts[user] > 0):
            break
        start = round_
    return start


def replay(run_dir: Path, from_round: int, say: Callable[[str], None] = print):
    """Continue the run from its kept checkpoint of `from_round` to its last round, replacing
    model.npz, metrics.csv, summary.json and the later kept checkpoints (the server applies its
    exclusion list; devices drop their state after `from_round`, as on any resume)."""
    for later in checkpoint.kept_rounds(run_dir):
        if later > from_round:  # replaced as the replay passes them; none of the old timeline stays
            (checkpoint.kept_dir(run_dir) / f"checkpoint-r{later:06d}.npz").unlink()
    checkpoint.restore_kept(run_dir, from_round)
    outcome = simulate(RunConfig(resume=str(run_dir)), say=say)
    if outcome.status != "completed":
        raise ConfigError(f"the replay stopped ({outcome.status}); run fedrec forget again to finish it")
    return outcome


def never_had(run_dir: Path, cfg: RunConfig, users: list[int], say: Callable[[str], None] = print) -> dict:
    """The run from scratch with `users` (every one forgotten so far) excluded from round 1 (same
    settings and seed, in a temp dir): per model array, the max absolute difference from the run's model."""
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedrec-forget-verify-") as tmp:
        fresh = dataclasses.replace(cfg, out=str(Path(tmp) / "run"), resume="", keep_checkpoints=False)
        outcome = simulate(fresh, exclude=users, say=say)
    replayed, reference = load_model(run_dir), outcome.model
    diffs = {name: float(np.max(np.abs(replayed[name].astype(np.float64) - reference[name])))
             for name in reference}
    return {"max_abs_diff": diffs, "seconds": round(time.perf_counter() - began, 3)}


def _record(run_dir: Path, report: dict, replayed_before: int) -> None:
    """summary.json says only that the model was replaced by a replay (how many so far), never who was
    forgotten; the report (rounds, seconds, start round: they bound the user's first participation)
    goes to the server's kept memory, RUN_DIR.checkpoints/forget-reports.jsonl."""
    with open(checkpoint.kept_dir(run_dir) / REPORTS, "a") as handle:
        handle.write(json.dumps(report) + "\n")
    path = run_dir / "summary.json"
    if not report["rounds_replayed"]:
        return
    summary = json.loads(path.read_text())  # the replay wrote it afresh
    summary.pop("replays", None)
    summary["replayed"] = replayed_before + 1
    write_json(path, summary)
