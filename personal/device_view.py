"""One device's side of a finished simulated run: what it stores, what it uploaded, its controls.

What a phone would show its user, read from where the simulation keeps each device's disk
(RUN_DIR.devices/node-P/, see fedrec.client.storage): its ratings (the run's data), its
private vector and bias (the device state a run with --keep-checkpoints keeps, else re-fitted
on the device from its ratings and the global model by the run's algorithm), its own upload log
and consent flags. `set_consent` and `erase_device` act on that device only; the server is
never told (fedrec.client.controls).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.client import controls, storage, uploads
from fedrec.datasets import cohort
from fedrec.models.algorithm import Statistic
from fedrec.privacy.device import ROUNDS, new_users
from fedrec.privacy.secagg import COUNT, secure_order
from fedrec.privacy.upload import ITEM_INDEX
from fedrec.run import finished
from fedrec.run.build import load_data, num_nodes
from fedrec.run.config import ConfigError, RunConfig
from fedrec.server import checkpoint
from fedrec.server.validation import train_array_names
from fedrec.simulations.federated import device_dir

from .device_sent import also_sent
from .forget_lock import forget_lock, last_round
from .model import run_model

FROM_STATE = "device state of the run"
REFITTED = "re-fitted on the device (the run kept no device state)"
NEVER_TRAINED = "re-fitted on the device (this user never trained in the run)"
ERASED = "erased on the device"
NOISE = {"none": "none", "central": "central (added by the server to the sum)",
         "local": "local (added on this device)", "distributed": "distributed (a share added on this device)"}
USER_SIDE = {"emb": "user vector", "bias": "user bias"}  # the user state the family names (fedrec.models.factors)


@dataclass
class Upload:
    round: int
    arrays: list[tuple[str, tuple[int, ...], int]]  # (name, shape, bytes) of what this user's update carried
    norm: float  # L2 norm of the user's update before clipping
    clipped_norm: float  # after clipping (== norm when no clipping)
    noise: str
    secure_aggregation: bool
    epsilon: float | None  # privacy budget spent by this user after this round (None: no DP)


@dataclass
class DeviceView:
    user: str
    ratings: list[tuple[str, float]]
    vector: np.ndarray
    bias: float
    vector_source: str
    bytes_stored: int
    uploads: list[Upload]
    epsilon: float | None
    never_uploaded: list[str]  # the ratings and every entry of the user's private state
    audit_evidence: str
    opted_out: bool
    erased: bool
    also_sent: list[str] = field(default_factory=list)  # what else left the device (device_sent.also_sent)


@dataclass(frozen=True)
class Device:
    """Where a user of a run lives: the run's settings and data, its global id, its device's disk."""

    run_dir: Path
    cfg: RunConfig
    index: int  # the user's global id (row of the data set)
    root: Path  # the simulated device's disk: RUN_DIR.devices/node-P

    @property
    def split(self):
        return load_data(self.cfg)


def locate(run_dir: Path, user: str) -> Device:
    """The device of `user` (the data set's own id) in the run at `run_dir`; ConfigError if none."""
    run_dir = finished.locate(Path(run_dir).expanduser().resolve(), "federated or compare").run
    cfg = RunConfig.from_toml(run_dir / "config.toml")
    split = load_data(cfg)
    ids = split.user_ids if split.user_ids is not None else np.arange(split.n_users)
    match = np.flatnonzero(ids.astype(str) == str(user).strip())
    if not len(match):
        raise ConfigError(f"unknown user {user!r}: {cfg.dataset} has users {ids[0]}..{ids[-1]} ({len(ids)} of them)")
    index = int(match[0])
    # the simulation's shards: contiguous shares of the users (fedrec.run.build.ensure_shards)
    bounds = np.linspace(0, split.n_users, num_nodes(cfg, split.n_users) + 1).round().astype(np.int64)
    node = int(np.searchsorted(bounds, index, side="right") - 1)
    return Device(run_dir, cfg, index, device_dir(run_dir) / f"node-{node}")


def _own_dir(device: Device) -> Path:
    device.root.parent.mkdir(mode=0o700, exist_ok=True)  # the devices' disks are private (0700)
    return device.root


def set_consent(run_dir: Path, user: str, train: bool) -> None:
    """Record on the user's device whether it may train. An opt-out applies from the round after
    the device's latest (the run's last) and is not retroactive: a forget replay of earlier rounds
    trains the user as the run did. From then on nothing of the user leaves the device (no
    training update, no evaluation sums); it still gets recommendations on the device. To the
    server (and, in non-DP runs, to readers of metrics.csv with the public seed) an opt-out looks
    like a device that fails whenever it is sampled."""
    device = locate(run_dir, user)
    with forget_lock(device.run_dir, device.cfg, exclusive=False):  # not in the middle of a replay
        try:  # from the round after the model the device holds: the run's last one done
            controls.set_training(_own_dir(device), device.index, train, from_round=last_round(device.run_dir) + 1)
        except ValueError as error:
            raise ConfigError(f"user {user}: {error}") from None


def erase_device(run_dir: Path, user: str) -> None:
    """Erase the user on its device: its rows of private state (vector, bias, optimizer moments,
    steps) in every kept base and delta, its upload-log entries and its consent flag; the device
    then marks the user erased and never trains or evaluates it again. What is not erased here:
    the user's ratings, which a simulated device reads from the public data set's shard cache
    (shared by other runs, so left intact; a real device deletes its own copy), and the user's
    influence on the global model, which `fedrec forget` removes by replay."""
    device = locate(run_dir, user)
    with forget_lock(device.run_dir, device.cfg, exclusive=False):  # a forget erases its user itself
        erase_on_device(device)


def erase_on_device(device: Device) -> None:
    """erase_device's work, for a caller that holds the forget lock."""
    controls.erase(_own_dir(device), device.index)


def device_view(run_dir: Path, user: str) -> DeviceView:
    device = locate(run_dir, user)
    cfg, split = device.cfg, device.split
    flags = controls.read(device.root)
    erased = device.index in flags["erased"]
    algorithm, model = run_model(device.run_dir, cfg, split)
    rows = cohort(split, [device.index])
    titles = split.item_titles
    ratings = [] if erased else [
        (str(titles[i]) if titles is not None else f"item {i}", float(r)) for i, r in zip(rows.train_item,
                                                                                           rows.train_rating)]
    state = None if erased else _kept_state(device)
    # the entries and sizes of one user's private state, whatever the algorithm keeps (a device starts with these)
    first = new_users(algorithm, np.zeros(1, np.int64), 1, cfg.device_policy(cfg.seed))
    fresh = {k: v[0].numpy() for k, v in first.items()}
    log = [] if erased else [e for d in controls.series_dirs(device.root) for e in uploads.of_user(d, device.index)]
    if erased:
        vector, bias, source = np.zeros(0, np.float32), 0.0, ERASED
    elif state is not None and state[ROUNDS] > 0:  # it trained: the state its device kept
        vector, bias, source = np.asarray(state["emb"], np.float32), float(state["bias"]), FROM_STATE
    else:
        fit = algorithm.fit_user(model, rows.train_item, rows.train_rating)
        vector, bias = fit.emb[0].numpy(), float(fit.bias[0])
        source = NEVER_TRAINED if state is not None else REFITTED
    ratings_bytes = 0 if erased else sum(a.nbytes for a in (rows.train_item, rows.train_rating, rows.test_item,
                                                            rows.test_rating))
    held = fresh if state is None else state  # a device that kept no state holds a fresh one beside its fit
    state_bytes = 0 if erased else sum(np.asarray(v).nbytes for v in held.values())
    shown = _uploads(device, log, algorithm.statistics(), split.n_items)
    central = _mode(device.run_dir) == "central"
    opted_out = device.index in flags["opted-out"]
    return DeviceView(user=str(user).strip(), ratings=ratings, vector=vector, bias=bias, vector_source=source,
                      bytes_stored=ratings_bytes + state_bytes + len(log) * 4 * 8, uploads=shown,
                      epsilon=_epsilon_so_far(device, shown), never_uploaded=[] if central else never_uploaded(fresh),
                      audit_evidence=audit_evidence(device.run_dir, cfg, algorithm.statistics()), opted_out=opted_out,
                      erased=erased, also_sent=also_sent(cfg, central, bool(log), opted_out, erased))


def never_uploaded(state: dict) -> list[str]:
    """The ratings and every entry of a user's private state (whatever the algorithm keeps there)."""
    rest = [name for name in state if name not in USER_SIDE]
    return ["ratings", *(USER_SIDE[name] for name in state if name in USER_SIDE),
            *([f"the rest of its private state ({', '.join(rest)})"] if rest else [])]


def _mode(run_dir: Path) -> str | None:
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()).get("mode") if summary.is_file() else None


