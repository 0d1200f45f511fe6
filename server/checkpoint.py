"""The server's checkpoint: one atomic file from which a run continues as if never stopped.

What it holds: the algorithm's server state (its shared parameters and whatever moves them: an
optimizer's moments, a sampler's chain; fedrec.models.algorithm.ServerState.arrays), the privacy ledger
(rounds trained, each user's participation count, epsilon), the round history and the
run series id the devices key their own saved state by. What it does not hold: random
generator states. Every seeded stream is keyed by (seed, round), so the round number
*is* the state; private streams (DP noise, DP sampling) draw fresh OS entropy and are
never written anywhere, a checkpoint included.

The checkpoint is the server's memory, not a release: it is written beside the run's
outputs while the run is going, and deleted once the run completes. A run that keeps its
checkpoints (--keep-checkpoints) also copies the one of round 0, of every checkpoint round
and of its last round into RUN_DIR.checkpoints/ (beside the run directory, 0700, never
released), with the list of users `fedrec forget` excluded: what a replay starts from.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHECKPOINT = "checkpoint.npz"
FORMAT = 2  # 2: the algorithm's server state as one set of named arrays


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or belongs to another run."""


def new_series() -> str:
    """A run series id: names the devices' saved state of this run (and of its resumptions)."""
    return secrets.token_hex(8)


@dataclass
class Checkpoint:
    round: int  # last round completed
    series: str
    server: dict[str, np.ndarray]  # the algorithm's ServerState.arrays()
    participation: np.ndarray
    rounds_trained: int
    epsilon: float
    history: list[dict]
    bytes_up: int = 0
    bytes_down: int = 0


def save(run_dir: Path, ck: Checkpoint) -> Path:
    return _write(Path(run_dir) / CHECKPOINT, ck)


def _write(path: Path, ck: Checkpoint) -> Path:
    meta = {"format": FORMAT, "round": ck.round, "series": ck.series, "rounds_trained": ck.rounds_trained,
            "epsilon": ck.epsilon, "history": ck.history, "bytes_up": ck.bytes_up, "bytes_down": ck.bytes_down}
    arrays = {f"server.{k}": v for k, v in ck.server.items()}
    arrays["participation"] = ck.participation
    arrays["meta"] = np.frombuffer(json.dumps(meta, default=float).encode(), dtype=np.uint8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)  # a kill leaves the old checkpoint or the new one, never half of one
    return path


def load(run_dir: Path) -> Checkpoint:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {CHECKPOINT}: the run completed (checkpoints are removed then) "
                              "or never reached one; start a new run")
    return _read(path)


def _read(path: Path) -> Checkpoint:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(arrays.pop("meta").tobytes())
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')}; this fedrec reads {FORMAT}")
    return Checkpoint(
        round=int(meta["round"]), series=str(meta["series"]),
        server={k[7:]: v for k, v in arrays.items() if k.startswith("server.")},
        participation=arrays["participation"], rounds_trained=int(meta["rounds_trained"]),
        epsilon=float(meta["epsilon"]), history=list(meta["history"]),
        bytes_up=int(meta.get("bytes_up", 0)), bytes_down=int(meta.get("bytes_down", 0)))


def remove(run_dir: Path) -> None:
    (Path(run_dir) / CHECKPOINT).unlink(missing_ok=True)
    (Path(run_dir) / PROGRESS).unlink(missing_ok=True)


# A DP run's rounds can be released after the last checkpoint and before a crash. Each round
# is recorded here before its messages go out, so a resume accounts for them.
PROGRESS = "progress.npz"


def save_progress(run_dir: Path, round_started: int, participation: np.ndarray | None) -> None:
    arrays = {"round": np.array(round_started)}
    if participation is not None:
        arrays["participation"] = participation
    tmp = run_dir / (PROGRESS + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, run_dir / PROGRESS)


def load_progress(run_dir: Path) -> tuple[int, np.ndarray | None]:
    """(last round whose messages may have gone out, participation after its sampling) or (0, None)."""
    path = Path(run_dir) / PROGRESS
    if not path.is_file():
        return 0, None
    with np.load(path, allow_pickle=False) as data:
        return int(data["round"]), (data["participation"] if "participation" in data.files else None)



# ---------------------------------------------------------------- kept checkpoints (--keep-checkpoints)
def kept_dir(run_dir: Path) -> Path:
    """The server's kept memory of a run: beside its directory, not in it (not a release)."""
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + ".checkpoints")


def _kept_path(run_dir: Path, round_: int) -> Path:
    return kept_dir(run_dir) / f"checkpoint-r{round_:06d}.npz"


def keep(run_dir: Path, ck: Checkpoint) -> Path:
    kept_dir(run_dir).mkdir(mode=0o700, exist_ok=True)
    return _write(_kept_path(run_dir, ck.round), ck)


def kept_rounds(run_dir: Path) -> list[int]:
    folder = kept_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(int(p.stem.split("-r")[1]) for p in folder.glob("checkpoint-r*.npz"))


def load_kept(run_dir: Path, round_: int) -> Checkpoint:
    return _read(_kept_path(run_dir, round_))


def restore_kept(run_dir: Path, round_: int) -> None:
    """Make the kept checkpoint of `round_` the run's checkpoint: `--resume` then continues from it."""
    tmp = Path(run_dir) / (CHECKPOINT + ".tmp")
    shutil.copyfile(_kept_path(run_dir, round_), tmp)
    os.replace(tmp, Path(run_dir) / CHECKPOINT)


EXCLUDED = "excluded.json"


def excluded(run_dir: Path) -> list[int]:
    """Users (global ids) the server leaves out of every round it samples: drawn, then dropped."""
    path = kept_dir(run_dir) / EXCLUDED
    return json.loads(path.read_text()) if path.is_file() else []


def exclude(run_dir: Path, user: int) -> None:
    users = sorted(set(excluded(run_dir)) | {int(user)})
    kept_dir(run_dir).mkdir(mode=0o700, exist_ok=True)
    tmp = kept_dir(run_dir) / (EXCLUDED + ".tmp")
    tmp.write_text(json.dumps(users))
    os.replace(tmp, kept_dir(run_dir) / EXCLUDED)


def forget_kept(run_dir: Path) -> None:
    """A new run's kept memory starts empty (a leftover of an earlier run of that name is not its)."""
    shutil.rmtree(kept_dir(run_dir), ignore_errors=True)
