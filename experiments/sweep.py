"""Privacy-utility sweep: for each algorithm and target epsilon, federated accuracy under central DP (or
distributed DP with --dp distributed --secure-aggregation secagg+), with both epsilons (against readers and
against the server), the audit (the item-inference attackers where they read the algorithm's statistics,
else the canary lower bound alone), next to the non-private federated and central results of the same
algorithm and the device-only baseline (the global mean plus the device's own bias, no federation)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from fedrec.audit.audit import audited_algorithm, run_audit
from fedrec.audit.canary import canary_audit
from fedrec.models.algorithm import PARTIAL
from fedrec.models.registry import algorithm_class
from fedrec.run.build import load_data
from fedrec.run.config import ConfigError, RunConfig
from fedrec.run.rundir import main_metric, make_run_dir, write_json
from fedrec.simulations.central import run_central
from fedrec.simulations.federated import simulate

DEVICE_RIDGE = 5.0  # the device-only baseline's ridge on its own bias


def device_only(cfg: RunConfig) -> float | None:
    """RMSE of the global mean plus each user's own ridge bias (no federation); None for implicit data."""
    if cfg.implicit:
        return None
    split = load_data(cfg)
    train, test = split.train, split.test
    mu = float(train.rating.mean())
    counts = np.bincount(train.user, minlength=split.n_users)
    bias = np.bincount(train.user, train.rating - mu, split.n_users) / (counts + DEVICE_RIDGE)
    low, high = split.rating_scale
    return float(np.sqrt(np.mean((np.clip(mu + bias[test.user], low, high) - test.rating) ** 2)))


def model_config(cfg: RunConfig, name: str, log) -> RunConfig:
    """`cfg` for algorithm `name`, adapted to what it declares: every user in every round where it refuses partial
    participation, and its own clipping bound where it has one (each change said)."""
    cls, changes = algorithm_class(name), {}
    if PARTIAL in cls.refuses and cfg.partial:
        changes |= {"users_per_round": 0, "sampling": "fixed"}
    if cls.bounded_norm and cfg.clipping_norm not in (0.0, cls.bounded_norm):
        changes["clipping_norm"] = 0.0
    if changes:
        log(f"{name}: {', '.join(f'{k.replace(chr(95), chr(45))}={v}' for k, v in changes.items())} "
            "(what it admits)")
    return dataclasses.replace(cfg, model=name, **changes).resolved().validate()


def run_sweep(cfg: RunConfig, epsilons: list[float], targets: int = 30, log=print,
              models: list[str] | None = None) -> dict:
    names = models or [cfg.resolved().model]
    run_dir = make_run_dir(cfg.resolved(), "sweep")
    metric = main_metric(cfg.implicit, cfg.top_k)
    mode = "distributed" if cfg.dp == "distributed" else "central"  # the DP each point of the sweep uses
    baseline_device = device_only(cfg)
    results, references = [], {}
    for name in names:
        mcfg = model_config(cfg, name, log) if models else cfg.resolved().validate()
        tag = f"{name}: " if models else ""
        # The non-private references use neither noise nor clipping: clipping is part of the price.
        plain = dataclasses.replace(mcfg, dp="none", noise_multiplier=0.0, target_epsilon=0.0, clipping_norm=0.0,
                                    secure_aggregation="none", out="")
        plain = plain.resolved()
        baseline = run_central(plain, write=False)
        central = baseline.summary["metrics"]
        log(f"{tag}central: {metric} {central[metric]:.4f}")
        folder = run_dir / name if models else run_dir
        non_private = simulate(dataclasses.replace(plain, out=str(folder / "non-private"))).summary["metrics"]
        log(f"{tag}federated, non-private: {metric} {non_private[metric]:.4f}")
        references[name] = {"central": central, "non_private": non_private}
        for eps in epsilons:
            private = dataclasses.replace(mcfg, dp=mode, target_epsilon=eps, noise_multiplier=0.0).resolved()
            outcome = simulate(dataclasses.replace(private, out=str(folder / f"eps-{eps:g}")))
            privacy = outcome.summary["privacy"]
            row = {"model": name, "target_epsilon": eps, "epsilon": privacy["epsilon"],
                   "epsilon_against_server": privacy.get("epsilon_against_server"), "delta": privacy["delta"],
                   "noise_multiplier": privacy["noise_multiplier"], metric: outcome.summary["metrics"].get(metric),
                   "rounds": privacy["rounds"], **_audit(private, baseline, targets, mode)}
            results.append(row)
            auc = "" if row["auc"] is None else (f", aggregate-observer AUC {row['auc']:.3f} (prior "
                                                 f"{row['prior_auc']:.3f})")
            server = "" if row["epsilon_against_server"] is None else \
                f" (against the server {row['epsilon_against_server']:.2f})"
            log(f"{tag}epsilon {eps:g}{server}: {metric} {row[metric]:.4f}, z {row['noise_multiplier']:.3f}{auc}, "
                f"canary epsilon >= {row['epsilon_lower']:.2f}")
    first = references[names[0]]
    report = {"results": results, "non_private": first["non_private"], "central": first["central"],
              "device_only": baseline_device, "metric": metric, "clipping_norm": cfg.clipping_norm,
              "sampling": cfg.sampling, "users_per_round": cfg.users_per_round, "accountant": cfg.accountant,
              "config": cfg.to_dict()}
    if models:
        report["models"], report["references"] = names, references
    write_json(run_dir / "sweep.json", report)
    pd.DataFrame(results).to_csv(run_dir / "sweep.csv", index=False)
    _plot(pd.DataFrame(results), metric, references, baseline_device, mode, run_dir / "sweep.png")
    report["run_dir"] = str(run_dir)
    return report


