"""Leakage audit: how well can an observer tell which items a user rated, and how much
privacy can a canary attack prove is lost?

Observers:
- upload: an honest-but-curious server reading one device's own uploads (no secure
  aggregation), in the dense, sparse and padded modes, and under local DP (the average of
  the target's uploads over the rounds its cap allows, noise included);
- aggregate: anyone who sees what rounds release, given everyone else's contribution (the
  strongest such observer): the target's clipped update plus each release's central noise,
  averaged over the rounds an average user takes part in.
Updates are real: a model trained centrally for `epochs` epochs, then one round of
`device_step` per target, the same function the ClientApp runs, with the same private
noise streams. Attackers: fedrec.audit.attacks (prior, norm, direction, seed), which read
the factor family's update (its item-emb and item-bias statistics), and fedrec.audit.canary
(empirical epsilon lower bounds, through the real server and ClientApp).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import torch

from fedrec.datasets import cohort
from fedrec.models.algorithm import CLIPPING, DECOYS, DP, SECURE_AGGREGATION, Algorithm
from fedrec.models.central import CentralResult
from fedrec.models.factors import ITEM_BIAS, ITEM_EMB
from fedrec.models.randomness import private_rng, seeded_rng
from fedrec.models.train import take
from fedrec.privacy.accountant import PrivacyPlan, participation_cap
from fedrec.privacy.device import ROUNDS, device_step
from fedrec.privacy.noise import add_central_noise, add_device_noise
from fedrec.privacy.policy import UPDATE_MODES, DevicePolicy
from fedrec.privacy.upload import ITEM_INDEX, scatter
from fedrec.run.build import hyper, load_data, make_algorithm
from fedrec.run.config import ConfigError, RunConfig
from fedrec.run.rundir import make_run_dir, write_json
from fedrec.simulations.central import run_central

from .attacks import direction_scores, norm_scores, precision_at_k, prior_log_odds, roc_auc, seed_attack
from .canary import canary_audit
from .secure_views import masked_views


def trained_model(cfg: RunConfig) -> CentralResult:
    """The model whose updates are audited: the central baseline after cfg.epochs epochs."""
    return run_central(cfg, write=False).result


def audited_algorithm(cfg: RunConfig, n_items: int, rating_scale: tuple[float, float]) -> Algorithm:
    """The run's algorithm, if the audit applies to it: one line otherwise, from what the algorithm declares."""
    algorithm = make_algorithm(cfg, n_items, rating_scale)
    statistics = algorithm.statistics()
    if not all(name in statistics and statistics[name].per_item for name in (ITEM_EMB, ITEM_BIAS)):
        raise ConfigError(f"the leakage audit's attackers read the factor family's update (per-item {ITEM_EMB} and "
                          f"{ITEM_BIAS} statistics); {algorithm.title} sends {', '.join(statistics)}")
    for mechanism in (CLIPPING, DP, SECURE_AGGREGATION):  # every observer the audit compares
        if mechanism in algorithm.refuses:
            raise ConfigError(f"the leakage audit compares observers under {mechanism}, which {algorithm.title} "
                              f"refuses: {algorithm.refuses[mechanism]}")
    return algorithm


def privacy_plans(cfg: RunConfig, population: int, epsilon: float) -> tuple[PrivacyPlan, PrivacyPlan]:
    """Central and local plans calibrated to `epsilon`, as a run would calibrate them."""
    sample = cfg.users_per_round or population
    clip = cfg.clipping_norm or 1.0
    central = PrivacyPlan("central", 0.0, clip, cfg.sampling, sample, population, cfg.target_delta, cfg.accountant)
    cap = min(cfg.rounds, cfg.max_rounds_per_user or participation_cap(cfg.rounds, sample / population, population))
    local = dataclasses.replace(central, mode="local", max_rounds=cap)
    central = dataclasses.replace(central, noise_multiplier=central.calibrate(epsilon, cfg.rounds) + 1e-3)
    local = dataclasses.replace(local, noise_multiplier=local.calibrate(epsilon, cap) + 1e-3)
    return central, local