def _kept_state(device: Device) -> dict[str, np.ndarray] | None:
    """The user's rows of the newest state its device kept (None: the run kept none)."""
    for directory in controls.series_dirs(device.root):
        owner = json.loads((directory / "owner.json").read_text())
        position = device.index - int(owner["first_user"])
        loaded = storage.load(directory, 2**31) if 0 <= position < int(owner["num_users"]) else None
        if loaded is not None:
            return {k: np.array(v[position]) for k, v in loaded[2].items()}
    return None


def upload_arrays(cfg: RunConfig, statistics: dict[str, Statistic], n_items: int,
                  rows: int) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, bytes) of one user's upload (fedrec.privacy.upload.build_upload): each statistic the
    algorithm declares, for every item when dense, else for the touched rows with their indices; under
    SecAgg+ the dense statistics and the user count (fedrec.privacy.secagg), quantized and masked by
    Flower into 64-bit integers."""
    def shape(name: str, n: int) -> tuple[int, ...]:
        if name == COUNT:
            return (1,)
        stat = statistics[name]
        return (n, stat.width) if stat.per_item else (stat.width,)

    if cfg.secure_aggregation != "none":
        return [(name, shape(name, n_items), 8 * int(np.prod(shape(name, n_items))))
                for name in secure_order(statistics)]
    dense = cfg.update_mode == "dense"
    n = n_items if dense else rows
    out = [] if dense else [(ITEM_INDEX, (n,), 8 * n)]
    return out + [(name, shape(name, n), 4 * int(np.prod(shape(name, n)))) for name in statistics]


def _uploads(device: Device, log: list[uploads.Entry], statistics: dict[str, Statistic], n_items: int) -> list[Upload]:
    cfg = device.cfg
    plan = _plan(device) if cfg.dp == "local" else None
    run_epsilon = _run_epsilons(device.run_dir) if cfg.dp in ("central", "distributed") else {}
    shown = []
    for count, entry in enumerate(log, start=1):
        epsilon = None
        if plan is not None:  # composed over this user's own participations (capped by its device)
            epsilon = plan.epsilon(min(count, plan.max_rounds or count))
        elif cfg.dp != "none":
            epsilon = run_epsilon.get(entry.round)
        shown.append(Upload(entry.round, upload_arrays(cfg, statistics, n_items, entry.rows), entry.norm,
                            entry.clipped, NOISE[cfg.dp], cfg.secure_aggregation != "none", epsilon))
    return shown


def _plan(device: Device):
    from fedrec.server.runner import privacy_plan  # the run's own plan: z and the cap are in its config.toml

    return privacy_plan(device.cfg, device.split.n_users)[1]


def _run_epsilons(run_dir: Path) -> dict[int, float]:
    """The run's epsilon after each round, as its strategy reported it (metrics.csv)."""
    frame = pd.read_csv(run_dir / "metrics.csv")
    if "epsilon" not in frame:
        return {}
    frame = frame.dropna(subset=["epsilon"])
    return {int(r): float(e) for r, e in zip(frame["round"], frame["epsilon"])}


