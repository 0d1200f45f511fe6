"""ClientApp: thin glue from Flower messages to the local step of fedrec.models.

A node hosts one user (deployment) or a cohort of users (simulation). Each sampled user
trains on its own ratings against the received item parameters; the reply carries only
the summed item-side change, a weight and loss sums. User vectors stay in context.state
(or on the device's disk). A user who opted out (from its opt-out round) or was erased on its
device (client/controls.py) is left out of training and evaluation like a device that dropped
out, the server is not told; under distributed DP it still adds its noise share.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec.models.metrics import add_sums
from fedrec.models.randomness import dropped, private_rng
from fedrec.models.train import evaluate_cohort
from fedrec.privacy.device import DeviceResult, device_step
from fedrec.privacy.noise import add_device_noise
from fedrec.run import schema
from fedrec.run.device_config import DeviceConfig

from . import controls, uploads
from .node import NodeData, load_state, node_data, save_state
from .secure import is_secure_round, secure_reply, secure_train_mod
from .storage import series_dir, state_root

app = ClientApp()
EVAL_CHUNK = 8192  # users scored at once: bounds evaluation memory on a node hosting many (65,536: +90 MB)


class DeviceDropped(RuntimeError):
    """No sampled user of the node trains (simulated failures, --dropout, or users who opted out
    or were erased: one message for all, so the server cannot tell): Flower turns it into an
    error reply, as for a dead device. Under distributed DP only simulated failures do: held-back
    users still send their noise shares."""


def _device_config(record) -> DeviceConfig:
    """This device's settings from a round's config (a ConfigRecord, or a dict in SecAgg+ rounds)."""
    return DeviceConfig.from_record(record, ignore=schema.ROUND_KEYS)


def _config(msg: Message) -> DeviceConfig:
    return _device_config(msg.content[schema.CONFIG])


def _shared(msg: Message) -> dict[str, np.ndarray]:
    record = msg.content[schema.ARRAYS]
    return {k: record[k].numpy() for k in record.keys()}


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Tell the server which users this node hosts and the model's shapes (no data)."""
    meta = node_data(_config(msg), context).meta
    lo, hi = meta.rating_scale
    metrics = MetricRecord({
        "partition-id": meta.partition_id, "num-partitions": meta.num_partitions,
        "first-user": meta.first_user if meta.num_users else -1, "num-users": meta.num_users,
        "population": meta.population, "num-items": meta.n_items, "rating-min": lo, "rating-max": hi,
    })
    return Message(RecordDict({schema.METRICS: metrics}), reply_to=msg)


@app.train(mods=[secure_train_mod])
def train(msg: Message, context: Context) -> Message:
    if is_secure_round(msg):  # a SecAgg+ round: FitIns in, a FitRes for the mod to mask out
        return secure_reply(msg, lambda shared, config: _train(shared, config, context))
    result, device = _train(_shared(msg), msg.content[schema.CONFIG], context)
    metrics = {schema.WEIGHT: int(result.took_part.sum())}
    if device.policy.sends_diagnostics:  # only where they reveal nothing the upload does not
        metrics |= {"loss-sum": result.sums.loss_sum, "num-rows": result.sums.num_rows}
    return Message(RecordDict({schema.ARRAYS: ArrayRecord({k: Array(v) for k, v in result.upload.items()}),
                               schema.METRICS: MetricRecord(metrics)}), reply_to=msg)


