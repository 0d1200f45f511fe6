"""`fedrec robustness`: what failures cost, measured on the exact code the engines run.

Three cases, each against a clean run of the same settings and seed:
- dropouts: every sampled device fails with probability --dropout-rate each round;
- stop and resume: the run stops half-way (as on Ctrl-C), fresh devices that kept their
  state on their own disks continue it from the checkpoint: is the result identical?
- poisoning: one client in 100 sends -1000 x its update (fedrec.audit.poisoning).
Runs go through the in-process grid (the ClientApp and strategy the engines run, without
Ray's per-message cost); test_resume_engines.py shows the same resume through Ray.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedrec.client.app import app as client_app
from fedrec.client.storage import ENV_DIR
from fedrec.run.build import num_nodes
from fedrec.run.config import RunConfig
from fedrec.run.rundir import main_metric, make_run_dir, write_json
from fedrec.server.runner import run_server
from fedrec.simulations.federated import _environment, check_population, device_dir
from fedrec.simulations.inprocess import InProcessGrid


def _run(cfg: RunConfig, run_dir: Path, name: str, nodes: int, **kwargs):
    start = time.perf_counter()
    outcome = run_server(InProcessGrid(client_app, nodes, data_dir=cfg.data_dir),
                         dataclasses.replace(cfg, out=str(run_dir / name)), **kwargs)
    return outcome, time.perf_counter() - start


def same_model(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """The same released arrays, bit for bit."""
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def run_robustness(cfg: RunConfig, dropout: float = 0.3, poisoning: bool = True,
                   log: Callable[[str], None] = print) -> dict:
    cfg = cfg.resolved().validate()
    run_dir = make_run_dir(cfg, "robustness")
    nodes = num_nodes(cfg, check_population(cfg))
    metric = main_metric(cfg.implicit, cfg.top_k)
    report: dict = {"metric": metric, "config": cfg.to_dict(), "cases": {}}
    with _environment({ENV_DIR: str(device_dir(run_dir))}):
        clean, seconds = _run(cfg, run_dir, "clean", nodes)
        base = clean.summary["metrics"][metric]
        log(f"clean: {metric} {base:.4f} ({seconds:.0f} s)")

        failing, seconds = _run(dataclasses.replace(cfg, dropout=dropout), run_dir, "dropout", nodes)
        value = failing.summary["metrics"][metric]
        failed = sum(r.get("users_failed", 0) for r in failing.history)
        sampled = sum(r.get("users_sampled", 0) for r in failing.history)
        report["cases"]["dropout"] = {"dropout": dropout, metric: value, "clean": base,
                                      "relative_change": value / base - 1,
                                      "users_failed_share": failed / max(sampled, 1),
                                      "rounds_skipped": sum(int(r.get("skipped", 0)) for r in failing.history)}
        log(f"dropout {dropout:.0%}: {metric} {value:.4f} ({value / base - 1:+.2%}; {failed / max(sampled, 1):.1%} "
            f"of sampled updates lost)")

        stop = threading.Event()
        half = max(1, cfg.rounds // 2)
        stopped, _ = _run(cfg, run_dir, "resumed", nodes, stop=stop,
                          on_round=lambda row: stop.set() if row["round"] == half else None)
        resumed = run_server(InProcessGrid(client_app, nodes, data_dir=cfg.data_dir),
                             dataclasses.replace(cfg, resume=str(stopped.run_dir)))
        identical = resumed.summary["metrics"] == clean.summary["metrics"] and same_model(resumed.model, clean.model)
        report["cases"]["resume"] = {"stopped_after": half, "status_before": stopped.status, "identical": identical,
                                     metric: resumed.summary["metrics"][metric]}
        log(f"stopped after round {half}, resumed on fresh devices: identical to the clean run: {identical}")

    shutil.rmtree(device_dir(run_dir), ignore_errors=True)
    if poisoning:
        from fedrec.audit.poisoning import run_poisoning

        report["cases"]["poisoning"] = run_poisoning(dataclasses.replace(cfg, out=str(run_dir / "poisoning")), log=log)
    write_json(run_dir / "robustness.json", report)
    report["run_dir"] = str(run_dir)
    return report
