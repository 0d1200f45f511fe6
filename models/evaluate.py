"""Scoring a batch of users on their own held-out rows (what each device does)."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from .defaults import DEFAULT_TOP_K
from .metrics import add_sums, error_sums, full_ranking_sums, loo_sums
from .mf import ItemParams, UserState, predict
from .recency import Recency, with_recency
from .svdpp import as_mf

FULL_RANKING_CHUNK = 2048  # users scored against the whole catalogue at once


class UserRows(Protocol):
    """The rows of a batch of users (fedrec.datasets.CohortData has this shape)."""

    users: np.ndarray
    train_segment: np.ndarray
    train_item: np.ndarray
    train_rating: np.ndarray
    test_segment: np.ndarray
    test_item: np.ndarray
    test_rating: np.ndarray
    test_negatives: np.ndarray | None
    train_time: np.ndarray | None


def evaluate_rows(items: ItemParams, state: UserState, rows: UserRows, implicit: bool, k: int = DEFAULT_TOP_K,
                  rating_scale: tuple[float, float] = (1.0, 5.0), recency: Recency | None = None) -> dict[str, float]:
    """Metric sums over the batch's test rows: errors (explicit) or ranking (implicit, with the
    `recency` term of models/recency.py added to every score when given and on)."""
    seg = torch.as_tensor(rows.test_segment)
    item = torch.as_tensor(rows.test_item)
    if len(seg) == 0:
        return {}
    items, state = as_mf(items, state, rows.train_segment, rows.train_item)
    with torch.no_grad():
        if not implicit:
            pred = predict(items, state, seg, item).clamp(*rating_scale)
            return error_sums(pred, torch.as_tensor(rows.test_rating))
        if recency is not None:
            items, state = with_recency(items, state, rows, recency)
        neg = torch.as_tensor(rows.test_negatives)
        pos_score = predict(items, state, seg, item)
        neg_score = predict(items, state, seg.repeat_interleave(neg.shape[1]), neg.reshape(-1)).reshape(neg.shape)
        sums = loo_sums(pos_score, neg_score, k)
        return add_sums(sums, _full_ranking(items, state, rows, k))


def _full_ranking(items: ItemParams, state: UserState, rows: UserRows, k: int) -> dict[str, float]:
    n_items = items.emb.shape[0]
    sums: dict[str, float] = {}
    tested = np.unique(rows.test_segment)
    for start in range(0, len(tested), FULL_RANKING_CHUNK):
        chunk = tested[start:start + FULL_RANKING_CHUNK]
        local = np.full(len(rows.users), -1)
        local[chunk] = np.arange(len(chunk))
        scores = (state.emb[chunk] @ items.emb.T + items.bias + state.bias[chunk, None])
        exclude = torch.zeros(len(chunk), n_items, dtype=torch.bool)
        relevant = torch.zeros_like(exclude)
        tr = local[rows.train_segment] >= 0
        exclude[local[rows.train_segment[tr]], rows.train_item[tr]] = True
        te = local[rows.test_segment] >= 0
        relevant[local[rows.test_segment[te]], rows.test_item[te]] = True
        add_sums(sums, full_ranking_sums(scores, exclude, relevant, k))
    return sums
