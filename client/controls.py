"""A device's own controls over its users: consent to train, and erasure.

They live in the device's root directory (its state-dir, or a simulated device's disk), in
`controls.json`, outside any run series: they outlive a run's resumptions and a replay.
The server is never told. From the round its opt-out applies to (consent is not retroactive:
a replay of earlier rounds trains the user as before), an opted-out user is left out like a
device that dropped out: no training reply carries its update (the node's weight counts only
the users that trained; under distributed DP it still adds its noise share) and no evaluation
sums include it; it still gets recommendations on the device. An erased user neither trains
nor evaluates again, in any round. A node whose every user is held back fails the evaluation
message as a dead device does (a one-user device that opted out fails whenever asked); a cohort
node's evaluation weight drops by its held-back users: the server learns how many, not which.
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


def _load(root: Path | None) -> dict:
    path = Path(root) / CONTROLS if root else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def read(root: Path | None) -> dict[str, set[int]]:
    """{"opted-out": users, "erased": users} (global ids) of the device at `root`."""
    data = _load(root)
    return {key: {int(u) for u in data.get(key, [])} for key in ("opted-out", "erased")}


def opt_out_rounds(root: Path | None) -> dict[int, int]:
    """Per opted-out user, the first round its opt-out applies to (0: every round)."""
    data = _load(root)
    since = data.get("opted-out-from", {})
    return {int(u): int(since.get(str(u), 0)) for u in data.get("opted-out", [])}


def withheld(root: Path | None, users: np.ndarray, round_: int | None = None) -> np.ndarray:
    """Per user, whether the device keeps it out of round `round_` (training and evaluation):
    erased, or opted out from that round or earlier (round_ None: opted out at all)."""
    data = read(root)
    out = data["erased"] | {u for u, r in opt_out_rounds(root).items() if round_ is None or round_ >= r}
    if not out:
        return np.zeros(len(users), bool)
    return np.isin(np.asarray(users, np.int64), np.fromiter(out, np.int64))


def _write(root: Path, controls: dict[str, set[int]], since: dict[int, int]) -> None:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = root / f".{CONTROLS}.{secrets.token_hex(4)}.tmp"
    data = {k: sorted(v) for k, v in controls.items()}
    data["opted-out-from"] = {str(u): r for u, r in sorted(since.items()) if u in controls["opted-out"]}
    tmp.write_text(json.dumps(data))
    os.replace(tmp, root / CONTROLS)


def set_training(root: Path, user: int, train: bool, from_round: int = 0) -> None:
    """The user's consent to train (False: opted out from round `from_round` on; 0: every round),
    recorded on its device."""
    controls, since = read(root), opt_out_rounds(root)
    if user in controls["erased"]:
        raise ValueError("erased on its device, it takes no part any more")
    (controls["opted-out"].discard if train else controls["opted-out"].add)(user)
    if not train:
        since[user] = int(from_round)
    _write(root, controls, since)


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
    _write(root, controls, opt_out_rounds(root))


def series_dirs(root: Path) -> list[Path]:
    """The run series directories a device root holds (storage.series_dir names them)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if re.fullmatch(r"[0-9a-f]{16}", p.name) and (p / "owner.json").is_file())
