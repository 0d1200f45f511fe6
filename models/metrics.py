"""Accuracy metrics as sums, so per-device results add up to the global figure.

A user's embedding exists only on the device, so federated evaluation returns these sums
per client and the server finishes them with `finish`; the central baseline calls the
same functions over all users at once.
"""

from __future__ import annotations

import math

import torch

from .defaults import DEFAULT_TOP_K

VALIDATION = "val-"  # prefix of the sums and metrics of validation items (--validation-item)
VALIDATION_SUMS = ("hits", "ndcg", "num-ranked")
SUM_KEYS = ("sse", "sae", "num-ratings", "hits", "ndcg", "num-ranked", "recall-full", "ndcg-full", "num-full",
            *(VALIDATION + k for k in VALIDATION_SUMS))


def error_sums(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Squared and absolute error sums of rating predictions."""
    err = (pred.double() - target.double())
    return {"sse": float((err**2).sum()), "sae": float(err.abs().sum()), "num-ratings": float(len(err))}


def sampled_rank(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Rank of each positive among its sampled negatives (0 = top). Ties count against the
    positive, so a model that scores everything equally never gets credit."""
    return (neg >= pos[:, None]).sum(dim=1)


def loo_sums(pos: torch.Tensor, neg: torch.Tensor, k: int) -> dict[str, float]:
    """HR@k and NDCG@k sums for leave-one-out with sampled negatives (one positive per row)."""
    rank = sampled_rank(pos, neg).double()
    hit = rank < k
    ndcg = torch.where(hit, 1.0 / torch.log2(rank + 2.0), torch.zeros_like(rank))
    return {"hits": float(hit.sum()), "ndcg": float(ndcg.sum()), "num-ranked": float(len(pos))}


def full_ranking_sums(scores: torch.Tensor, exclude: torch.Tensor, relevant: torch.Tensor, k: int) -> dict[str, float]:
    """Recall@k and NDCG@k sums over the full catalogue.

    scores [users, items]; exclude and relevant are boolean masks of the same shape
    (training items are excluded from the ranking). Users without relevant items are
    skipped. Recall divides by the number of relevant items of the user.
    """
    masked = scores.masked_fill(exclude, float("-inf"))
    k = min(k, scores.shape[1])
    top = masked.topk(k, dim=1).indices
    gains = relevant.gather(1, top).double()
    n_rel = relevant.sum(dim=1).double()
    has = n_rel > 0
    discounts = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0)
    dcg = (gains * discounts).sum(dim=1)
    ideal = torch.cumsum(discounts, 0)[(n_rel.clamp(1, k) - 1).long()]
    recall = gains.sum(dim=1) / n_rel.clamp(min=1)
    return {"recall-full": float(recall[has].sum()), "ndcg-full": float((dcg / ideal)[has].sum()),
            "num-full": float(has.sum())}


def add_sums(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + value
    return total


METRIC_PREFIXES = ("rmse", "mae", "hr", "ndcg", "recall", "full-ndcg", "val-hr", "val-ndcg")  # finish()'s, before "@k"


def finish(sums: dict[str, float], k: int = DEFAULT_TOP_K) -> dict[str, float]:
    """Turn summed counts into metrics; metrics without data are left out."""
    out = {}
    if sums.get("num-ratings", 0) > 0:
        out["rmse"] = math.sqrt(sums["sse"] / sums["num-ratings"])
        out["mae"] = sums["sae"] / sums["num-ratings"]
    if sums.get("num-ranked", 0) > 0:
        out[f"hr@{k}"] = sums["hits"] / sums["num-ranked"]
        out[f"ndcg@{k}"] = sums["ndcg"] / sums["num-ranked"]
    if sums.get("num-full", 0) > 0:
        out[f"recall@{k}"] = sums["recall-full"] / sums["num-full"]
        out[f"full-ndcg@{k}"] = sums["ndcg-full"] / sums["num-full"]
    if sums.get(VALIDATION + "num-ranked", 0) > 0:
        out[f"{VALIDATION}hr@{k}"] = sums[VALIDATION + "hits"] / sums[VALIDATION + "num-ranked"]
        out[f"{VALIDATION}ndcg@{k}"] = sums[VALIDATION + "ndcg"] / sums[VALIDATION + "num-ranked"]
    return out


def reported(history: list[dict], k: int = DEFAULT_TOP_K) -> tuple[dict, int | None]:
    """(the evaluated row a run reports, its position in `history`): the last one, or where rows score
    validation items, the one of the best validation HR@k (the latest of equals, as PFedRec's code does),
    so that the test metrics are chosen by validation and not by the test set."""
    rows = [(i, row) for i, row in enumerate(history) if f"{VALIDATION}hr@{k}" in row]
    if not rows:
        return (history[-1], len(history) - 1) if history else ({}, None)
    best = max(rows, key=lambda pair: (pair[1][f"{VALIDATION}hr@{k}"], pair[0]))
    return best[1], best[0]
