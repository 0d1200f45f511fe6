"""ServerApp: discover the nodes, run the strategy, write the run directory."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedrec.common.config import RunConfig
from fedrec.common.rundir import main_metric, make_run_dir, plot_metric, write_config, write_history, write_json
from fedrec.models import ItemParams, initial_global_bias
from fedrec.common.build import hyper

from .directory import discover
from .strategy import FedRecStrategy, array_record


@dataclass
class FederatedOutcome:
    summary: dict
    history: list[dict]
    items: ItemParams
    run_dir: Path
    audit: list[dict] = field(default_factory=list)


def run_server(grid: Grid, cfg: RunConfig, on_round: Callable[[dict], None] | None = None) -> FederatedOutcome:
    start = time.perf_counter()
    cfg = cfg.resolved().validate()
    random.seed(cfg.seed)  # Flower samples with Python's global random; we sample users ourselves
    config = ConfigRecord(cfg.to_dict())
    directory = discover(grid, config)
    if cfg.users_per_round > directory.population:
        raise ValueError(f"users-per-round={cfg.users_per_round} exceeds the {directory.population} users")
    items = ItemParams.init(directory.num_items, hyper(cfg), initial_global_bias(cfg.implicit, directory.rating_scale))
    run_dir = make_run_dir(cfg, "federated")
    audit: list[dict] = []
    audit_file = open(run_dir / "audit.jsonl", "w")

    def record(line: dict) -> None:
        audit.append(line)
        audit_file.write(json.dumps(line) + "\n")

    strategy = FedRecStrategy(cfg, directory, items, on_round=on_round, audit=record)
    try:
        strategy.start(grid=grid, initial_arrays=array_record(items), num_rounds=cfg.rounds,
                       train_config=config, evaluate_config=config)
    finally:
        audit_file.close()
    metric = main_metric(cfg.implicit, cfg.top_k)
    frame = write_history(run_dir, strategy.history)
    final = {k: v for k, v in strategy.history[-1].items()
             if k not in ("round", "users_sampled", "bytes_up", "bytes_down", "seconds", "train_loss")}
    summary = {
        "mode": "federated", "dataset": cfg.dataset, "split": cfg.split, "metrics": final, "rounds": cfg.rounds,
        "wall_seconds": time.perf_counter() - start, "num_users": directory.population,
        "num_nodes": len(directory.node_ids), "bytes_up": strategy.bytes_up, "bytes_down": strategy.bytes_down,
        "config": cfg.to_dict(),
    }
    write_config(run_dir, cfg)
    write_json(run_dir / "summary.json", summary)
    plot_metric(frame, "round", metric, run_dir / f"{metric.replace('@', '_at_')}.png",
                f"federated {cfg.dataset} {cfg.split}: {metric} per round")
    return FederatedOutcome(summary, strategy.history, items, run_dir, audit)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run .`: every setting comes from [tool.flwr.app.config]."""
    run_server(grid, RunConfig.from_mapping(dict(context.run_config)))
