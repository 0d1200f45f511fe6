"""The round loop and the run directory's life: status from the start, a metrics row as each
round ends, checkpoints, a clean stop on request.

Flower's Strategy.start runs rounds 1..N with no way to start later, stop between rounds
or save state, so fedrec drives the same configure/aggregate calls itself.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedrec.run import schema
from fedrec.run.rundir import RunWriter

from . import checkpoint
from .federation import Federation

# metrics.csv columns of a run without DP (a DP run keeps DP_ROUND_KEYS and the evaluation metrics)
ROUND_COLUMNS = ("round", "users_sampled", "nodes_replied", "nodes_failed", "nodes_rejected", "users_failed",
                 "users_unreachable", "skipped", "replies_scaled", "train_loss", "bytes_up", "bytes_down", "seconds")
WAIT_FOREVER = 3600.0  # round-timeout 0: Flower's own default wait


class Interrupted(Exception):
    """The run was asked to stop (Ctrl-C, SIGTERM); its last completed round is checkpointed."""


@dataclass
class RunState:
    """Where a run is: what the directory says about it while it goes."""

    out: RunWriter
    summary: dict  # the parts of summary.json known from the start
    series: str
    last_round: int = 0  # last round completed
    resumed_from: int | None = None  # the checkpoint round this session started from
    session: str = field(default_factory=lambda: secrets.token_hex(4))  # this process's run of the series

    @property
    def run_dir(self) -> Path:
        return self.out.path

    def device_config(self, config: ConfigRecord) -> ConfigRecord:
        """`config` plus what every message of this session tells the devices about their saved
        state: the series, and after a resume the checkpoint round with this session's token
        (devices drop the cut-off timeline once per session, before any train or evaluation)."""
        config = ConfigRecord(dict(config))
        config[schema.SERIES] = self.series
        if self.resumed_from is not None:
            config[schema.RESUMED_FROM] = f"{self.resumed_from}-{self.session}"
        return config

    def status(self, status: str, **extra) -> None:
        self.out.write_summary({"status": status, **self.summary, **extra})


def save_checkpoint(state: RunState, federation: Federation, keep: bool = False, write: bool = True) -> None:
    """The run's checkpoint (`write`) and, with `keep`, a kept copy (RUN_DIR.checkpoints/)."""
    private = federation.privacy is not None
    ck = checkpoint.Checkpoint(
        round=state.last_round, series=state.series, server=federation.state.arrays(),
        participation=_participation(federation),
        rounds_trained=federation.rounds_trained, epsilon=federation.epsilon, history=federation.history,
        bytes_up=0 if private else federation.bytes_up, bytes_down=0 if private else federation.bytes_down)
    if write:
        checkpoint.save(state.run_dir, ck)
    if keep:
        checkpoint.keep(state.run_dir, ck)


def _participation(federation: Federation) -> np.ndarray:
    """Who took part how often: kept only where the privacy accounting needs it (the local and
    distributed participation cap), since it tells who was sampled."""
    if federation.privacy is not None and not federation.privacy.max_rounds:
        return np.zeros(0, np.int64)
    return federation.participation


def restore(federation: Federation, saved: checkpoint.Checkpoint, run_dir: Path) -> None:
    federation.state.load(saved.server)
    if len(saved.participation) not in (0, len(federation.participation)):
        raise checkpoint.CheckpointError("the checkpoint's population differs from the federation's; "
                                         "resume against the same data set and nodes")
    if len(saved.participation):
        federation.participation[:] = saved.participation
    federation.rounds_trained, federation.epsilon = saved.rounds_trained, saved.epsilon
    started, participation = checkpoint.load_progress(run_dir)
    if federation.privacy is not None and started > saved.round:
        # Rounds the interrupted run sent out after its checkpoint were released: account them.
        federation.rounds_trained += started - saved.round
        if participation is not None:
            np.maximum(federation.participation, participation, out=federation.participation)
        federation.epsilon = federation.epsilon_after(federation.rounds_trained, int(federation.participation.max()))
    federation.history = list(saved.history)
    federation.bytes_up, federation.bytes_down = saved.bytes_up, saved.bytes_down


def run_rounds(grid: Grid, federation: Federation, config: ConfigRecord, state: RunState,
               stop: threading.Event | StopRequest | None) -> None:
    """Rounds last_round+1 .. cfg.rounds; checkpoints every cfg.checkpoint_every rounds.
    Raises Interrupted between rounds once `stop` is set."""
    cfg = federation.cfg
    timeout = cfg.round_timeout or WAIT_FOREVER
    config = state.device_config(config)
    for server_round in range(state.last_round + 1, cfg.rounds + 1):
        if stop is not None and stop.is_set():
            raise Interrupted(f"stopped after round {state.last_round}")
        config[schema.CHECKPOINT_ROUND] = _last_checkpoint(state.last_round, cfg.checkpoint_every)
        log(INFO, "[ROUND %s/%s]", server_round, cfg.rounds)
        federation.begin_round(server_round)
        messages = federation.configure_train(server_round, config, grid)
        if federation.privacy is not None:  # before anything goes out: a crash from here on is accounted
            checkpoint.save_progress(state.run_dir, server_round,
                                     federation.participation if federation.privacy.max_rounds else None)
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        log(INFO, "round %s: received %s train replies", server_round, len(replies))  # withheld under DP
        federation.aggregate_train(server_round, replies)
        evaluations = federation.configure_evaluate(server_round, config, grid)
        if evaluations:
            federation.aggregate_evaluate(server_round, grid.send_and_receive(evaluations, timeout=timeout))
        federation.finish_round()  # its row goes to metrics.csv (on_round) before the checkpoint below
        state.last_round = server_round
        if cfg.checkpoint_every and server_round % cfg.checkpoint_every == 0 and server_round < cfg.rounds:
            save_checkpoint(state, federation, keep=cfg.keep_checkpoints)


def _last_checkpoint(last_round: int, every: int) -> int:
    """The round of the newest checkpoint the server holds (devices keep state back to it)."""
    return last_round - last_round % every if every else 0


class StopRequest:
    """A request to stop after the current round, made in this process (`set()`) or by another
    one: fedrec's simulate() runs the ServerApp in Flower's flwr-simulation process and asks it
    to stop by creating `path`, which run_rounds looks for between rounds."""

    def __init__(self, path: Path | None = None):
        self.path, self._event = path, threading.Event()

    def set(self) -> None:
        self._event.set()
        if self.path is not None and self.path.parent.is_dir():  # else the caller sets it again once it is
            self.path.touch()

    def is_set(self) -> bool:
        return self._event.is_set() or (self.path is not None and self.path.exists())


@contextmanager
def stop_on_signals(stop: threading.Event | StopRequest, say=print, at_once=None):
    """First Ctrl-C or SIGTERM: finish the current round, checkpoint, end (exit 130 in the CLI).
    A second one: `at_once()` (e.g. end the engine's processes), then leave without a traceback.
    Only the main thread may install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.is_set():
            say("stopping now, without a checkpoint of the round in progress")
            if at_once is not None:
                at_once()
            os._exit(130)
        stop.set()
        say("stopping after this round and saving a checkpoint (Ctrl-C again to stop at once)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
