"""Throughput and memory benchmark through Flower's simulation engine (Ray backend).

Each case runs in a fresh child process so that peak RSS covers exactly that case's
process tree (driver, Ray daemons, workers) and nothing a previous case left behind.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import time

from fedrec.run.config import RunConfig
from fedrec.run.rundir import main_metric, make_run_dir, write_json

from .memory import PeakRSS

# Flower and Ray are imported inside the cases: the CLI imports this module for its case names.
CASE_NAMES = ("engine-floor", "ml100k-one-user-per-node", "ml100k-cohorts-mf", "ml100k-cohorts-bpmf", "synthetic-100k",
              "synthetic-1m", "ml100k-deploy-4-supernodes")
DEFAULT_CASES = ("engine-floor", "ml100k-one-user-per-node", "ml100k-cohorts-mf", "ml100k-cohorts-bpmf",
                 "synthetic-100k")


def engine_floor(rounds: int) -> dict:
    """Seconds per round of an app that does nothing (experiments/floor_app.py) on the engine
    fedrec's runs use (simulations/engine.py), two nodes, a Ray of two CPUs."""
    import tempfile
    from pathlib import Path

    from fedrec.simulations.engine import Engine, RunFailed, ray_federation, toml_lines, write_app

    from . import floor_app

    with tempfile.TemporaryDirectory(prefix="fedrec-floor-") as tmp:
        work = Path(tmp)
        result = work / "floor.json"
        with Engine(work / "engine") as engine:
            engine.start()
            app = write_app(work / "app", f"{floor_app.__name__}:server", f"{floor_app.__name__}:client",
                            floor_app.CONFIG)
            (work / "run.toml").write_text(toml_lines({"rounds": rounds, "out": str(result)}))
            engine.run(app, work / "run.toml", ray_federation("", 2, 2))
            listing = engine.status()
            if listing.get("status") != "finished:completed" or not result.is_file():
                raise RunFailed(f"the engine floor run ended {listing.get('status', 'without a run')}:\n"
                                f"{engine.tail()}")
        return {"engine_floor_seconds_per_round": json.loads(result.read_text())["seconds_per_round"]}


def fedrec_case(cfg: RunConfig) -> dict:
    import numpy as np

    from fedrec.run.build import ensure_shards, num_nodes, population
    from fedrec.simulations.federated import simulate

    # Partitioning happens once per data set, split and node count (cached); measured apart
    # from training so the training peak is what every later run of the case costs.
    start = time.perf_counter()
    users = population(cfg)
    with PeakRSS() as cut:
        shards = ensure_shards(cfg, num_nodes(cfg, users))
    partition_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with PeakRSS() as peak:
        outcome = simulate(cfg)
    end_to_end = time.perf_counter() - start
    metric = main_metric(cfg.implicit, cfg.top_k)
    train_rounds = [r for r in outcome.history[1:] if metric not in r] or outcome.history
    seconds = float(np.mean([r["seconds"] for r in train_rounds]))
    per_round = float(np.mean([r["users_sampled"] for r in train_rounds]))
    return {**_model_of(cfg), "updates_per_second": per_round / seconds, "seconds_per_round": seconds,
            "max_seconds_per_round": float(np.max([r["seconds"] for r in train_rounds])),
            "end_to_end_seconds": end_to_end, "peak_rss_mb": peak.mb, "peak_rss_by_process": peak.breakdown_mb(),
            "rounds": cfg.rounds,
            "users_per_round": per_round, "num_users": users, "num_nodes": outcome.summary["num_nodes"],
            "metrics": outcome.summary["metrics"], "measured_rounds": len(train_rounds),
            "partition_seconds": partition_seconds, "partition_peak_rss_mb": cut.mb,
            "shard_set": str(shards), "shard_set_mb": _size_mb(shards)}


def deploy_vs_ray(cfg: RunConfig, supernodes: int = 4) -> dict:
    """The same seeded run on the Deployment Engine (loopback SuperLink and `supernodes`
    cohort SuperNode processes, each on its shard) and on the Ray engine with the same shares."""
    from .scaleout import deploy_case, ray_case

    ray, deployed = ray_case(cfg, supernodes), deploy_case(cfg, supernodes)
    return {**_model_of(cfg), "supernodes": supernodes, "rmse_deployment": deployed["rmse"], "rmse_ray": ray["rmse"],
            "rmse_difference": abs(deployed["rmse"] - ray["rmse"]),
            "seconds_per_round_deployment": deployed["seconds_per_round"],
            "seconds_per_round_ray": ray["seconds_per_round"], "deployment": deployed, "ray": ray}


