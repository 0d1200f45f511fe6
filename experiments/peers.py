"""Peer baselines for the accuracy table: Surprise's SVD, SVD++ and KNNBaseline fitted on exactly
the training rows of a split and scored on exactly its test rows (central, pooled data: what a
researcher would compare a federated recommender against).

Surprise is an optional extra, `peers` (simulations/extras.py); without it every peer is reported
as skipped with the reason and how to install it, never silently left out.
"""

from __future__ import annotations

import time

import numpy as np

from fedrec.cli.extras import install_command
from fedrec.datasets.interactions import Split

INSTALL_HINT = f"scikit-surprise is not installed (fedrec's peers extra): {install_command('peers')}"
PEERS = ("SVD", "SVD++", "KNNBaseline")


def _algorithm(name: str, seed: int):
    from surprise import SVD, KNNBaseline, SVDpp

    if name == "SVD":  # Surprise's defaults: 100 factors, 20 epochs, lr 0.005, reg 0.02
        return SVD(random_state=seed)
    if name == "SVD++":
        return SVDpp(random_state=seed)
    # item-based k-NN on baseline residuals, Pearson-baseline similarity (Surprise's recommended setting)
    return KNNBaseline(sim_options={"name": "pearson_baseline", "user_based": False}, verbose=False)


def peer_results(split: Split, seed: int = 0, names: tuple[str, ...] = PEERS) -> dict[str, dict]:
    """{peer: {"rmse", "mae", "seconds"}} on the split's test rows, or {peer: {"skipped": why}}."""
    if split.test_negatives is not None:
        return {name: {"skipped": "rating peers: this split ranks implicit feedback"} for name in names}
    try:
        import pandas as pd
        from surprise import Dataset, Reader
    except ImportError:
        return {name: {"skipped": INSTALL_HINT} for name in names}
    lo, hi = split.rating_scale
    train = pd.DataFrame({"user": split.train.user, "item": split.train.item, "rating": split.train.rating})
    trainset = Dataset.load_from_df(train, Reader(rating_scale=(lo, hi))).build_full_trainset()
    out = {}
    for name in names:
        np.random.seed(seed)  # KNNBaseline's baseline SGD/ALS draws from numpy's global generator
        start = time.perf_counter()
        algo = _algorithm(name, seed).fit(trainset)
        predicted = np.array([algo.predict(u, i).est for u, i in zip(split.test.user.tolist(),
                                                                      split.test.item.tolist())])
        error = predicted - split.test.rating
        out[name] = {"rmse": float(np.sqrt(np.mean(error**2))), "mae": float(np.mean(np.abs(error))),
                     "seconds": time.perf_counter() - start}
    return out
