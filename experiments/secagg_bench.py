"""What SecAgg+ costs, side by side with plain aggregation in the same run: seconds per
round and payload bytes per device per round, for one-user nodes in process (the
protocol's own cost, no engine), a Ray cohort simulation, and a loopback deployment.

fedrec's share of a secure round is the time spent in `device_step` (training, clipping,
noise, upload); the rest is the protocol (key agreement, secret sharing, masking,
unmasking) and message handling.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import fedrec.client.app as client_module
from fedrec.client.app import app as client_app
from fedrec.deploy.loopback import Processes, flower_env, flwr_run, start_federation
from fedrec.run.config import RunConfig
from fedrec.run.rundir import main_metric, make_run_dir, write_json
from fedrec.server.runner import run_server
from fedrec.simulations.federated import simulate
from fedrec.simulations.inprocess import InProcessGrid


def payload_bytes(content) -> int:
    """Bytes of what a message carries: array data, config values, 8 per metric."""
    total = sum(len(a.data) for record in content.array_records.values() for a in record.values())
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in items)
    total += 8 * sum(len(record) for record in content.metric_records.values())
    return total


class _Timed:
    """Counts the seconds spent in fedrec's device step while installed."""

    def __init__(self):
        self.seconds, self.real = 0.0, client_module.device_step

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.real(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __enter__(self):
        client_module.device_step = self
        return self

    def __exit__(self, *exc):
        client_module.device_step = self.real


def _inprocess(cfg: RunConfig, nodes: int, rounds: int) -> dict:
    grid = InProcessGrid(client_app, nodes, data_dir=cfg.data_dir)
    with _Timed() as timed:
        start = time.perf_counter()
        outcome = run_server(grid, dataclasses.replace(cfg, synthetic_users=nodes, rounds=rounds, eval_every=rounds,
                                                       users_per_round=0))
        wall = time.perf_counter() - start
    train_rounds = [r for r in outcome.history if main_metric(cfg.implicit, cfg.top_k) not in r]  # not evaluating
    per_round = float(np.mean([r["seconds"] for r in train_rounds])) if train_rounds else float("nan")
    up = sum(payload_bytes(r.content) for r in grid.replies if _is_train(r))
    down = sum(payload_bytes(m.content) for m in grid.sent if _is_train(m))
    return {"seconds_per_round": per_round, "wall_seconds": wall, "device_step_seconds": timed.seconds,
            "bytes_up_per_device_round": up / (nodes * rounds), "bytes_down_per_device_round": down / (nodes * rounds)}


def _is_train(message) -> bool:
    return message.metadata.message_type == "train"


def _ray(cfg: RunConfig, rounds: int) -> dict:
    start = time.perf_counter()
    outcome = simulate(dataclasses.replace(cfg, rounds=rounds, eval_every=rounds, users_per_round=0))
    metric = main_metric(cfg.implicit, cfg.top_k)
    train_rounds = [r for r in outcome.history[1:] if metric not in r]  # round 1 warms the engine up
    return {"seconds_per_round": float(np.mean([r["seconds"] for r in train_rounds])),
            "wall_seconds": time.perf_counter() - start, "nodes": outcome.summary["num_nodes"]}


def _deployment(cfg: RunConfig, nodes: int, rounds: int, secure: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        procs = Processes(flower_env(work / "flwr-home"))
        try:
            port = start_federation(procs, work, nodes)
            out = work / "run"
            settings = (f"rounds={rounds} eval-every={rounds} synthetic-users={nodes} synthetic-items="
                        f"{cfg.synthetic_items} model='{cfg.model}' split='{cfg.split}' "
                        f"clipping-norm={cfg.clipping_norm} out='{out}'"
                        + (" secure-aggregation='secagg+'" if secure else ""))
            start = time.perf_counter()
            run, output = flwr_run(procs.env, "dep", port, settings)
            wall = time.perf_counter() - start
            if run.get("status") != "finished:completed":
                raise RuntimeError(f"deployment run failed: {output}")
            frame = pd.read_csv(out / "metrics.csv")
            metric = main_metric(cfg.implicit, cfg.top_k)
            train = frame[frame[metric].isna()] if metric in frame else frame
            return {"seconds_per_round": float(train["seconds"].mean()), "wall_seconds": wall}
        finally:
            procs.stop()


def run_secagg_bench(cfg: RunConfig, inprocess_nodes: list[int], deploy_nodes: list[int], rounds: int,
                     log=print) -> dict:
    # The model is resolved with SecAgg+ on (--model auto runs one that admits it), then the plain cases
    # run the same model and settings with the sum in the clear.
    secure = dataclasses.replace(cfg, dp="none", update_mode="dense", clipping_norm=cfg.clipping_norm or 0.05,
                                 secure_aggregation="secagg+").resolved().validate()
    cfg = dataclasses.replace(secure, secure_aggregation="none")
    run_dir = make_run_dir(cfg, "secagg-bench")
    report: dict = {"inprocess": {}, "ray_cohorts": {}, "deployment": {}, "rounds": rounds}
    for nodes in inprocess_nodes:
        for name, case in (("plain", cfg), ("secagg+", secure)):
            row = _inprocess(dataclasses.replace(case, out=str(run_dir / f"inprocess-{nodes}-{name}")), nodes, rounds)
            report["inprocess"].setdefault(str(nodes), {})[name] = row
            log(f"in process, {nodes} one-user nodes, {name}: {row['seconds_per_round']:.3f} s/round, "
                f"{row['bytes_up_per_device_round']:.0f} B up per device, {row['device_step_seconds']:.2f} s of "
                f"{row['wall_seconds']:.2f} s in fedrec's device step")
    for name, case in (("plain", cfg), ("secagg+", secure)):
        row = _ray(dataclasses.replace(case, out=str(run_dir / f"ray-{name}")), rounds)
        report["ray_cohorts"][name] = row
        log(f"Ray, {row['nodes']} cohort nodes of {cfg.synthetic_users} users, {name}: "
            f"{row['seconds_per_round']:.3f} s/round")
    for nodes in deploy_nodes:
        for name, secured in (("plain", False), ("secagg+", True)):
            row = _deployment(cfg, nodes, rounds, secured)
            report["deployment"].setdefault(str(nodes), {})[name] = row
            log(f"loopback deployment, {nodes} SuperNodes, {name}: {row['seconds_per_round']:.2f} s/round")
    write_json(run_dir / "secagg_bench.json", report)
    report["run_dir"] = str(run_dir)
    return report
