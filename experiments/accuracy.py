"""Accuracy benchmark: central vs federated on ML-100K (u1-u5, leave-one-out) and on
synthetic data with a known answer. Prints a table and writes accuracy.json.

The federated runs go through the engine one after another in this thread (their Ctrl-C handling
needs the main thread); unless `concurrent` is off, the central runs and the peers run meanwhile in
one other thread. Each federated run spends most of its wall time starting Flower's and Ray's
processes, single-threaded imports that leave a core idle on this 2-core machine, and the central
runs and peers use one core (one torch thread, the CLI's default). Their seconds in the report are
then measured beside each other, not alone: the report says which (`concurrent`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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


class _Inline:
    """An executor that runs what it is given at once, in this thread (`concurrent` off)."""

    def submit(self, fn, *args) -> Future:
        future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _done(value):
    """`value` with every Future in it (in dicts, at any depth) replaced by its result."""
    if isinstance(value, Future):
        return _done(value.result())
    if isinstance(value, dict):
        return {k: _done(v) for k, v in value.items()}
    return value


def _folds(ml: RunConfig, users_per_node: int, log, aside=None) -> dict:
    """u1..u5: central, federated and the peers on each fold, and their means (the published protocol).
    `aside`: where the central runs and the peers go (an executor; none: here, one after another)."""
    aside = aside or _Inline()
    folds = {}
    for k in range(1, 6):
        fold = dataclasses.replace(ml, split=f"u{k}")
        folds[f"u{k}"] = {"central": aside.submit(_central, fold, log), "peers": aside.submit(_peers, fold, log)}
        folds[f"u{k}"]["federated"] = _fed(fold, users_per_node, log)
    folds = _done(folds)
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


def run_accuracy(cfg: RunConfig, users_per_node: int = 0, log=print, tune_trials: int = 0,
                 concurrent: bool = True) -> dict:
    """`cfg` carries data-dir, out and any model settings; datasets and splits are fixed here.
    `concurrent`: central runs and peers beside the federated runs (module docstring)."""
    run_dir = make_run_dir(cfg, "accuracy")
    aside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="accuracy-central") if concurrent else _Inline()
    try:
        report = _suite(cfg, users_per_node, log, tune_trials, run_dir, aside)
    finally:
        aside.shutdown(wait=True, cancel_futures=True)  # Ctrl-C or a failure: what has not started never starts
    report["concurrent"] = concurrent
    write_json(run_dir / "accuracy.json", report)
    report["run_dir"] = str(run_dir)
    return report


def _suite(cfg: RunConfig, users_per_node: int, log, tune_trials: int, run_dir, aside=None) -> dict:
    """Every case once, with cfg's seed; `aside` as in _folds."""
    aside = aside or _Inline()
    ml = dataclasses.replace(cfg, dataset="ml-100k", out="")
    report: dict = {"settings": cfg.resolved().to_dict(), "users_per_node": users_per_node, "cases": {}}
    report["cases"]["ml100k-u1-u5"] = _folds(ml, users_per_node, log, aside)
    report["cases"]["ml100k-u1"] = report["cases"]["ml100k-u1-u5"]["folds"]["u1"]
    # The other model on u1: the first other registered one. The run's settings go with it only where
    # both read the same settings (BPMF's dim and regs mean other things than MF's): else it, and
    # leave-one-out, run with the defaults.
    defaults = RunConfig(dataset="ml-100k", data_dir=cfg.data_dir, seed=cfg.seed)
    model = cfg.resolved().model
    other = next(name for name in ALGORITHMS if name != model)
    base = ml if algorithm_class(model).settings_read == algorithm_class(other).settings_read else defaults
    u1_other = dataclasses.replace(base, split="u1", model=other)
    # Leave-one-out with the implicit defaults (the device's recency term on), and without the term.
    loo = dataclasses.replace(base, split="loo").resolved()
    plain = dataclasses.replace(loo, recency_weight=0.0)
    syn = dataclasses.replace(cfg, dataset="synthetic", split="random", out="")
    split = load_data(syn)
    truth = generate(synthetic_spec(syn))[1]
    oracle = float(np.sqrt(np.mean((truth.expected(split.test.user, split.test.item) - split.test.rating) ** 2)))
    later = {f"ml100k-u1-{other}": u1_other, "ml100k-loo": loo, "ml100k-loo-no-recency": plain, "synthetic": syn}
    for name, case in later.items():
        report["cases"][name] = {"central": aside.submit(_central, case, log)}
    report["cases"]["synthetic"] |= {"oracle_rmse": oracle, "peers": aside.submit(_peers, syn, log, split)}
    for name, case in later.items():
        report["cases"][name]["federated"] = _fed(case, users_per_node, log)
    for name in later:
        report["cases"][name] = _done(report["cases"][name])
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