def _audit(private: RunConfig, baseline, targets: int, mode: str) -> dict:
    """The attackers' AUC where they read the algorithm's statistics (the factor family), and the canary bound."""
    try:
        split = load_data(private)
        audited_algorithm(private, split.n_items, split.rating_scale)
    except ConfigError:  # statistics the item-inference attackers do not read: the canary audit alone
        row = canary_audit(private, split.n_items, split.n_users)
        return {"auc": None, "prior_auc": None, "epsilon_lower": row["epsilon_lower"]}
    audit = run_audit(private, targets, log=None, trained=baseline.result, write=False)  # same clipping as the run
    found = {(r["attacker"], r["observer"], r["dp"]): r for r in audit["results"]}
    return {"auc": found[("direction", "aggregate", mode)]["auc"],
            "prior_auc": found[("prior", "none", "none")]["auc"],
            "epsilon_lower": found[("canary", "aggregate", mode)]["epsilon_lower"]}


def _plot(frame: pd.DataFrame, metric: str, references: dict, device: float | None, mode: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, (name, ref) in zip(colors, references.items()):
        rows = frame[frame["model"] == name]
        ax.plot(rows["epsilon"], rows[metric], marker="o", color=color, label=f"{name}, {mode} DP")
        ax.axhline(ref["non_private"][metric], linestyle="--", color=color, alpha=0.7,
                   label=f"{name}, federated non-private ({ref['non_private'][metric]:.4f})")
        ax.axhline(ref["central"][metric], linestyle=":", color=color, alpha=0.7,
                   label=f"{name}, central ({ref['central'][metric]:.4f})")
    if device is not None:
        ax.axhline(device, linestyle="-", color="gray", alpha=0.7, label=f"device-only ({device:.4f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon (user-level; against the server too where every user takes part)")
    ax.set_ylabel(metric)
    if len(references) == 1 and frame["auc"].notna().any():
        ax2 = ax.twinx()
        ax2.plot(frame["epsilon"], frame["auc"], marker="s", color="tab:red", alpha=0.6, label="audit AUC")
        ax2.plot(frame["epsilon"], frame["prior_auc"], linestyle=":", color="tab:red", alpha=0.6,
                 label="popularity prior")
        ax2.set_ylim(0.45, 1.0)  # 0.5 is chance, 1.0 is full disclosure: keep the scale honest
        ax2.set_ylabel("aggregate-observer AUC (direction attacker)", color="tab:red")
    ax.legend(loc="upper right", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
