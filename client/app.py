"""ClientApp: thin glue from Flower messages to the local step of fedrec.models.

A node hosts one user (deployment) or a cohort of users (simulation). Each sampled user
trains on its own ratings against the received item parameters; the reply carries only
the summed item-side change, a weight and loss sums. User vectors stay in context.state.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec.common import schema
from fedrec.common.config import RunConfig
from fedrec.datasets import cohort
from fedrec.models import ItemParams, evaluate_rows, local_train, training_rows
from fedrec.models.upload import build_upload, decoy_rows

from .node import load_state, node_data, partition, save_state

app = ClientApp()


def _config(msg: Message) -> RunConfig:
    record = msg.content[schema.CONFIG]
    settings = {k: v for k, v in record.items() if k not in (schema.ROUND, schema.USERS)}
    return RunConfig.from_mapping(settings)


def _items(msg: Message) -> ItemParams:
    record = msg.content[schema.ARRAYS]
    return ItemParams.from_arrays({k: record[k].numpy() for k in schema.ITEM_ARRAYS})


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Tell the server which users this node hosts and the model's shapes (no data)."""
    pid, parts = partition(context)
    node = node_data(_config(msg), pid, parts)
    lo, hi = node.split.rating_scale
    metrics = MetricRecord({
        "partition-id": pid, "num-partitions": parts, "first-user": int(node.users[0]) if len(node.users) else -1,
        "num-users": len(node.users), "population": node.split.n_users, "num-items": node.split.n_items,
        "rating-min": lo, "rating-max": hi,
    })
    return Message(RecordDict({schema.METRICS: metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = _config(msg)
    node = node_data(cfg, *partition(context))
    items = _items(msg)
    state = load_state(context, node)
    rnd = int(msg.content[schema.CONFIG][schema.ROUND])
    sampled = np.asarray(msg.content[schema.CONFIG][schema.USERS], dtype=np.int64)
    local = torch.as_tensor(np.searchsorted(node.users, sampled))  # positions of the sampled users on this node
    rows = cohort(node.split, sampled)
    seg, item, target = training_rows(rows, node.split.n_items, node.hyper, rnd)
    decoy_noise = None
    if cfg.update_mode == "padded":
        d_seg, d_item, d_noise = decoy_rows(sampled, rows.train_segment, rows.train_item, node.split.n_items,
                                            cfg.pad_ratio, node.hyper, rnd, item_weight=_row_norms(items))
        decoy_noise = torch.cat([torch.full((len(seg),), float("nan")), torch.as_tensor(d_noise)])
        seg, item = torch.cat([seg, torch.as_tensor(d_seg)]), torch.cat([item, torch.as_tensor(d_item)])
        target = torch.cat([target, torch.zeros(len(d_seg))])
    new_state, update = local_train(items, state.take(local), seg, item, target, node.hyper,
                                    clip_norm=cfg.clipping_norm, decoy_noise=decoy_noise)
    state.put(local, new_state)
    save_state(context, state)
    noise_std = cfg.noise_multiplier * cfg.clipping_norm if cfg.dp == "local" else 0.0
    rng = np.random.default_rng([cfg.seed, rnd, int(sampled[0]) if len(sampled) else 0, 11])
    arrays = build_upload(update, cfg.update_mode, noise_std, rng)
    metrics = MetricRecord({schema.WEIGHT: update.num_users, "loss-sum": update.loss_sum, "num-rows": update.num_rows})
    return Message(RecordDict({schema.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                               schema.METRICS: metrics}), reply_to=msg)


def _row_norms(items: ItemParams) -> np.ndarray:
    return (items.emb.norm(dim=1) + items.bias.abs()).numpy().astype(np.float64) + 1e-6


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score every hosted user on its own held-out rows; reply with sums only."""
    cfg = _config(msg)
    node = node_data(cfg, *partition(context))
    sums = evaluate_rows(_items(msg), load_state(context, node), node.rows, cfg.implicit, cfg.top_k,
                         node.split.rating_scale)
    metrics = MetricRecord({schema.WEIGHT: len(node.users), **{k: float(sums.get(k, 0.0)) for k in schema.EVAL_SUMS}})
    return Message(RecordDict({schema.METRICS: metrics}), reply_to=msg)

