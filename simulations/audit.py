"""Leakage audit: how well can an observer tell which items a user rated?

The attack ranks all items by the L2 size of their row in what the observer sees and is
scored against the truth (the user's training items) with ROC AUC and precision@k.
Observers:
- upload: an honest-but-curious server reading one client's own upload (no secure
  aggregation), for the dense, sparse and padded modes and for local DP;
- aggregate: anyone who sees what a round releases, given everyone else's contribution
  (the strongest such observer): the target's clipped update plus the release's central
  DP noise, averaged over the rounds the target takes part in; without DP, noise-free.
Updates are the real ones: a model trained centrally for `epochs` epochs, then one round
of the local step per target user, through the same code as the federated client.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fedrec.common.build import hyper, load_data
from fedrec.common.config import RunConfig
from fedrec.common.rundir import make_run_dir, write_json
from fedrec.datasets import cohort
from fedrec.models import local_train, train_central, training_rows
from fedrec.models.upload import ITEM_INDEX, build_upload, decoy_rows, scatter_upload
from fedrec.server.privacy import PrivacyPlan


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_k(scores: np.ndarray, positive: np.ndarray, k: int) -> float:
    top = np.argsort(-scores, kind="mergesort")[:k]
    return float(positive[top].mean())


def row_scores(dense: dict[str, np.ndarray], uploaded: np.ndarray | None) -> np.ndarray:
    """Size of each item's row; rows absent from a sparse upload score below any present one."""
    scores = np.sqrt((dense["item-emb"] ** 2).sum(axis=1) + dense["item-bias"] ** 2)
    if uploaded is not None:
        present = np.zeros(len(scores), bool)
        present[uploaded] = True
        scores = np.where(present, scores + 1.0, 0.0)  # +1: present beats absent whatever its size
    return scores


def trained_model(cfg: RunConfig):
    """The model whose updates are audited: the central baseline after cfg.epochs epochs."""
    split = load_data(cfg)
    everyone = cohort(split, np.arange(split.n_users))
    return train_central(everyone, split.n_users, split.n_items, hyper(cfg), cfg.epochs, cfg.strategy, cfg.server_lr,
                         cfg.top_k, split.rating_scale, eval_every=cfg.epochs)


def run_audit(cfg: RunConfig, targets: int = 50, k: int = 10, log=print, trained=None, write: bool = True) -> dict:
    cfg = cfg.resolved().validate()
    split = load_data(cfg)
    h = hyper(cfg)
    trained = trained or trained_model(cfg)
    items, users = trained.items, trained.users
    counts = split.train_index().counts()
    rng = np.random.default_rng([cfg.seed, 0xA0D17])
    eligible = np.flatnonzero(counts >= k)
    chosen = np.sort(rng.choice(eligible, size=min(targets, len(eligible)), replace=False))
    population = split.n_users
    sample = cfg.users_per_round or population
    clip = cfg.clipping_norm or 1.0
    participations = max(1, int(round(cfg.rounds * sample / population)))
    central = PrivacyPlan("central", cfg.noise_multiplier, clip, cfg.sampling, sample, population, cfg.target_delta,
                          cfg.accountant)
    local = dataclasses.replace(central, mode="local")
    if cfg.target_epsilon > 0:
        central = dataclasses.replace(central, noise_multiplier=central.calibrate(cfg.target_epsilon, cfg.rounds))
        local = dataclasses.replace(local, noise_multiplier=local.calibrate(cfg.target_epsilon, participations))
    settings = []  # (observer, mode, dp, epsilon, noise std, decoys)
    for mode in ("dense", "sparse", "padded"):
        settings.append(("upload", mode, "none", None, 0.0))
    if local.noise_multiplier > 0:
        eps = local.epsilon(participations)
        settings += [("upload", "dense", "local", eps, local.noise_multiplier * clip),
                     ("upload", "sparse", "local", eps, local.noise_multiplier * clip)]
    settings.append(("aggregate", "dense", "none", None, 0.0))
    if central.noise_multiplier > 0:
        settings.append(("aggregate", "dense", "central", central.epsilon(cfg.rounds), central.noise_multiplier * clip))

    per_setting = {s: ([], []) for s in settings}
    for n, user in enumerate(chosen):
        rows = cohort(split, [user])
        truth = np.zeros(split.n_items, bool)
        truth[rows.train_item] = True
        seg, item, target = training_rows(rows, split.n_items, h, cfg.rounds + 1)
        state = users.take(torch.as_tensor([user]))
        d_seg, d_item, d_noise = decoy_rows(rows.users, rows.train_segment, rows.train_item, split.n_items,
                                            cfg.pad_ratio, h, cfg.rounds + 1,
                                            item_weight=(items.emb.norm(dim=1) + items.bias.abs()).numpy().astype(float) + 1e-6)
        plain = local_train(items, state, seg, item, target, h, clip_norm=clip)[1]
        padded = local_train(items, state, torch.cat([seg, torch.as_tensor(d_seg)]), torch.cat([item, torch.as_tensor(d_item)]),
                             torch.cat([target, torch.zeros(len(d_seg))]), h, clip_norm=clip,
                             decoy_noise=torch.cat([torch.full((len(seg),), float("nan")), torch.as_tensor(d_noise)]))[1]
        noise_rng = np.random.default_rng([cfg.seed, int(user), 0xA0D])
        for setting in settings:
            observer, mode, dp, _, std = setting
            update = padded if mode == "padded" else plain
            if observer == "upload":
                arrays = build_upload(update, mode, std, noise_rng)
                dense = scatter_upload(arrays, split.n_items, h.dim)
                scores = row_scores(dense, arrays.get(ITEM_INDEX))
            else:
                dense = scatter_upload(build_upload(update, "dense"), split.n_items, h.dim)
                if std > 0:  # the average over the target's releases of (its update + that release's noise)
                    spread = std / np.sqrt(participations)
                    dense = {key: v + noise_rng.normal(0, spread, np.shape(v)) for key, v in dense.items()}
                scores = row_scores(dense, None)
            per_setting[setting][0].append(roc_auc(scores, truth))
            per_setting[setting][1].append(precision_at_k(scores, truth, k))
        if log and (n + 1) % 10 == 0:
            log(f"audited {n + 1}/{len(chosen)} users")
    results = []
    for (observer, mode, dp, eps, std), (aucs, precs) in per_setting.items():
        results.append({"observer": observer, "mode": mode, "dp": dp, "epsilon": eps, "auc": float(np.mean(aucs)),
                        "auc_std": float(np.std(aucs)), "precision_at_k": float(np.mean(precs)), "k": k,
                        "noise_std": std, "targets": len(chosen)})
    report = {"dataset": cfg.dataset, "split": cfg.split, "results": results, "delta": cfg.target_delta,
              "clipping_norm": clip, "rounds": cfg.rounds, "sampling_rate": sample / population,
              "participations_per_user": participations,
              "noise_multiplier": {"central": central.noise_multiplier, "local": local.noise_multiplier},
              "config": cfg.to_dict()}
    if write:
        run_dir = make_run_dir(cfg, "audit")
        write_json(run_dir / "audit.json", report)
        report["run_dir"] = str(run_dir)
    return report
