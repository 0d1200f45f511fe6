"""Clipping bound, measured: each user's whole contribution to what is summed, over C.

Every user is run alone through `device_step` (a cohort's upload is the sum of its users'
uploads; tests/models/test_algorithms.py checks that), for every upload mode the run's algorithm
admits and every implicit negatives and local epochs given, and the L2 norm of everything it
uploads (every statistic, scattered dense, before device noise) is divided by C. The bound
holds if the maximum is 1. Users start from the algorithm's initial server state, where
updates are largest.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from fedrec.datasets import cohort
from fedrec.models.algorithm import CLIPPING, DECOYS
from fedrec.privacy.device import device_step, new_users
from fedrec.privacy.policy import UPDATE_MODES, DevicePolicy
from fedrec.privacy.upload import scatter
from fedrec.run.build import load_data, make_algorithm
from fedrec.run.config import ConfigError, RunConfig
from fedrec.run.rundir import make_run_dir, write_json


def contribution_ratios(cfg: RunConfig, mode: str) -> np.ndarray:
    """Norm of each user's upload over C, at the initial model."""
    split = load_data(cfg)
    algorithm = make_algorithm(cfg, split.n_items, split.rating_scale)
    statistics = algorithm.statistics()
    shared = algorithm.init_server(cfg.strategy, cfg.server_lr).broadcast()
    policy = DevicePolicy(mode, cfg.pad_ratio, cfg.clipping_norm)
    ratios = np.empty(split.n_users)
    for user in range(split.n_users):
        rows = cohort(split, [user])
        result = device_step(algorithm, shared, new_users(algorithm, rows.users, split.n_users, policy), rows, 1,
                             policy, cfg.seed)
        dense = scatter(result.upload, statistics, split.n_items)
        ratios[user] = np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in dense.values())) / cfg.clipping_norm
    return ratios


def admitted_modes(cfg: RunConfig) -> list[str]:
    """The upload modes the run's algorithm admits; one line if it admits no clipping."""
    algorithm = make_algorithm(cfg, 2, (1.0, 5.0))  # what it declares does not depend on the data
    if CLIPPING in algorithm.refuses:
        raise ConfigError(f"clip-check measures clipping, which {algorithm.title} refuses: "
                          f"{algorithm.refuses[CLIPPING]}")
    return [m for m in UPDATE_MODES if m != "padded" or DECOYS not in algorithm.refuses]


def run_clip_check(cfg: RunConfig, negatives: list[int], local_epochs: list[int], log=print) -> dict:
    cfg = cfg.resolved().validate()
    if cfg.clipping_norm <= 0:
        raise ConfigError("clip-check needs --clipping-norm > 0")
    modes = admitted_modes(cfg)
    run_dir = make_run_dir(cfg, "clip-check")
    rows = []
    for mode, neg, epochs in itertools.product(modes, negatives if cfg.implicit else [0], local_epochs):
        case = dataclasses.replace(cfg, train_negatives=max(neg, 1), local_epochs=epochs)
        ratios = contribution_ratios(case, mode)
        row = {"mode": mode, "train_negatives": neg if cfg.implicit else None, "local_epochs": epochs,
               "users": len(ratios), "max_ratio": float(ratios.max()), "share_at_bound": float((ratios > 0.999).mean()),
               "over_bound": int((ratios > 1 + 1e-5).sum())}
        rows.append(row)
        log(f"{mode:7s} negatives {row['train_negatives']} local epochs {epochs}: max contribution/C "
            f"{row['max_ratio']:.7f}, {row['share_at_bound']:.0%} of users clipped, {row['over_bound']} over")
    report = {"dataset": cfg.dataset, "split": cfg.split, "model": cfg.model, "clipping_norm": cfg.clipping_norm,
              "results": rows, "max_ratio": max(r["max_ratio"] for r in rows), "config": cfg.to_dict()}
    write_json(run_dir / "clip_check.json", report)
    report["run_dir"] = str(run_dir)
    return report
