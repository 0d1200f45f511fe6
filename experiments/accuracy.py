"""Accuracy benchmark: central vs federated on ML-100K (u1-u5, leave-one-out) and on
synthetic data with a known answer. Prints a table and writes accuracy.json."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextvars import ContextVar

import numpy as np

from fedrec.datasets import generate
from fedrec.models.registry import ALGORITHMS, algorithm_class
from fedrec.run.build import load_data, synthetic_spec
from fedrec.run.config import RunConfig
from fedrec.run.rundir import main_metric, make_run_dir, write_json
from fedrec.simulations.central import run_central
from fedrec.simulations.federated import simulate

from .peers import peer_results

# How a federated run is run: Flower's engine (simulate), or with --repeats in this process, shared by
# every run (experiments/repeats.py). Set for a whole suite, so the helpers below keep their signatures.
_FEDERATE: ContextVar[Callable | None] = ContextVar("federate", default=None)


def _fed(cfg: RunConfig, users_per_node: int, log) -> dict:
    start = time.perf_counter()
    outcome = (_FEDERATE.get() or simulate)(dataclasses.replace(cfg, users_per_node=users_per_node))
    metric = main_metric(cfg.implicit, cfg.top_k)
    rows = [r for r in outcome.history if metric in r]
    log(f"federated {cfg.dataset} {cfg.split}: {outcome.summary['metrics']} in {time.perf_counter() - start:.1f} s")
    per_round = [r["seconds"] for r in outcome.history if "seconds" in r]
    return {"metrics": outcome.summary["metrics"], "rounds": cfg.rounds, "wall_seconds": outcome.wall_seconds,
            "mean_round_seconds": float(np.mean(per_round)) if per_round else None,
            "num_nodes": outcome.summary["num_nodes"],
            "curve": [{"round": r["round"], metric: r[metric]} for r in rows]}


def _central(cfg: RunConfig, log) -> dict:
    outcome = run_central(cfg, write=False)
    log(f"central {cfg.dataset} {cfg.split}: {outcome.summary['metrics']} in {outcome.summary['train_seconds']:.2f} s")
    return {"metrics": outcome.summary["metrics"], "epochs": cfg.epochs, "model": outcome.summary["model"],
            "train_seconds": outcome.summary["train_seconds"], "wall_seconds": outcome.summary["wall_seconds"]}


def _peers(cfg: RunConfig, log, split=None) -> dict:
    """Surprise's SVD, SVD++ and KNNBaseline on the same split (skipped, with why, without the extra)."""
    peers = peer_results(split if split is not None else load_data(cfg), cfg.seed)
    for name, result in peers.items():
        log(f"peer {name} {cfg.dataset} {cfg.split}: " + (result["skipped"] if "skipped" in result else
                                                         f"rmse {result['rmse']:.4f} in {result['seconds']:.1f} s"))
    return peers


def _folds(ml: RunConfig, users_per_node: int, log) -> dict:
    """u1..u5: central, federated and the peers on each fold, and their means (the published protocol)."""
    folds = {}
    for k in range(1, 6):
        fold = dataclasses.replace(ml, split=f"u{k}")
        folds[f"u{k}"] = {"central": _central(fold, log), "federated": _fed(fold, users_per_node, log),
                          "peers": _peers(fold, log)}
    mean = {side: float(np.mean([f[side]["metrics"]["rmse"] for f in folds.values()]))
            for side in ("central", "federated")}
    for peer in folds["u1"]["peers"]:
        if all("rmse" in f["peers"][peer] for f in folds.values()):
            mean[f"peer {peer}"] = float(np.mean([f["peers"][peer]["rmse"] for f in folds.values()]))
    return {"folds": folds, "mean_rmse": mean}