def _train(shared: dict[str, np.ndarray], config, context: Context) -> tuple[DeviceResult, DeviceConfig]:
    """One round of this node's sampled users (config: the round's ConfigRecord or dict)."""
    device = _device_config(config)
    node = node_data(device, context)
    round_ = int(config[schema.ROUND])
    state = load_state(context, node, device.policy, config, up_to=round_ - 1)
    sent = sampled = np.asarray(config[schema.USERS], dtype=np.int64)
    if device.dropout > 0:  # simulated failures: these devices go silent this round
        sampled = sampled[~dropped(device.data.seed, round_, sampled, device.dropout)]
    if not len(sampled):
        raise DeviceDropped(f"every sampled device of this node dropped out in round {round_}")
    sampled = sampled[~controls.withheld(state_root(context), sampled, round_)]  # opted out or erased: silent
    policy = device.policy
    if not len(sampled):
        if policy.dp != "distributed":
            raise DeviceDropped(f"every sampled device of this node dropped out in round {round_}")
        return _noise_only(node, len(sent), policy, round_, int(sent[0])), device
    if len(np.unique(sampled)) != len(sampled):  # a user trained twice would upload twice its clipped update
        raise ValueError(f"round {round_}: the server sent a user more than once")
    positions = np.searchsorted(node.users, sampled)  # where the sampled users are on this node
    if len(sampled) and (positions.max() >= len(node.users) or not np.array_equal(node.users[positions], sampled)):
        raise ValueError(f"round {round_}: the server sampled users this node does not host")
    local = torch.as_tensor(positions)
    result = device_step(node.algorithm, shared, {k: v[local] for k, v in state.items()}, node.shard.cohort(positions),
                         round_, policy, device.data.seed)
    if policy.dp == "distributed":  # users held back (dropout, consent, erasure, cap) still add their shares
        _add_shares(node, result.upload, len(sent) - int(result.took_part.sum()), policy, round_, int(sent[0]))
    for name, value in result.state.items():
        state[name][local] = value
    save_state(context, state, config, round_, positions, keep_bases=device.keep_checkpoints)
    if device.keep_checkpoints and state_root(context) and config.get(schema.SERIES):
        _log_uploads(context, config, round_, sampled[result.took_part], result, policy.clipping_norm)
    return result, device


def _add_shares(node: NodeData, upload: dict, users: int, policy, round_: int, first_user: int) -> None:
    """Distributed DP: the noise shares of `users` held-back users (zero update each), added to a
    dense upload. The server counts every user it sent to a surviving node towards the noise the
    unmasked sum must carry, so each adds its share whether it trained or not."""
    if users > 0 and policy.noise_std > 0:
        rng = private_rng("device-noise", policy.reproducible_seed, round_, first_user, 1)  # not the trained stream
        statistics = node.algorithm.statistics()
        per_item = {name for name, s in statistics.items() if s.per_item}
        add_device_noise(upload, policy.noise_std, np.full(node.meta.n_items, users), users, per_item, rng)


def _noise_only(node: NodeData, users: int, policy, round_: int, first_user: int) -> DeviceResult:
    """Distributed DP, no sampled user of the node trains: a zero update carrying their noise shares."""
    upload = {name: np.zeros((node.meta.n_items, s.width) if s.per_item else (s.width,), np.float32)
              for name, s in node.algorithm.statistics().items()}
    _add_shares(node, upload, users, policy, round_, first_user)
    return DeviceResult(None, upload, None, np.zeros(0, bool))


def _log_uploads(context: Context, config, round_: int, users: np.ndarray, result: DeviceResult,
                 clip_norm: float) -> None:
    """The device's own record of this round's uploads (uploads.py): kept with the run's device state."""
    rows = np.bincount(torch.cat(result.sums.pair_user).numpy(), minlength=len(users))
    directory = series_dir(state_root(context), str(config[schema.SERIES]))
    uploads.record(directory, round_, users, torch.cat(result.sums.norms).numpy(), clip_norm, rows)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score every hosted user on its own held-out rows; reply with sums only."""
    device = _config(msg)
    config = msg.content[schema.CONFIG]
    node = node_data(device, context)
    state = load_state(context, node, device.policy, config, up_to=int(config[schema.ROUND]))
    model, sums = {k: torch.as_tensor(v) for k, v in _shared(msg).items()}, {}
    # opted out (from its opt-out round) or erased: nothing of the user leaves the device, not even sums
    scored = np.flatnonzero(~controls.withheld(state_root(context), node.users, int(config[schema.ROUND])))
    if not len(scored):  # a reply of zero users would tell the server its one user opted out: fail as if dead
        raise DeviceDropped(f"every sampled device of this node dropped out in round {int(config[schema.ROUND])}")
    for start in range(0, len(scored), EVAL_CHUNK):  # a cohort of a million users, a slice at a time
        chunk = scored[start:start + EVAL_CHUNK]
        index = torch.as_tensor(chunk)
        add_sums(sums, evaluate_cohort(node.algorithm, model, {k: v[index] for k, v in state.items()},
                                       node.shard.cohort(chunk), device.top_k))
    metrics = MetricRecord({schema.WEIGHT: len(scored), **{k: float(sums.get(k, 0.0)) for k in schema.EVAL_SUMS}})
    return Message(RecordDict({schema.METRICS: metrics}), reply_to=msg)