def run_audit(cfg: RunConfig, targets: int = 50, k: int = 10, log=print, trained: CentralResult | None = None,
              write: bool = True, epsilons: list[float] | None = None, canaries: int = 200_000) -> dict:
    """The item-inference attackers against `targets` users and the canary audits (no DP, then central, local
    and distributed DP at each target epsilon). `trained`: the central model to audit (else trained here)."""
    cfg = cfg.resolved().validate()
    if cfg.accountant == "pld" and cfg.sampling == "fixed":
        raise ConfigError("the audit calibrates central DP: --accountant pld needs --sampling poisson")
    epsilons = epsilons if epsilons is not None else ([cfg.target_epsilon] if cfg.target_epsilon > 0 else [])
    split = load_data(cfg)
    h = hyper(cfg)
    algorithm = audited_algorithm(cfg, split.n_items, split.rating_scale)
    statistics = algorithm.statistics()
    trained = trained or trained_model(cfg)
    model, users = trained.model, trained.users
    n_items, population = split.n_items, split.n_users
    rate = (cfg.users_per_round or population) / population
    clip = cfg.clipping_norm or 1.0
    repro = cfg.seed if cfg.reproducible_noise else None
    per_item = {name for name, s in statistics.items() if s.per_item}
    prior = prior_log_odds(np.bincount(split.train.item, minlength=n_items), population)
    eligible = np.flatnonzero(split.train_index().counts() >= k)
    chosen = np.sort(seeded_rng(cfg.seed, "audit-targets").choice(eligible, size=min(targets, len(eligible)),
                                                                  replace=False))
    plans = {eps: privacy_plans(cfg, population, eps) for eps in epsilons}
    participations = max(1, int(round(cfg.rounds * rate)))  # of an average user: the aggregate observer's view
    min_users = max(1, int(np.ceil(cfg.secagg_min_fraction * (cfg.users_per_round or population))))
    share_rng = private_rng("device-noise", repro)
    round_ = cfg.rounds + 1
    modes = [m for m in UPDATE_MODES if m != "padded" or DECOYS not in algorithm.refuses]
    scores: dict[tuple, list[tuple[float, float]]] = defaultdict(list)

    def score(setting: tuple, dense: dict, noise_std: float, uploaded=None, secure: str = "none") -> None:
        observer, mode, dp, eps = setting
        direction = direction_scores(dense, model, user_vec, h, noise_std, prior, int(truth.sum()))
        for attacker, s in (("norm", norm_scores(dense, uploaded)), ("direction", direction)):
            scores[(attacker, observer, mode, dp, eps, noise_std, secure)].append(
                (roc_auc(s, truth), precision_at_k(s, truth, k)))

    masked = masked_views(cfg, algorithm, model, chosen, population, round_)  # the server's view under SecAgg+

    for n, user in enumerate(chosen):
        rows = cohort(split, [user])
        truth = np.zeros(n_items, bool)
        truth[rows.train_item] = True
        state = {**take(users, [int(user)]), ROUNDS: torch.zeros(1)}
        # the factor family's p_u (under SVD++ without its implicit part: the attacker is then a little weaker)
        user_vec = state["emb"][0].numpy().astype(np.float64)
        scores[("prior", "none", "-", "none", None, 0.0, "none")].append(
            (roc_auc(prior, truth), precision_at_k(prior, truth, k)))

        def step(mode: str = "dense", noise_std: float = 0.0):
            policy = DevicePolicy(mode, cfg.pad_ratio, clip, noise_std, reproducible_seed=repro,
                                  private_randomness=repro is None)
            return device_step(algorithm, model, state, rows, round_, policy, cfg.seed)

        plain = step()
        for mode in modes:
            upload = plain.upload if mode == "dense" else step(mode).upload
            score(("upload", mode, "none", None), scatter(upload, statistics, n_items), 0.0, upload.get(ITEM_INDEX))
        clean = scatter(plain.upload, statistics, n_items)
        score(("aggregate", "dense", "none", None), clean, 0.0)
        score(("upload", "dense", "none", None), masked[int(user)], clip, secure="secagg+")
        for eps, (central, local) in plans.items():
            uploads = [step(noise_std=local.noise_std).upload for _ in range(local.max_rounds)]
            seen = {key: np.mean([u[key].astype(np.float64) for u in uploads], axis=0) for key in clean}
            score(("upload", "dense", "local", eps), seen, local.noise_std / np.sqrt(local.max_rounds))
            auc, _ = seed_attack(uploads[0], statistics, local.noise_std, cfg.seed, round_, int(user), truth)
            scores[("seed", "upload", "dense", "local", eps, local.noise_std, "none")].append((auc, float("nan")))
            noise_rng = private_rng("central-noise", repro)
            released = [add_central_noise(clean, central.noise_std, noise_rng) for _ in range(participations)]
            seen = {key: np.mean([r[key] for r in released], axis=0) for key in clean}
            score(("aggregate", "dense", "central", eps), seen, central.noise_std / np.sqrt(participations))
            # distributed DP: the least accepted number of users each add their share (the device's function)
            shares = []
            for _ in range(participations):
                release = {key: v.astype(np.float32) for key, v in clean.items()}
                add_device_noise(release, central.noise_std / np.sqrt(min_users), np.full(n_items, min_users),
                                 min_users, per_item, share_rng)
                shares.append(release)
            seen = {key: np.mean([r[key].astype(np.float64) for r in shares], axis=0) for key in clean}
            score(("aggregate", "dense", "distributed", eps), seen, central.noise_std / np.sqrt(participations),
                  secure="secagg+")
        if log and (n + 1) % 10 == 0:
            log(f"audited {n + 1}/{len(chosen)} users")
    results = []
    for (attacker, observer, mode, dp, eps, std, secure), values in scores.items():
        aucs, precs = np.array(values).T
        results.append({"attacker": attacker, "observer": observer, "mode": mode, "dp": dp,
                        "secure_aggregation": secure,
                        "epsilon": _accountant_epsilon(plans, eps, dp, cfg.rounds), "target_epsilon": eps,
                        "auc": float(aucs.mean()), "auc_std": float(aucs.std()),
                        "precision_at_k": None if np.isnan(precs).all() else float(precs.mean()), "k": k,
                        "noise_std": std, "targets": len(chosen)})
    canary_rows = []
    for mode, eps in [("none", None)] + [(m, e) for e in epsilons for m in ("central", "local", "distributed")]:
        mode_cfg = dataclasses.replace(cfg, dp=mode, target_epsilon=eps or 0.0, noise_multiplier=0.0,
                                       secure_aggregation="secagg+" if mode == "distributed" else "none")
        row = canary_audit(mode_cfg, n_items, population, canaries) | ({"target_epsilon": eps} if eps else {})
        canary_rows.append(row)
        if log:
            claimed = "none" if row["epsilon"] is None else f"{row['epsilon']:.3g}"
            log(f"canary audit, dp {row['dp']}: epsilon >= {row['epsilon_lower']:.2f} "
                f"({row['confidence']:.0%} confidence, {row['canaries']} canaries; accountant: {claimed})")
    report = {"dataset": cfg.dataset, "split": cfg.split, "results": results + canary_rows,
              "delta": cfg.target_delta, "clipping_norm": clip, "rounds": cfg.rounds, "sampling_rate": rate,
              "participations_per_user": participations,
              "noise_multiplier": {str(eps): {"central": central.noise_multiplier, "local": local.noise_multiplier}
                                   for eps, (central, local) in plans.items()},
              "local_max_rounds": {str(eps): local.max_rounds for eps, (_, local) in plans.items()},
              "reproducible_noise": cfg.reproducible_noise, "config": cfg.to_dict()}
    if write:
        run_dir = make_run_dir(cfg, "audit")
        write_json(run_dir / "audit.json", report)
        report["run_dir"] = str(run_dir)
    return report


def _accountant_epsilon(plans: dict, eps: float | None, dp: str, rounds: int) -> float | None:
    if eps is None or dp == "none":
        return None
    central, local = plans[eps]
    return (local if dp == "local" else central).guarantee(rounds)  # distributed is accounted as central
