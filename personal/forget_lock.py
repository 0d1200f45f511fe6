"""The forget lock and the replay state, shared by `fedrec forget` and the device controls.

A forget holds RUN_DIR.checkpoints/forget.lock exclusively for the whole of its erasure and
replay; a device's consent or erasure holds it shared, so neither lands in the middle of a
replay (which cuts metrics.csv back to its start round: an opt-out read from there would be
recorded inside the run's past, retroactive, and would change the replay).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path

import pandas as pd

from fedrec.run.config import ConfigError, RunConfig
from fedrec.server import checkpoint


def pending_path(run_dir: Path) -> Path:
    """Written while a replay runs: the run's last round, replays so far and privacy before it."""
    return checkpoint.kept_dir(run_dir) / "replay.json"


@contextlib.contextmanager
def forget_lock(run_dir: Path, cfg: RunConfig, exclusive: bool):
    """Exclusive: one forget at a time. Shared: no forget running (fails at once if one is)."""
    kept = checkpoint.kept_dir(run_dir)
    if not cfg.keep_checkpoints or not (exclusive or kept.is_dir()):  # nothing to replay: no forget to wait for
        yield
        return
    kept.mkdir(mode=0o700, exist_ok=True)
    with open(kept / "forget.lock", "a") as lock:
        try:
            fcntl.flock(lock, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another fedrec forget is running on {run_dir}; wait for it" if exclusive else
                              f"a fedrec forget is running on {run_dir}; try again when it ends") from None
        yield  # the lock goes with the file's closing, also when the process dies


def last_round(run_dir: Path) -> int:
    """The run's last round: from the replay state while a replay is pending (it cut metrics.csv
    back), else metrics.csv's (0 for none; a central run counts epochs, not rounds)."""
    pending = pending_path(run_dir)
    if pending.is_file():
        return int(json.loads(pending.read_text())["last"])
    metrics = run_dir / "metrics.csv"
    frame = pd.read_csv(metrics) if metrics.is_file() and metrics.stat().st_size else pd.DataFrame()
    return int(frame["round"].max()) if "round" in frame and len(frame) else 0
