"""What a device keeps on its own disk: its users' private state, as a base and a journal.

Flower's context.state lasts one run, in one process, and in simulation it travels with
every message: too heavy for a node hosting 500,000 users. A device with a disk keeps its
state in `state-dir` from its node config (deployment) or in the directory the simulation
driver gave it ($FEDREC_DEVICE_STATE_DIR: the simulated devices' disks). The server never
chooses that path; it sends only the run series id, checked to be 16 hex digits, which
names the subdirectory.

Layout of `<root>/<series>/`: `base-rNNNNNN-<id>/` holds every hosted user's state after
round N (N = 0: the starting state); `delta-rNNNNNN-<id>.npz` holds the rows of the users
that trained in round N. The state after round r is the newest base at or before r plus
the deltas after it up to r, so a round writes what it changed, not the whole population.
A delta that the server's last checkpoint has passed is folded into a new base; a run that
keeps its checkpoints (--keep-checkpoints) keeps the older bases too, so the state at each
checkpoint round stays (what `fedrec forget` replays from). After a resume from round R,
bases, deltas and upload-log entries (uploads.py) of later rounds (the cut-off timeline)
are deleted.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path

import numpy as np
from flwr.app import Context

from .uploads import UPLOADS

ENV_DIR = "FEDREC_DEVICE_STATE_DIR"
ROUNDS = "rounds"  # the state entry counting each user's rounds (fedrec.privacy.device): the participation cap
_BASE = re.compile(r"base-r(\d{6,})-([0-9a-f]{8})")
_DELTA = re.compile(r"delta-r(\d{6,})-([0-9a-f]{8})\.npz")


def state_root(context: Context) -> Path | None:
    """This node's own storage: node config `state-dir`, else the simulation driver's directory."""
    if "state-dir" in context.node_config:
        return Path(str(context.node_config["state-dir"])).expanduser()
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]) / f"node-{context.node_config.get('partition-id', 0)}"
    return None


def series_dir(root: Path, series: str) -> Path:
    if not re.fullmatch(r"[0-9a-f]{16}", series):
        raise ValueError(f"run series id {series!r} is not 16 hex digits")  # never a path the server picked
    return root / series


def claim(directory: Path, owner: dict) -> None:
    """Tie a series directory to the users whose state it holds (first user, count): two
    SuperNodes sharing a state-dir, or a node given another shard, must not load each
    other's vectors. The directory and its parent are the device's own: mode 0700."""
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / "owner.json"
    if path.is_file():
        if json.loads(path.read_text()) != owner:
            raise ValueError(f"the device state in {directory} belongs to other users ({path.read_text()}); "
                             "give each SuperNode its own state-dir")
        return
    path.write_text(json.dumps(owner))


def save_base(directory: Path, round_: int, arrays: dict[str, np.ndarray]) -> str:
    """Write every hosted user's state after `round_`; returns the entry's name."""
    if round_ < 0:
        raise ValueError(f"round {round_} is negative")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = f"base-r{round_:06d}-{secrets.token_hex(4)}"
    tmp = directory / f".{name}.tmp"
    tmp.mkdir()
    for key, value in arrays.items():  # the algorithm's state entries, whatever they are
        np.save(tmp / f"{key}.npy", value, allow_pickle=False)
    os.replace(tmp, directory / name)
    for old in _entries(directory, _BASE):  # one base per round
        if old[0] == round_ and old[2] != name:
            _remove(directory / old[2])
    return name


def save_delta(directory: Path, round_: int, positions: np.ndarray, rows: dict[str, np.ndarray],
               keep_from: int, keep_bases: bool = False) -> str:
    """Write the rows of the users at `positions` after `round_`; returns the entry's name.
    Folds deltas the server's last checkpoint (`keep_from`) has passed into a new base (and
    deletes older bases unless `keep_bases`: each is the state at a checkpoint round)."""
    if round_ < 1:
        raise ValueError(f"round {round_} is not a training round")
    name = f"delta-r{round_:06d}-{secrets.token_hex(4)}.npz"
    tmp = directory / f".{name}.tmp"
    with open(tmp, "wb") as handle:
        np.savez(handle, positions=positions, **rows)
    os.replace(tmp, directory / name)
    for old_round, _, old in _entries(directory, _DELTA):  # a round trained again replaces its delta
        if old_round == round_ and old != name:
            _remove(directory / old)
    _update_steps(directory, positions, rows[ROUNDS])
    _compact(directory, keep_from, keep_bases)
    return name


def load(directory: Path, up_to: int, have: tuple[int, str, dict] | None = None):
    """The state after round `up_to` as (round, entry name, arrays), or None without a base.
    `have` = (round, entry, arrays) a process already holds: reused (deltas applied on top,
    in place) if its entry is still on disk and not after `up_to`."""
    bases = [b for b in _entries(directory, _BASE) if b[0] <= up_to]
    if not bases:
        return None
    deltas = [d for d in _entries(directory, _DELTA) if d[0] <= up_to]
    current = have if have and have[0] <= up_to and (directory / have[1]).exists() else None
    if current is None:
        round_, _, name = max(bases)
        # copy-on-write map: a process reads (and privately changes) only the users it touches,
        # so a node's state is not read whole each time another engine worker takes the node over
        current = (round_, name, {p.stem: np.load(p, mmap_mode="c", allow_pickle=False)
                                  for p in sorted((directory / name).glob("*.npy"))})
    round_, name, arrays = current
    for delta_round, _, delta in sorted(deltas):
        if delta_round > round_:
            with np.load(directory / delta, allow_pickle=False) as data:
                for key in data.files:
                    if key != "positions":
                        arrays[key][data["positions"]] = data[key]
            round_, name = delta_round, delta
    return round_, name, arrays


def discard_after(root: Path, series: str, resumed: str) -> None:
    """A resumed run ("<round>-<session>") restarts after <round>: entries of later rounds
    belong to the timeline the crash cut off and must not be loaded (under DP its sampling is
    not redone identically). Once per resumed session, so a device restarting later in the
    same session keeps what it has saved since."""
    match = re.fullmatch(r"(\d+)-([0-9a-f]{8})", resumed)
    if not match:
        raise ValueError(f"resumed-from {resumed!r} is not <round>-<8 hex digits>")
    directory = series_dir(root, series)
    marker = directory / f"resumed-{match.group(2)}"
    if marker.exists():
        return
    for pattern in (_BASE, _DELTA, UPLOADS):
        for round_, _, name in _entries(directory, pattern):
            if round_ > int(match.group(1)):
                _remove(directory / name)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    marker.touch()


def rounds_taken(directory: Path) -> np.ndarray | None:
    """Per user, the most rounds the device ever saved it took part in: never goes back on a resume, so
    the participation cap holds across crashes."""
    path = directory / "steps.npy"
    return np.load(path, allow_pickle=False) if path.is_file() else None


def _update_steps(directory: Path, positions: np.ndarray, steps: np.ndarray) -> None:
    path = directory / "steps.npy"
    if not path.is_file():
        return  # written with the first base
    counts = np.load(path, allow_pickle=False)
    counts[positions] = np.maximum(counts[positions], steps)
    np.save(directory / ".steps.tmp.npy", counts)
    os.replace(directory / ".steps.tmp.npy", path)


def start_steps(directory: Path, steps: np.ndarray) -> None:
    """The cap's counts begin with the first base (kept across resumes: never lowered)."""
    path = directory / "steps.npy"
    counts = steps if not path.is_file() else np.maximum(np.load(path, allow_pickle=False), steps)
    np.save(directory / ".steps.tmp.npy", counts)
    os.replace(directory / ".steps.tmp.npy", path)