def _model_of(cfg: RunConfig) -> dict:
    """The model a case timed and its K, as the run resolved them."""
    resolved = cfg.resolved()
    return {"model": resolved.model, "dim": resolved.dim}


def _size_mb(folder) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def _in_child(target, *args) -> dict:
    """Run one case in a fresh process (spawned, so no Ray or torch state is inherited)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(target, args)


def cases(base: RunConfig, rounds: int, one_user_rounds: int) -> dict[str, RunConfig]:
    """The named cases of `fedrec bench --cases` (besides `engine-floor`). Each pins the model it times,
    at that model's default K (dim -1: 32 for MF, models/mf.py's BPMF_DIM for BPMF); ML-100K's cohort
    case runs under both, so that what the default (BPMF, where every user takes part) costs shows."""
    common = dict(model="mf", dim=-1, local_epochs=1, rounds=rounds, eval_every=rounds, out="")
    ml = dataclasses.replace(base, **common, split="u1" if base.dataset == "ml-100k" else "random")
    if base.dataset == "synthetic":  # ML-100K's shape, with synthetic ratings
        ml = dataclasses.replace(ml, synthetic_users=943, synthetic_items=1682, synthetic_density=0.063)
    synthetic = dataclasses.replace(base, **common, dataset="synthetic", split="random", data_dir="",
                                    users_per_node=0)
    return {
        "ml100k-one-user-per-node": dataclasses.replace(ml, users_per_node=1, rounds=one_user_rounds,
                                                        eval_every=one_user_rounds),
        "ml100k-cohorts-mf": dataclasses.replace(ml, users_per_node=0),
        "ml100k-cohorts-bpmf": dataclasses.replace(ml, users_per_node=0, model="bpmf"),
        "synthetic-100k": dataclasses.replace(synthetic, synthetic_users=100_000, synthetic_items=5_000,
                                              synthetic_density=0.01, users_per_round=10_000),
        # ~50 ratings per user after duplicate draws collapse; 10% of the users per round
        "synthetic-1m": dataclasses.replace(synthetic, synthetic_users=1_000_000, synthetic_items=20_000,
                                            synthetic_density=0.0028, users_per_round=100_000),
        # Flower's Deployment Engine starts a ClientApp process per message: seconds per round
        "ml100k-deploy-4-supernodes": dataclasses.replace(ml, rounds=min(rounds, 4), eval_every=min(rounds, 4),
                                                          seed=7),
    }


def run_bench(base: RunConfig, rounds: int, one_user_rounds: int, names=DEFAULT_CASES, log=print) -> dict:
    """`base` says where ML-100K is (dataset ml-100k + data-dir), else its shape is synthesized."""
    unknown = sorted(set(names) - set(CASE_NAMES))
    if unknown:
        raise ValueError(f"unknown bench case(s) {', '.join(unknown)}; choose from {', '.join(CASE_NAMES)}")
    run_dir = make_run_dir(base, "bench")
    report: dict = {"cases": {}}
    if "engine-floor" in names:
        report.update(_in_child(engine_floor, rounds))
        log(f"engine floor: {report['engine_floor_seconds_per_round']:.3f} s/round")
    for name, cfg in cases(base, rounds, one_user_rounds).items():
        if name not in names:
            continue
        runner = deploy_vs_ray if name == "ml100k-deploy-4-supernodes" else fedrec_case
        report["cases"][name] = result = _in_child(runner, cfg)
        log(f"{name}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()})}")
        write_json(run_dir / "bench.json", report)  # what is done so far survives a later case failing
    found = report["cases"]
    if "ml100k-one-user-per-node" in found and "synthetic-100k" in found:
        report["speedup_synthetic_vs_one_user_per_node"] = (found["synthetic-100k"]["updates_per_second"]
                                                            / found["ml100k-one-user-per-node"]["updates_per_second"])
    for name in ("ml100k-cohorts-mf", "ml100k-cohorts-bpmf"):
        if name in found and "engine_floor_seconds_per_round" in report:
            found[name]["seconds_per_round_over_engine_floor"] = (found[name]["seconds_per_round"]
                                                                  - report["engine_floor_seconds_per_round"])
    write_json(run_dir / "bench.json", report)
    report["run_dir"] = str(run_dir)
    return report