def _tuned(cfg: RunConfig, trials: int, run_dir, users_per_node: int, log) -> dict:
    """Federated settings chosen by `fedrec tune` (validation split of the training rows, `trials`
    Optuna trials), then one federated run with them scored on the test rows, beside the peers."""
    from .tune import Budget, apply, tune

    name = f"{cfg.dataset}-{cfg.split}"
    (run_dir / f"tune-{name}").mkdir()
    report = tune(dataclasses.replace(cfg, out=""), Budget.of(trials), run_dir=run_dir / f"tune-{name}",
                  sides=("federated",))
    chosen = report["chosen"]["federated"]
    log(f"tuned {name}: {chosen}")
    peers = _peers(cfg, log)
    best_peer = min((p["rmse"] for p in peers.values() if "rmse" in p), default=None)
    federated = _fed(apply(cfg, "federated", chosen), users_per_node, log)
    return {"chosen": chosen, "trials": trials, "federated": federated, "peers": peers, "best_peer_rmse": best_peer,
            "no_worse_than_best_peer": None if best_peer is None else federated["metrics"]["rmse"] <= best_peer}


def run_accuracy(cfg: RunConfig, users_per_node: int = 0, log=print, tune_trials: int = 0) -> dict:
    """`cfg` carries data-dir, out and any model settings; datasets and splits are fixed here."""
    run_dir = make_run_dir(cfg, "accuracy")
    report = _suite(cfg, users_per_node, log, tune_trials, run_dir)
    write_json(run_dir / "accuracy.json", report)
    report["run_dir"] = str(run_dir)
    return report


def _suite(cfg: RunConfig, users_per_node: int, log, tune_trials: int, run_dir) -> dict:
    """Every case once, with cfg's seed."""
    ml = dataclasses.replace(cfg, dataset="ml-100k", out="")
    report: dict = {"settings": cfg.resolved().to_dict(), "users_per_node": users_per_node, "cases": {}}
    report["cases"]["ml100k-u1-u5"] = _folds(ml, users_per_node, log)
    report["cases"]["ml100k-u1"] = report["cases"]["ml100k-u1-u5"]["folds"]["u1"]
    # The other model on u1: the first other registered one. The run's settings go with it only where
    # both read the same settings (BPMF's dim and regs mean other things than MF's): else it, and
    # leave-one-out, run with the defaults.
    defaults = RunConfig(dataset="ml-100k", data_dir=cfg.data_dir, seed=cfg.seed)
    model = cfg.resolved().model
    other = next(name for name in ALGORITHMS if name != model)
    base = ml if algorithm_class(model).settings_read == algorithm_class(other).settings_read else defaults
    u1_other = dataclasses.replace(base, split="u1", model=other)
    report["cases"][f"ml100k-u1-{other}"] = {"central": _central(u1_other, log),
                                              "federated": _fed(u1_other, users_per_node, log)}
    # Leave-one-out with the implicit defaults (the device's recency term on), and without the term.
    loo = dataclasses.replace(base, split="loo").resolved()
    report["cases"]["ml100k-loo"] = {"central": _central(loo, log), "federated": _fed(loo, users_per_node, log)}
    plain = dataclasses.replace(loo, recency_weight=0.0)
    report["cases"]["ml100k-loo-no-recency"] = {"central": _central(plain, log),
                                                "federated": _fed(plain, users_per_node, log)}
    syn = dataclasses.replace(cfg, dataset="synthetic", split="random", out="")
    split = load_data(syn)
    truth = generate(synthetic_spec(syn))[1]
    oracle = float(np.sqrt(np.mean((truth.expected(split.test.user, split.test.item) - split.test.rating) ** 2)))
    report["cases"]["synthetic"] = {"oracle_rmse": oracle, "central": _central(syn, log),
                                    "federated": _fed(syn, users_per_node, log), "peers": _peers(syn, log, split)}
    if tune_trials:  # the issue's --tune target: tuned federated RMSE vs the best peer on each data set
        report["tuned"] = {f"{c.dataset}-{c.split}": _tuned(c, tune_trials, run_dir, users_per_node, log)
                           for c in (syn, dataclasses.replace(ml, split="u1"), dataclasses.replace(ml, split="random"))}
    for name in ("ml100k-u1", f"ml100k-u1-{other}", "ml100k-loo", "ml100k-loo-no-recency", "synthetic"):
        case = report["cases"][name]
        c, f = case["central"]["metrics"], case["federated"]["metrics"]
        case["gap"] = {k: f[k] - c[k] for k in c if k in f and k != "train_loss"}
        if "rmse" in c:
            case["ratio_rmse"] = f["rmse"] / c["rmse"]
    return report
