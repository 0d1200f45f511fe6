"""Clipping bound, measured: each user's whole contribution to what is summed, over C.

Every user is run alone through `device_step` (a cohort's upload is the sum of its users'
uploads; tests/test_clipping.py checks that), for every upload mode, implicit negatives
and local epochs given, and the L2 norm of everything it uploads (rows, item biases,
global bias, before local noise) is divided by C. The bound holds if the maximum is 1.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch

from fedrec.datasets import cohort
from fedrec.models import ItemParams, UserState, initial_global_bias
from fedrec.models.defaults import UPDATE_MODES
from fedrec.models.device import DevicePolicy, device_step
from fedrec.models.upload import scatter_upload
from fedrec.run.build import hyper, load_data
from fedrec.run.config import ConfigError, RunConfig
from fedrec.run.rundir import make_run_dir, write_json


def contribution_ratios(cfg: RunConfig, mode: str) -> np.ndarray:
    """Norm of each user's upload over C, at the initial model (where updates are largest)."""
    split = load_data(cfg)
    h = hyper(cfg)
    items = ItemParams.init(split.n_items, h, initial_global_bias(cfg.implicit, split.rating_scale))
    state = UserState.init(np.arange(split.n_users), split.n_users, h)
    policy = DevicePolicy(mode, cfg.pad_ratio, cfg.clipping_norm)
    ratios = np.empty(split.n_users)
    for user in range(split.n_users):
        result = device_step(items, state.take(torch.as_tensor([user])), cohort(split, [user]), split.n_items, h,
                             policy, 1)
        dense = scatter_upload(result.upload, split.n_items, h.upload_width)
        ratios[user] = np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in dense.values())) / cfg.clipping_norm
    return ratios


def run_clip_check(cfg: RunConfig, negatives: list[int], local_epochs: list[int], log=print) -> dict:
    cfg = cfg.resolved().validate()
    if cfg.clipping_norm <= 0:
        raise ConfigError("clip-check needs --clipping-norm > 0")
    rows = []
    modes = [m for m in UPDATE_MODES if m != "padded" or cfg.model == "mf"]  # SVD++ and BPMF refuse decoys
    for mode, neg, epochs in itertools.product(modes, negatives if cfg.implicit else [0], local_epochs):
        case = dataclasses.replace(cfg, train_negatives=max(neg, 1), local_epochs=epochs)
        ratios = contribution_ratios(case, mode)
        row = {"mode": mode, "train_negatives": neg if cfg.implicit else None, "local_epochs": epochs,
               "users": len(ratios), "max_ratio": float(ratios.max()), "share_at_bound": float((ratios > 0.999).mean()),
               "over_bound": int((ratios > 1 + 1e-5).sum())}
        rows.append(row)
        log(f"{mode:7s} negatives {row['train_negatives']} local epochs {epochs}: max contribution/C "
            f"{row['max_ratio']:.7f}, {row['share_at_bound']:.0%} of users clipped, {row['over_bound']} over")
    report = {"dataset": cfg.dataset, "split": cfg.split, "clipping_norm": cfg.clipping_norm, "results": rows,
              "max_ratio": max(r["max_ratio"] for r in rows), "config": cfg.to_dict()}
    run_dir = make_run_dir(cfg, "clip-check")
    write_json(run_dir / "clip_check.json", report)
    report["run_dir"] = str(run_dir)
    return report
