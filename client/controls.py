"""A device's own controls over its users: consent to train, and erasure.

They live in the device's root directory (its state-dir, or a simulated device's disk), in
`controls.json`, outside any run series: they outlive a run's resumptions and a replay.
The server is never told. A user who opted out is left out of training like a device that
dropped out (no reply carries its update; the node's weight counts only the users that
trained) and still evaluates and gets recommendations; an erased user neither trains nor
evaluates again.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

import numpy as np

from . import uploads
from .storage import erase_position

CONTROLS = "controls.json"


def read(root: Path | None) -> dict[str, set[int]]:
    """{"opted-out": users, "erased": users} (global ids) of the device at `root`."""
    path = Path(root) / CONTROLS if root else None
    if path is None or not path.is_file():
        return {"opted-out": set(), "erased": set()}
    data = json.loads(path.read_text())
    return {key: {int(u) for u in data.get(key, [])} for key in ("opted-out", "erased")}


def withheld(root: Path | None, users: np.ndarray, training: bool = True) -> np.ndarray:
    """Per user, whether the device keeps it out: of training (opted out or erased) or, with
    training=False, of evaluation (erased)."""
    controls = read(root)
    out = controls["erased"] | (controls["opted-out"] if training else set())
    if not out:
        return np.zeros(len(users), bool)
    return np.isin(np.asarray(users, np.int64), np.fromiter(out, np.int64))


def _write(root: Path, controls: dict[str, set[int]]) -> None:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = root / f".{CONTROLS}.{secrets.token_hex(4)}.tmp"
    tmp.write_text(json.dumps({k: sorted(v) for k, v in controls.items()}))
    os.replace(tmp, root / CONTROLS)


def set_training(root: Path, user: int, train: bool) -> None:
    """The user's consent to train (False: opted out), recorded on its device."""
    controls = read(root)
    if user in controls["erased"]:
        raise ValueError("erased on its device, it takes no part any more")
    (controls["opted-out"].discard if train else controls["opted-out"].add)(user)
    _write(root, controls)


def erase(root: Path, user: int) -> None:
    """Erase `user` on its device: its rows of private state (vector, bias, optimizer moments,
    steps) in every base and delta of every run series, its upload-log entries and its consent
    flag; then mark it erased, so the device never trains or evaluates it again. The user's
    ratings are not touched here: a real device deletes its own, a simulated one reads them
    from the data set's shared shard cache, which other runs use."""
    root = Path(root)
    for directory in series_dirs(root):
        owner = json.loads((directory / "owner.json").read_text())
        position = user - int(owner["first_user"])
        if 0 <= position < int(owner["num_users"]):
            erase_position(directory, position)
            uploads.forget_user(directory, user)
    controls = read(root)
    controls["opted-out"].discard(user)
    controls["erased"].add(user)
    _write(root, controls)


def series_dirs(root: Path) -> list[Path]:
    """The run series directories a device root holds (storage.series_dir names them)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if re.fullmatch(r"[0-9a-f]{16}", p.name) and (p / "owner.json").is_file())
