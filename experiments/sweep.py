"""Privacy-utility sweep: for each target epsilon, federated accuracy under central DP (or
distributed DP with --dp distributed --secure-aggregation secagg+), the aggregate observer's
audit AUC and the canary lower bound, next to the non-private federated and central results."""

from __future__ import annotations

import dataclasses

import pandas as pd

from fedrec.audit.audit import run_audit
from fedrec.run.config import RunConfig
from fedrec.run.rundir import main_metric, make_run_dir, write_json
from fedrec.simulations.central import run_central
from fedrec.simulations.federated import simulate


def run_sweep(cfg: RunConfig, epsilons: list[float], targets: int = 30, log=print) -> dict:
    cfg = cfg.resolved().validate()
    run_dir = make_run_dir(cfg, "sweep")
    metric = main_metric(cfg.implicit, cfg.top_k)
    mode = "distributed" if cfg.dp == "distributed" else "central"  # the DP each point of the sweep uses
    # The non-private references use neither noise nor clipping: clipping is part of the price.
    plain = dataclasses.replace(cfg, dp="none", noise_multiplier=0.0, target_epsilon=0.0, clipping_norm=0.0,
                                secure_aggregation="none", out="")
    baseline = run_central(plain, write=False)
    central = baseline.summary["metrics"]
    log(f"central: {metric} {central[metric]:.4f}")
    non_private = simulate(dataclasses.replace(plain, out=str(run_dir / "non-private"))).summary["metrics"]
    log(f"federated, non-private: {metric} {non_private[metric]:.4f}")
    model = baseline.result  # the audited updates are taken at the central model
    results = []
    for eps in epsilons:
        private = dataclasses.replace(cfg, dp=mode, target_epsilon=eps, noise_multiplier=0.0)
        outcome = simulate(dataclasses.replace(private, out=str(run_dir / f"eps-{eps:g}")))
        audit = run_audit(private, targets, log=None, trained=model, write=False)  # same clipping as the run
        found = {(r["attacker"], r["observer"], r["dp"]): r for r in audit["results"]}
        auc = found[("direction", "aggregate", mode)]["auc"]
        privacy = outcome.summary["privacy"]
        row = {"target_epsilon": eps, "epsilon": privacy["epsilon"], "delta": privacy["delta"],
               "noise_multiplier": privacy["noise_multiplier"], metric: outcome.summary["metrics"].get(metric),
               "auc": auc, "prior_auc": found[("prior", "none", "none")]["auc"],
               "epsilon_lower": found[("canary", "aggregate", mode)]["epsilon_lower"], "rounds": privacy["rounds"]}
        results.append(row)
        log(f"epsilon {eps:g}: {metric} {row[metric]:.4f}, z {row['noise_multiplier']:.3f}, aggregate-observer AUC "
            f"{auc:.3f} (prior {row['prior_auc']:.3f}), canary epsilon >= {row['epsilon_lower']:.2f}")
    report = {"results": results, "non_private": non_private, "central": central, "metric": metric,
              "clipping_norm": cfg.clipping_norm, "sampling": cfg.sampling, "users_per_round": cfg.users_per_round,
              "accountant": cfg.accountant, "config": cfg.to_dict()}
    write_json(run_dir / "sweep.json", report)
    _plot(pd.DataFrame(results), metric, non_private[metric], central[metric], run_dir / "sweep.png")
    report["run_dir"] = str(run_dir)
    return report


def _plot(frame: pd.DataFrame, metric: str, non_private: float, central: float, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(frame["epsilon"], frame[metric], marker="o", label="federated, central DP")
    ax.axhline(non_private, linestyle="--", color="gray", label=f"federated, non-private ({non_private:.4f})")
    ax.axhline(central, linestyle=":", color="black", label=f"central ({central:.4f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon (user-level)")
    ax.set_ylabel(metric)
    ax2 = ax.twinx()
    ax2.plot(frame["epsilon"], frame["auc"], marker="s", color="tab:red", alpha=0.6, label="audit AUC")
    ax2.plot(frame["epsilon"], frame["prior_auc"], linestyle=":", color="tab:red", alpha=0.6, label="popularity prior")
    ax2.set_ylim(0.45, 1.0)  # 0.5 is chance, 1.0 is full disclosure: keep the scale honest
    ax2.set_ylabel("aggregate-observer AUC (direction attacker)", color="tab:red")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