def _epsilon_so_far(device: Device, shown: list[Upload]) -> float | None:
    if device.cfg.dp == "none":
        return None
    if device.cfg.dp == "local" and shown:
        return shown[-1].epsilon
    summary = json.loads((device.run_dir / "summary.json").read_text())
    return float((summary.get("privacy") or {}).get("epsilon", 0.0))  # local DP: the most active user's, a bound


def audit_evidence(run_dir: Path, cfg: RunConfig, statistics: dict[str, Statistic]) -> str:
    """One sentence: how the run's audit trail backs "never uploaded"."""
    if _mode(run_dir) == "central":
        return "a central run: every rating was pooled on one server; no device uploaded anything, so there is no trail"
    allowed = sorted(train_array_names(statistics, cfg))
    path = run_dir / "audit.jsonl"
    if not path.is_file():  # after a forget replay the server keeps it (its lines per round counted replies)
        path = checkpoint.kept_dir(run_dir) / "audit.jsonl"
    if cfg.dp == "none" and path.is_file():
        replies, names = 0, set()
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if "arrays" in entry:
                replies += 1
                names |= set(entry["arrays"])
        other = sorted(names - set(allowed))
        if other:
            return f"audit.jsonl shows train replies carrying {', '.join(other)}: not only item-side arrays"
        return (f"{path.name} lists the arrays of all {replies} train replies the server accepted: only "
                f"{', '.join(sorted(names)) or 'none'}, never a user vector, bias or rating")
    why = "a DP run keeps no per-reply audit file (it would count replies)" if cfg.dp != "none" else \
        "this run has no audit.jsonl"
    return (f"{why}; the server's schema check (fedrec.server.validation.check_train_reply) rejects any train "
            f"reply holding an array other than {', '.join(allowed)}, so no user vector, bias or rating is accepted")


def as_dict(view: DeviceView) -> dict:
    """A JSON-ready form (the vector as a list)."""
    out = dataclasses.asdict(view)
    out["vector"] = [float(x) for x in view.vector]
    return out
