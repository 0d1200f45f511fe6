"""A run on the server: discover the nodes, plan the privacy, set up SecAgg+, run the federation's
rounds, write the run directory. server/app.py is the ServerApp glue around `run_server`."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp import Grid

from fedrec.models.metrics import reported
from fedrec.models.registry import algorithm_class
from fedrec.privacy.accountant import PrivacyPlan, participation_cap
from fedrec.privacy.guarantee import describe
from fedrec.privacy.ledger import DP_ROUND_KEYS, WithheldLogLines, is_evaluation, release_ledger
from fedrec.run.build import hyper, make_algorithm
from fedrec.run.config import ConfigError, RunConfig
from fedrec.run.device_config import DeviceConfig
from fedrec.run.rundir import RunWriter, dp_label, metric_columns

from . import checkpoint
from .directory import discover
from .federation import BudgetExhausted, Federation
from .rounds import (
    ROUND_COLUMNS,
    Interrupted,
    RunState,
    restore,
    run_rounds,
    save_checkpoint,
)
from .secagg import SecureGrid, secagg_setup, secure_summary


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
    weights = tuple(algorithm_class(cfg.resolved().model).release_weights(cfg.target_epsilon) or ())
    if weights and cfg.dp == "local":
        raise ConfigError(f"--dp local with --model {cfg.model}: its {len(weights)} releases carry unequal shares of "
                          "the budget, which local noise cannot give; use --dp central or --dp distributed")
    plan = PrivacyPlan(cfg.dp, cfg.noise_multiplier, cfg.clipping_norm, cfg.sampling, sample, population,
                       cfg.target_delta, cfg.accountant, max_rounds=cap, weights=weights)
    if plan.noise_multiplier <= 0:
        rounds = cap if cfg.dp == "local" else cfg.rounds  # distributed: calibrated as central DP
        z = plan.calibrate(cfg.target_epsilon, rounds) + 1e-3  # Brent's tolerance is 1e-4: stay inside
        plan = dataclasses.replace(plan, noise_multiplier=z, calibrated=True)
        cfg = dataclasses.replace(cfg, noise_multiplier=z)
    return cfg, plan


def noise_source(cfg: RunConfig, plan: PrivacyPlan) -> str:
    """Where a DP run's noise multiplier came from (config.toml keeps 0 for a calibrated one, so
    a run repeated from it is calibrated again, for its own rounds)."""
    if plan.calibrated:
        return f"calibrated to the target epsilon {cfg.target_epsilon:g} for {cfg.rounds} rounds"
    return "set by hand (--noise-multiplier): epsilon follows from it"


def privacy_summary(cfg: RunConfig, plan: PrivacyPlan | None, federation: Federation) -> dict:
    """summary.json's `privacy`: what the run protects and against whom (every run), and for a DP
    run its accounting and the ledger of what it releases."""
    base = {"mode": cfg.dp, "secure_aggregation": cfg.secure_aggregation, "update_mode": cfg.update_mode,
            "reproducible_noise": cfg.reproducible_noise}
    if plan is None:
        return base | describe(cfg)
    server_epsilon = plan.server_epsilon(int(federation.participation.max())) if plan.mode == "distributed" else None
    summary = base | {"epsilon": federation.epsilon, "delta": plan.delta,
               "noise_multiplier": plan.noise_multiplier, "noise_multiplier_source": noise_source(cfg, plan),
               "clipping_norm": plan.clipping_norm,
               "sampling": plan.sampling, "sampling_rate": plan.rate, "rounds": federation.rounds_trained,
               "accountant": f"dp-accounting-{plan.accountant}", "unit": "user",
               "target_epsilon": cfg.target_epsilon or None,
               **describe(cfg, federation.epsilon, server_epsilon),
               "releases": release_ledger(plan.mode, cfg.tuned)}
    if plan.mode == "local":
        summary["epsilon_per_round"] = plan.epsilon(1)
        summary["max_rounds_per_user"] = plan.max_rounds
        summary["epsilon_at_cap"] = plan.epsilon(plan.max_rounds)
    summary["neighbouring_relation"] = relation_of(plan)
    if plan.weights:
        summary["release_weights"] = list(plan.weights)
        summary["noise_multiplier_per_round"] = [plan.round_z(r) for r in range(1, len(plan.weights) + 1)]
    if plan.mode == "distributed":
        summary["max_rounds_per_user"] = plan.max_rounds
        summary["epsilon_against_server"] = server_epsilon
        summary["epsilon_against_server_at_cap"] = plan.server_epsilon(plan.max_rounds)
    return summary


def relation_of(plan: PrivacyPlan) -> str:
    """The neighbouring relation epsilon is for, in words (docs/privacy.md explains each)."""
    if plan.full_participation:
        return ("zero-out: a user's ratings replaced by none (its device still answers with zeros); every user "
                "takes part in every round")
    if plan.mode != "local" and plan.sampling == "poisson":
        return "add-or-remove one user (Poisson sampling)"
    return "replace one user"


@dataclass
class FederatedOutcome:
    summary: dict
    history: list[dict]
    model: dict[str, np.ndarray]  # the released model (the algorithm's ServerState.model())
    run_dir: Path
    audit: list[dict] = field(default_factory=list)  # every reply's shape, in memory (DP runs write none)
    wall_seconds: float = 0.0
    status: str = "completed"  # or "interrupted" (checkpointed; continue with --resume)


def run_server(grid: Grid, cfg: RunConfig, on_round: Callable[[dict], None] | None = None,
               stop: threading.Event | None = None, catalogue: tuple | None = None,
               exclude: Iterable[int] = ()) -> FederatedOutcome:
    """Run (or, with cfg.resume, continue) a federation. `stop`: when set, the run ends after
    the current round with a checkpoint and status "interrupted". `catalogue`: the public item
    ids and titles, saved with the model, where the operator has them (the server reads no data).
    `exclude`: users (global ids) drawn and then dropped in every round, as `fedrec forget`'s
    exclusion list (kept in RUN_DIR.checkpoints/) does for a resumed run."""
    start = time.perf_counter()
    saved = None
    if cfg.resume:
        cfg = resumed_config(cfg)
        saved = checkpoint.load(Path(cfg.resume))
    cfg = cfg.resolved().validate()
    random.seed(cfg.seed)  # Flower samples with Python's global random; we sample users ourselves
    directory = discover(grid, ConfigRecord(DeviceConfig.of(cfg).record()))
    if cfg.users_per_round > directory.population:
        raise ValueError(f"users-per-round={cfg.users_per_round} exceeds the {directory.population} users")
    settings = cfg  # what config.toml keeps: a calibrated z is recomputed when the settings are used again
    cfg, plan = privacy_plan(cfg, directory.population)
    if cfg.reproducible_noise:
        log(WARNING, "--reproducible-noise: DP noise, decoys, sampling and starting user vectors derive from the "
                     "seed; this run is NOT private")
    algorithm = make_algorithm(cfg, directory.num_items, directory.rating_scale)
    secure = None
    if cfg.secure_aggregation != "none":
        if len(directory.node_ids) < 2:
            raise ConfigError("SecAgg+ needs at least 2 SuperNodes (with one, its update is the sum); "
                              "start more nodes or set --users-per-node")
        secure = secagg_setup(cfg, len(directory.node_ids), int(directory.num_users.max()),
                              coordinates(algorithm, directory.num_items),
                              plan.widest_z if plan else 0.0,  # unequal releases: the widest round's noise
                              cfg.users_per_round or directory.population, directory.population)
        if plan is not None:  # quantization can move the sum a little further than C: account for it
            plan = dataclasses.replace(plan, clipping_norm=secure.sensitivity)
        grid = SecureGrid(grid, cfg, secure, algorithm.statistics())
    # all a device learns of the run: its part, with the z calibrated here (local DP) and its noise share
    config = ConfigRecord(DeviceConfig.of(cfg, secure.noise_share_std if secure else 0.0).record())
    server_state = algorithm.init_server(cfg.strategy, cfg.server_lr)
    out = RunWriter(Path(cfg.resume), settings, "federated") if saved else RunWriter.create(settings, "federated")
    run_dir = out.path
    if cfg.keep_checkpoints and not saved:
        checkpoint.forget_kept(run_dir)
    forgotten = set(exclude) | set(checkpoint.excluded(run_dir) if saved else ())
    audit: list[dict] = []
    # A DP run keeps the per-reply log in memory only: its lines count replies and rows.
    audit_path = audit_location(run_dir, forgetting=bool(forgotten))
    if saved and plan is None:  # lines of rounds after the checkpoint are about to be redone
        keep_audit_lines(audit_path, saved.round)
    audit_file = open(audit_path, "a" if saved else "w") if plan is None else None

    def record(line: dict) -> None:
        audit.append(line)
        if audit_file:
            audit_file.write(json.dumps(line) + "\n")
            audit_file.flush()

    columns = (list(ROUND_COLUMNS if plan is None else DP_ROUND_KEYS)
               + metric_columns(cfg.implicit, cfg.top_k, cfg.validation_item))
    # With users forgotten, every round's counts of replies and bytes are withheld (blank), in all rounds
    # alike: they dip where a forgotten user is drawn and dropped, and the draws follow the public seed.
    blank = dict.fromkeys(REPLY_COUNTS, "") if forgotten else {}
    out.start_metrics(columns, [row | blank for row in saved.history] if saved else [])  # rows its checkpoint kept

    def round_done(row: dict) -> None:
        out.add_metrics(row | blank)
        if on_round:
            on_round(row)

    federation = Federation(cfg, algorithm, server_state, directory, on_round=round_done, audit=record, privacy=plan)
    if secure is not None and plan is not None and plan.mode == "distributed":  # each round's share follows its z_r
        federation.device_noise = lambda release: secure.noise_share_std * plan.round_z(release) / plan.widest_z
    state = RunState(out, {"mode": "federated", "dataset": cfg.dataset, "split": cfg.split,
                           "model": cfg.model, "model_reason": cfg.model_reason(),
                           **({"burn_in": hyper(cfg).burn_in} if "burn_in" in algorithm.settings_read else {}),
                           "num_users": directory.population, "config": cfg.to_dict()},
                     series=saved.series if saved else checkpoint.new_series())
    if saved:
        restore(federation, saved, run_dir)
        state.last_round = state.resumed_from = saved.round
    federation.excluded = excluded_users(forgotten, directory.population)
    if cfg.keep_checkpoints and not saved:  # round 0: a replay may start before anyone trained
        save_checkpoint(state, federation, keep=True, write=False)
    out.write_config()
    state.status("running", rounds=state.last_round)
    stopped = interrupted = None
    withheld = WithheldLogLines()
    if plan is not None or forgotten:  # Flower's lines counting replies would show a forgotten user's absence
        FLOWER_LOGGER.addFilter(withheld)
    try:
        run_rounds(grid, federation, config, state, stop)
    except BudgetExhausted as reason:
        stopped = str(reason)
        federation.final_evaluation(grid, state.device_config(config), state.last_round)
    except Interrupted as reason:
        interrupted = str(reason)
    except BaseException as error:
        # No checkpoint now: the federation may be half-way through a round. The last one stands.
        state.status(f"failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
                     rounds=state.last_round, resumable=(run_dir / checkpoint.CHECKPOINT).is_file())
        raise
    finally:
        FLOWER_LOGGER.removeFilter(withheld)
        if audit_file:
            audit_file.close()
    if interrupted:
        save_checkpoint(state, federation)
        state.status("interrupted", rounds=state.last_round, resume=f"fedrec simulate --resume {run_dir}")
        return FederatedOutcome(state.summary, federation.history, server_state.model(), run_dir, audit,
                                time.perf_counter() - start, status="interrupted")
    try:
        if secure is not None and grid.halted and len(grid.halted) >= cfg.rounds - (saved.round if saved else 0):
            why = "" if plan is not None else f" ({grid.halted[0]})"  # a DP run does not tell how many arrived
            raise ConfigError(f"every SecAgg+ round was halted{why}; lower --secagg-min-fraction or "
                              "--secagg-threshold, or start more nodes")
        summary = finished_summary(cfg, plan, federation, state, directory, secure, grid, stopped, start)
        out.write_results(server_state.model(), "round", catalogue, dp_label(summary["privacy"]))
        if cfg.keep_checkpoints:  # the last round's too: its participation counts tell forget who ever took part
            save_checkpoint(state, federation, keep=True, write=False)
    except BaseException as error:
        state.status(f"failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
                     rounds=state.last_round, resumable=False)
        raise
    state.status("completed", **summary)
    checkpoint.remove(run_dir)  # the server's memory; the run is over
    return FederatedOutcome({"status": "completed", **state.summary, **summary}, federation.history,
                            server_state.model(), run_dir, audit, time.perf_counter() - start)


def excluded_users(users: set[int], population: int) -> np.ndarray | None:
    """The users to leave out, as a mask over the population (None: nobody)."""
    if not users:
        return None
    if max(users) >= population or min(users) < 0:
        raise ConfigError(f"the exclusion list names users outside the federation's {population}; "
                          "replay against the same data set and nodes")
    mask = np.zeros(population, bool)
    mask[sorted(users)] = True
    return mask


def finished_summary(cfg, plan, federation, state, directory, secure, grid, stopped, start) -> dict:
    chosen = federation.history[-1] if federation.history else {}
    if cfg.validation_item:  # the test metrics of the best-validation round, not of the last
        chosen, _ = reported([row for row in federation.history if any(is_evaluation(k) for k in row)], cfg.top_k)
    summary = {"metrics": {k: v for k, v in chosen.items() if is_evaluation(k)}, "rounds": federation.rounds_trained,
               "num_nodes": len(directory.node_ids)}
    if cfg.validation_item and "round" in chosen:
        summary["reported_round"] = chosen["round"]  # the best-validation round, whose test metrics these are
    if plan is None and federation.excluded is None:
        # with users forgotten neither: a replay's seconds bound its start round (a user's first
        # participation), totals of bytes how much a forgotten user's rows weighed
        summary |= {"wall_seconds": time.perf_counter() - start, "bytes_up": federation.bytes_up,
                    "bytes_down": federation.bytes_down}
    summary["privacy"] = privacy_summary(cfg, plan, federation)
    if secure is not None:
        summary["secure_aggregation"] = secure_summary(cfg, secure, grid)
    if cfg.reproducible_noise:
        summary["reproducible_noise"] = True
    if stopped:
        summary["stopped_early"] = stopped
    return summary


def _round_of(line: str) -> float:
    try:
        return json.loads(line)["round"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill
        return float("inf")


REPLY_COUNTS = tuple(c for c in ROUND_COLUMNS if c not in ("round", "users_sampled"))  # users_sampled is padded


def audit_location(run_dir: Path, forgetting: bool) -> Path:
    """audit.jsonl: in the run directory, or, once users are forgotten, in the server's kept memory
    (moved there): its lines per round would tell where a forgotten user was drawn and dropped."""
    released = run_dir / "audit.jsonl"
    if not forgetting:
        return released
    checkpoint.kept_dir(run_dir).mkdir(mode=0o700, exist_ok=True)
    if released.is_file():
        os.replace(released, checkpoint.kept_dir(run_dir) / "audit.jsonl")
    return checkpoint.kept_dir(run_dir) / "audit.jsonl"


def keep_audit_lines(path: Path, last_round: int) -> None:
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if _round_of(line) <= last_round]
        path.write_text("".join(line + "\n" for line in lines))


def resumed_config(cfg: RunConfig) -> RunConfig:
    """The settings of the run to continue: its own config.toml, writing back into its directory."""
    run_dir = Path(cfg.resume).expanduser().resolve()
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"--resume {cfg.resume}: no config.toml there; pass the directory of an interrupted run")
    saved = RunConfig.from_toml(run_dir / "config.toml")
    return dataclasses.replace(saved, out=str(run_dir), resume=str(run_dir))


def coordinates(algorithm, n_items: int) -> int:
    """Coordinates of one dense upload of `algorithm`'s statistics."""
    return sum(n_items * s.width if s.per_item else s.width for s in algorithm.statistics().values())