def _compact(directory: Path, keep_from: int, keep_bases: bool = False) -> None:
    """Fold the deltas up to the newest one at or before `keep_from` into a new base: no resume
    can go back further than the server's last checkpoint (unless it keeps them all: then the
    older bases stay, one per checkpoint passed, and the state at any kept checkpoint round is
    its newest base at or before that round plus the deltas after it)."""
    base_round = max((b[0] for b in _entries(directory, _BASE)), default=None)
    floor = max((d[0] for d in _entries(directory, _DELTA) if d[0] <= keep_from), default=None)
    if base_round is None or floor is None or floor <= base_round:
        return
    round_, _, arrays = load(directory, floor)
    save_base(directory, round_, arrays)
    for b_round, _, name in _entries(directory, _BASE):
        if b_round < round_ and not keep_bases:
            _remove(directory / name)
    for d_round, _, name in _entries(directory, _DELTA):
        if d_round <= round_:
            _remove(directory / name)


def erase_position(directory: Path, position: int) -> None:
    """Zero the state rows of the user at `position` in every base, drop them from every
    delta, and zero its step count: nothing of its private state is left in the journal."""
    for _, _, name in _entries(directory, _BASE):
        for path in sorted((directory / name).glob("*.npy")):
            array = np.load(path, mmap_mode="r+", allow_pickle=False)
            array[position] = 0
            array.flush()
            del array
    for _, _, name in _entries(directory, _DELTA):
        with np.load(directory / name, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        keep = arrays["positions"] != position
        if not keep.all():
            tmp = directory / f".{name}.tmp"
            with open(tmp, "wb") as handle:
                np.savez(handle, **{k: v[keep] for k, v in arrays.items()})
            os.replace(tmp, directory / name)
    steps = rounds_taken(directory)
    if steps is not None and position < len(steps):
        steps[position] = 0
        np.save(directory / ".steps.tmp.npy", steps)
        os.replace(directory / ".steps.tmp.npy", directory / "steps.npy")


def _remove(path: Path) -> None:
    """Renamed out of the journal first (a name the loader ignores), then deleted: what a
    failed or partial delete leaves behind is never taken for a base or a delta."""
    hidden = path.with_name(f".removed-{secrets.token_hex(4)}-{path.name}")
    try:
        os.replace(path, hidden)
    except FileNotFoundError:
        return
    shutil.rmtree(hidden, ignore_errors=True) if hidden.is_dir() else hidden.unlink(missing_ok=True)


def _entries(directory: Path, pattern: re.Pattern) -> list[tuple[int, str, str]]:
    """(round, id, name) of the bases or deltas (or upload-log entries: no id) in `directory`."""
    if not directory.is_dir():
        return []
    return sorted((int(m.group(1)), m.group(2) if pattern.groups > 1 else "", p.name) for p in directory.iterdir()
                  if (m := pattern.fullmatch(p.name)))
