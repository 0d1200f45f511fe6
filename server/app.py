"""ServerApp: discover the nodes, run the strategy, write the run directory."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from logging import WARNING

from flwr.app import ConfigRecord, Context
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp import Grid, ServerApp

from fedrec.common import schema
from fedrec.common.config import ConfigError, RunConfig
from fedrec.common.rundir import main_metric, make_run_dir, plot_metric, write_config, write_history, write_json
from fedrec.models import ItemParams, initial_global_bias
from fedrec.common.build import hyper

from .directory import discover
from .privacy import PrivacyPlan, participation_cap
from .secagg import SecureGrid, secagg_setup, secure_summary
from .releases import WithheldLogLines, is_evaluation, release_ledger
from .strategy import BudgetExhausted, FedRecStrategy, array_record


def privacy_plan(cfg: RunConfig, population: int) -> tuple[RunConfig, PrivacyPlan | None]:
    """The run's DP plan. Local DP caps each user's rounds (auto: a cap about 1 in 100 runs
    would reach) and accounts for the cap, not the average; with --target-epsilon and no z,
    z is calibrated for cfg.rounds (central, distributed) or the cap (local)."""
    if cfg.dp == "none":
        return cfg, None
    sample = cfg.users_per_round or population
    cap = 0
    if cfg.dp in ("local", "distributed"):  # distributed: the server knows who took part, so it is capped too
        cap = cfg.max_rounds_per_user or participation_cap(cfg.rounds, sample / population, population)
        cap = min(cap, cfg.rounds)
        cfg = dataclasses.replace(cfg, max_rounds_per_user=cap)
    plan = PrivacyPlan(cfg.dp, cfg.noise_multiplier, cfg.clipping_norm, cfg.sampling, sample, population,
                       cfg.target_delta, cfg.accountant, max_rounds=cap)
    if plan.noise_multiplier <= 0:
        rounds = cap if cfg.dp == "local" else cfg.rounds  # distributed: calibrated as central DP
        z = plan.calibrate(cfg.target_epsilon, rounds) + 1e-3  # Brent's tolerance is 1e-4: stay inside
        plan = dataclasses.replace(plan, noise_multiplier=z)
        cfg = dataclasses.replace(cfg, noise_multiplier=z)
    return cfg, plan


NOT_PRIVATE = "none: noise, decoys and sampling are derivable from the seed (--reproducible-noise)"
AGAINST_THE_SERVER = {
    "central": "; not against the server, which sees each upload before it adds the noise",
    "local": ", and against the server for training uploads (evaluation replies are not covered)",
    "distributed": "; against the server, which sees only the SecAgg+ sum of noised updates but knows who was "
                   "sampled (no amplification), see epsilon_against_server (evaluation replies are not covered)",
}


def privacy_summary(cfg: RunConfig, plan: PrivacyPlan | None, strategy: FedRecStrategy) -> dict | None:
    if plan is None:
        return None
    summary = {"mode": plan.mode, "epsilon": strategy.epsilon, "delta": plan.delta,
               "noise_multiplier": plan.noise_multiplier, "clipping_norm": plan.clipping_norm,
               "sampling": plan.sampling, "sampling_rate": plan.rate, "rounds": strategy.rounds_trained,
               "accountant": f"dp-accounting-{plan.accountant}", "unit": "user",
               "target_epsilon": cfg.target_epsilon or None,
               "reproducible_noise": cfg.reproducible_noise,
               "guarantee": NOT_PRIVATE if cfg.reproducible_noise else
               f"({strategy.epsilon:.4g}, {plan.delta:g})-DP at user level against whoever reads what the run "
               "releases" + AGAINST_THE_SERVER[plan.mode],
               "releases": release_ledger(plan.mode)}
    if plan.mode == "local":
        summary["epsilon_per_round"] = plan.epsilon(1)
        summary["max_rounds_per_user"] = plan.max_rounds
        summary["epsilon_at_cap"] = plan.epsilon(plan.max_rounds)
    if plan.mode == "distributed":
        rounds_taken = int(strategy.participation.max())
        summary["max_rounds_per_user"] = plan.max_rounds
        summary["epsilon_against_server"] = plan.server_epsilon(rounds_taken)
        summary["epsilon_against_server_at_cap"] = plan.server_epsilon(plan.max_rounds)
    return summary


@dataclass
class FederatedOutcome:
    summary: dict
    history: list[dict]
    items: ItemParams
    run_dir: Path
    audit: list[dict] = field(default_factory=list)  # every reply's shape, in memory (DP runs write none)
    wall_seconds: float = 0.0


def run_server(grid: Grid, cfg: RunConfig, on_round: Callable[[dict], None] | None = None) -> FederatedOutcome:
    start = time.perf_counter()
    cfg = cfg.resolved().validate()
    random.seed(cfg.seed)  # Flower samples with Python's global random; we sample users ourselves
    directory = discover(grid, ConfigRecord(cfg.to_dict()))
    if cfg.users_per_round > directory.population:
        raise ValueError(f"users-per-round={cfg.users_per_round} exceeds the {directory.population} users")
    cfg, plan = privacy_plan(cfg, directory.population)
    if cfg.reproducible_noise:
        log(WARNING, "--reproducible-noise: DP noise, decoys, sampling and starting user vectors derive from the "
                     "seed; this run is NOT private")
    config = ConfigRecord(cfg.to_dict())  # clients learn the calibrated z from here (local DP)
    secure = None
    if cfg.secure_aggregation != "none":
        if len(directory.node_ids) < 2:
            raise ConfigError("SecAgg+ needs at least 2 SuperNodes (with one, its update is the sum); "
                              "start more nodes or set --users-per-node")
        secure = secagg_setup(cfg, len(directory.node_ids), int(directory.num_users.max()), directory.num_items,
                              cfg.dim, plan.noise_multiplier if plan else 0.0,
                              cfg.users_per_round or directory.population, directory.population)
        if plan is not None:  # quantization can move the sum a little further than C: account for it
            plan = dataclasses.replace(plan, clipping_norm=secure.sensitivity)
        config[schema.NOISE_SHARE] = secure.noise_share_std
        grid = SecureGrid(grid, cfg, secure)
    items = ItemParams.init(directory.num_items, hyper(cfg), initial_global_bias(cfg.implicit, directory.rating_scale))
    run_dir = make_run_dir(cfg, "federated")
    audit: list[dict] = []
    # A DP run keeps the per-reply log in memory only: its lines count replies and rows.
    audit_file = open(run_dir / "audit.jsonl", "w") if plan is None else None

    def record(line: dict) -> None:
        audit.append(line)
        if audit_file:
            audit_file.write(json.dumps(line) + "\n")

    strategy = FedRecStrategy(cfg, directory, items, on_round=on_round, audit=record, privacy=plan)
    stopped = None
    withheld = WithheldLogLines()
    if plan is not None:
        FLOWER_LOGGER.addFilter(withheld)
    try:
        strategy.start(grid=grid, initial_arrays=array_record(items), num_rounds=cfg.rounds,
                       train_config=config, evaluate_config=config)
    except BudgetExhausted as reason:
        stopped = str(reason)
        final_eval(grid, strategy, config, len(strategy.history))
    finally:
        FLOWER_LOGGER.removeFilter(withheld)
        if audit_file:
            audit_file.close()
    if secure is not None and len(grid.halted) == cfg.rounds:
        raise ConfigError(f"every SecAgg+ round was halted ({grid.halted[0]}); lower --secagg-min-fraction or "
                          "--secagg-threshold, or start more nodes")
    metric = main_metric(cfg.implicit, cfg.top_k)
    frame = write_history(run_dir, strategy.history)
    final = {k: v for k, v in strategy.history[-1].items() if is_evaluation(k)}
    summary = {
        "mode": "federated", "dataset": cfg.dataset, "split": cfg.split, "metrics": final,
        "rounds": strategy.rounds_trained, "num_users": directory.population,
        "num_nodes": len(directory.node_ids), "config": cfg.to_dict(),
    }
    if plan is None:
        summary |= {"wall_seconds": time.perf_counter() - start, "bytes_up": strategy.bytes_up,
                    "bytes_down": strategy.bytes_down}
    else:
        summary["privacy"] = privacy_summary(cfg, plan, strategy)
    if secure is not None:
        summary["secure_aggregation"] = secure_summary(cfg, secure, grid)
    if cfg.reproducible_noise:
        summary["reproducible_noise"] = True
    if stopped:
        summary["stopped_early"] = stopped
    write_config(run_dir, cfg)
    write_json(run_dir / "summary.json", summary)
    plot_metric(frame, "round", metric, run_dir / f"{metric.replace('@', '_at_')}.png",
                f"federated {cfg.dataset} {cfg.split}: {metric} per round")
    return FederatedOutcome(summary, strategy.history, items, run_dir, audit, time.perf_counter() - start)


def final_eval(grid: Grid, strategy: FedRecStrategy, config: ConfigRecord, rounds_done: int) -> None:
    """After a budget stop: evaluate the model as it stands (evaluation spends no budget)."""
    if rounds_done and any(is_evaluation(k) for k in strategy.history[-1]):
        return
    arrays = array_record(strategy.items)
    strategy._started = time.perf_counter()
    strategy._row = {"round": rounds_done, "users_sampled": 0, "bytes_up": 0, "bytes_down": 0}
    replies = grid.send_and_receive(strategy.configure_evaluate(strategy.cfg.rounds, arrays, config, grid))
    strategy.aggregate_evaluate(rounds_done, replies)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run .`: every setting comes from [tool.flwr.app.config]."""
    run_server(grid, RunConfig.from_mapping(dict(context.run_config)))
