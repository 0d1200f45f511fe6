"""A device's own log of what it uploaded: per round, the users that trained and the L2 norm
of each one's update before and after clipping (and how many item rows it carried).

Kept only in runs that keep their checkpoints (--keep-checkpoints), where the device's
state outlives the run: it is what the device shows its user ("what left this device").
One small file per round, `uploads-rNNNNNN.npz`, in the run series' directory beside the
state journal; a resume cuts it off with the journal (storage.discard_after). Never sent.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

UPLOADS = re.compile(r"uploads-r(\d{6,})\.npz")
FIELDS = ("users", "norm", "clipped", "rows")


@dataclass(frozen=True)
class Entry:
    round: int
    norm: float  # L2 norm of the user's item-side update before clipping
    clipped: float  # after clipping (== norm without clipping; 0 where clipping failed closed)
    rows: int  # item rows the user's update touched (the rows a one-user upload would carry)


def clipped_norms(norms: np.ndarray, clip_norm: float) -> np.ndarray:
    """The norms after fedrec.models.local.clip_per_user: scaled to a hair under C, 0 where it fails closed."""
    norms = np.asarray(norms, np.float64)
    if clip_norm <= 0:
        return norms
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.minimum(clip_norm * (1 - 1e-6) / np.maximum(norms, 1e-300), 1.0)
    scale = np.where(np.isfinite(norms) & (scale >= 1e-30), scale, 0.0)
    return norms * scale


def record(directory: Path, round_: int, users: np.ndarray, norms: np.ndarray, clip_norm: float,
           rows: np.ndarray) -> None:
    """Log round `round_`'s uploads of `users` (global ids); a round trained again replaces its entry."""
    arrays = {"users": np.asarray(users, np.int64), "norm": np.asarray(norms, np.float64),
              "clipped": clipped_norms(norms, clip_norm), "rows": np.asarray(rows, np.int64)}
    write(directory / f"uploads-r{round_:06d}.npz", arrays)


def write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, path)


def entries(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := UPLOADS.fullmatch(p.name)))


def of_user(directory: Path, user: int) -> list[Entry]:
    """The rounds `user` uploaded in, oldest first."""
    found = []
    for round_, path in entries(directory):
        with np.load(path, allow_pickle=False) as data:
            at = np.flatnonzero(data["users"] == user)
            if len(at):
                i = at[0]
                found.append(Entry(round_, float(data["norm"][i]), float(data["clipped"][i]), int(data["rows"][i])))
    return found


def forget_user(directory: Path, user: int) -> None:
    """Remove `user`'s entries from every round's log."""
    for _, path in entries(directory):
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in FIELDS}
        keep = arrays["users"] != user
        if not keep.all():
            write(path, {k: v[keep] for k, v in arrays.items()})
