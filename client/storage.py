"""What a device keeps on its own disk: its users' private state, one snapshot per round it trained.

Flower's context.state lasts one run, in one process. A device that should survive its
own restart, or carry on when the server resumes a run from a checkpoint (a new run to
Flower), keeps its state in `state-dir` from its node config (deployment) or in the
directory the simulation driver gave it ($FEDREC_DEVICE_STATE_DIR: the simulated
devices' disks). The server never chooses that path; it sends only the run series id,
checked to be 16 hex digits, which names the subdirectory.

Snapshots are tagged with the round after which they were taken. A device asked to train
round r starts from its newest snapshot before r, to evaluate round r from the newest at
or before r: after a resume from round R's checkpoint, the snapshots of the rounds after R
that the interrupted run got to are ignored, then overwritten.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from flwr.app import Context

ENV_DIR = "FEDREC_DEVICE_STATE_DIR"
_SNAPSHOT = re.compile(r"state-r(\d{6,})\.npz")


def state_root(context: Context) -> Path | None:
    """This node's own storage: node config `state-dir`, else the simulation driver's directory."""
    if "state-dir" in context.node_config:
        return Path(str(context.node_config["state-dir"])).expanduser()
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]) / f"node-{context.node_config.get('partition-id', 0)}"
    return None


def _series_dir(root: Path, series: str) -> Path:
    if not re.fullmatch(r"[0-9a-f]{16}", series):
        raise ValueError(f"run series id {series!r} is not 16 hex digits")  # never a path the server picked
    return root / series


def save_snapshot(root: Path, series: str, round_: int, arrays: dict[str, np.ndarray], keep_from: int) -> None:
    """Write the state after `round_`; drop snapshots no resume can need (older than the newest
    one at or before `keep_from`, the server's last checkpoint round)."""
    directory = _series_dir(root, series)
    if round_ < 0:
        raise ValueError(f"round {round_} is negative")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"state-r{round_:06d}.npz"
    tmp = directory / f".{path.name}.tmp"
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, path)
    steps = rounds_taken(root, series)
    if "step" in arrays:
        steps = (arrays["step"] if steps is None or len(steps) != len(arrays["step"])
                 else np.maximum(steps, arrays["step"]))
        np.save(directory / ".steps.tmp.npy", steps)
        os.replace(directory / ".steps.tmp.npy", directory / "steps.npy")
    rounds = _rounds(directory)
    floor = max((r for r in rounds if r <= keep_from), default=None)
    for r in rounds:
        if floor is not None and r < floor:
            (directory / f"state-r{r:06d}.npz").unlink(missing_ok=True)


def discard_after(root: Path, series: str, resumed: str) -> None:
    """A resumed run ("<round>-<session>") restarts after <round>: snapshots of later rounds
    belong to the timeline the crash cut off and must not be loaded (under DP its sampling is
    not redone identically). Once per resumed session, so a device restarting later in the
    same session keeps what it has saved since."""
    match = re.fullmatch(r"(\d+)-([0-9a-f]{8})", resumed)
    if not match:
        raise ValueError(f"resumed-from {resumed!r} is not <round>-<8 hex digits>")
    directory = _series_dir(root, series)
    marker = directory / f"resumed-{match.group(2)}"
    if marker.exists():
        return
    for r in _rounds(directory):
        if r > int(match.group(1)):
            (directory / f"state-r{r:06d}.npz").unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    marker.touch()


def rounds_taken(root: Path, series: str) -> np.ndarray | None:
    """Per user, the most local steps the device ever saved: never goes back on a resume, so the
    participation cap holds across crashes."""
    path = _series_dir(root, series) / "steps.npy"
    return np.load(path, allow_pickle=False) if path.is_file() else None


def load_snapshot(root: Path, series: str, up_to: int) -> dict[str, np.ndarray] | None:
    """The newest state saved after a round <= up_to, or None."""
    directory = _series_dir(root, series)
    candidates = [r for r in _rounds(directory) if r <= up_to]
    if not candidates:
        return None
    with np.load(directory / f"state-r{max(candidates):06d}.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _rounds(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _SNAPSHOT.fullmatch(p.name)))
