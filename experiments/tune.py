"""Choose settings on a validation split of the training data, never the test set (Optuna, TPE).

Central and federated each get their own search with the same budget (trials and/or
seconds). Every trial trains on a validation split (RunConfig.validation: a per-user
holdout of the training rows, or leave-one-out of them) and is scored on its validation
rows: central trials with the central trainer; federated trials with the real server and
ClientApp code in this process (InProcessGrid: what the engines run, without Ray), so their
metric is the federated evaluation, each device scoring its own validation rows and sending
sums. The number of epochs or rounds is the best evaluated one (every --eval-every).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedrec.run.config import ConfigError, RunConfig
from fedrec.run.rundir import main_metric, make_run_dir, write_config, write_json

SIDES = ("central", "federated")
STEP = {"central": "epochs", "federated": "rounds"}  # what a side's best evaluated step sets

# The search spaces, the one place they are defined: setting -> ("log", low, high) for a number on a
# log scale, or a tuple of choices. A run's algorithm is searched over the space whose settings it
# reads (its `settings_read`); where several algorithms read that space, the choice between them
# (`model`) is searched too.
SEARCH_SPACE: dict[str, tuple] = {  # the SGD models': K, L2 per rating, the device's and the server's steps
    "dim": (8, 16, 32, 64, 128),
    "reg_user": ("log", 1e-4, 1.0),
    "reg_item": ("log", 1e-4, 1.0),
    "reg_bias": ("log", 1e-5, 0.5),
    "lr": ("log", 0.005, 0.3),
    "server_lr": ("log", 0.005, 0.3),  # both sides: central training steps its items with the same optimizer
}
# A sampler's (Bayesian MF's): its K, its user prior's precisions (another scale than L2 per rating), its
# noise precision.
BPMF_SPACE: dict[str, tuple] = {"dim": (5, 10, 20), "reg_user": ("log", 1.0, 100.0), "reg_bias": ("log", 0.1, 10.0),
                                "bpmf_alpha": ("log", 0.5, 4.0)}
SPACES = (SEARCH_SPACE, BPMF_SPACE)  # the first one an algorithm reads all of is its space
# Searched only with implicit feedback (--split loo), for algorithms that read it (the device's recency term).
IMPLICIT_SPACE: dict[str, tuple] = {"recency_weight": (0.0, 4.0, 8.0, 16.0, 32.0)}
MODEL = "model"  # the RunConfig setting naming the algorithm, searched where a space has several
SEARCHED = frozenset().union(*SPACES, IMPLICIT_SPACE, {MODEL})  # every setting tune may choose

DEFAULT_TRIALS = 60  # per side when neither --tune-trials nor --tune-seconds is given: with 20 the tuned
# federated RMSE fell short of the best Surprise peer on ML-100K random and synthetic, with 60 it beat it
# (docs/results.md, Tuning)


@dataclass(frozen=True)
class Budget:
    """Per side: stop before a trial once `trials` ran or `seconds` passed (0: no limit); one trial at least."""

    trials: int = 0
    seconds: float = 0.0

    @staticmethod
    def of(trials: int = 0, seconds: float = 0.0) -> "Budget":
        if trials < 0 or not (seconds >= 0 and math.isfinite(seconds)):
            raise ConfigError(f"--tune-trials and --tune-seconds must be >= 0 (got {trials} and {seconds})")
        return Budget(trials or (0 if seconds else DEFAULT_TRIALS), seconds)

    def allows(self, done: int, elapsed: float) -> bool:
        return done == 0 or ((not self.trials or done < self.trials) and (not self.seconds or elapsed < self.seconds))


def space_for(cfg: RunConfig) -> dict[str, tuple]:
    """The settings searched for this run's algorithm, chosen by what it reads (never by its name): the
    first of SPACES it reads all of, the recency term where the feedback is implicit and it reads that,
    and the choice between the algorithms that read the same settings (and model this kind of feedback)."""
    from fedrec.models.registry import ALGORITHMS, algorithm_class

    model = cfg.resolved().model
    reads = algorithm_class(model).settings_read
    base = next((space for space in SPACES if set(space) <= reads), None)
    if base is None:
        raise ConfigError(f"tune has no search space for --model {model}: it reads none of tune's spaces whole")
    extra = IMPLICIT_SPACE if cfg.implicit and set(IMPLICIT_SPACE) <= reads else {}
    alike = tuple(name for name, cls in ALGORITHMS.items()
                  if set(base) | set(extra) <= cls.settings_read and (cls.implicit_feedback or not cfg.implicit))
    return {**base, **({MODEL: alike} if len(alike) > 1 else {}), **extra}


def distributions(cfg: RunConfig) -> dict:
    import optuna

    out = {}
    for name, spec in space_for(cfg).items():
        if spec[0] == "log":
            out[name] = optuna.distributions.FloatDistribution(spec[1], spec[2], log=True)
        else:
            out[name] = optuna.distributions.CategoricalDistribution(spec)
    return out


def defaults(cfg: RunConfig) -> dict:
    """The settings a run gets without tuning: the first trial of each side, so tuning never ends
    worse on validation than the defaults."""
    base = RunConfig(split=cfg.split, model=cfg.resolved().model).resolved()
    return {name: getattr(base, name) for name in space_for(cfg)}


def apply(cfg: RunConfig, side: str, chosen: dict) -> RunConfig:
    """`cfg` with a side's chosen settings and number of epochs (central) or rounds (federated)."""
    settings = {name: chosen[name] for name in space_for(cfg)}
    return dataclasses.replace(cfg, **settings, **{STEP[side]: int(chosen[STEP[side]])}, tuned=True)


def protocol(cfg: RunConfig) -> str:
    if cfg.implicit:
        held = (f"leave-one-out of the training interactions: each user's latest one, ranked against {cfg.negatives} "
                "sampled items the user has no training interaction with")
    else:
        held = f"a per-user random holdout of {cfg.test_fraction:.0%} of each user's training ratings"
    return (f"validation split: {held}; the test rows are never used. Central trials: the central trainer on "
            "the other training rows. Federated trials: the server and ClientApp code in one process "
            "(no Ray, no SecAgg+); each device scores its own validation rows and sends sums (federated evaluation).")


def _central_trial(cfg: RunConfig) -> list[dict]:
    from fedrec.simulations.central import run_central

    return run_central(cfg, write=False).result.history


def _federated_trial(cfg: RunConfig, nodes: int, shards: Path) -> list[dict]:
    from fedrec.client.app import app as client_app
    from fedrec.run.build import SHARDS_ENV
    from fedrec.server.runner import run_server
    from fedrec.simulations.federated import _environment
    from fedrec.simulations.inprocess import InProcessGrid

    # A trial's run directory (metrics, model) is scratch: only tune.json and trials.csv are released.
    with tempfile.TemporaryDirectory(prefix="fedrec-tune-") as scratch, _environment({SHARDS_ENV: str(shards)}):
        trial_cfg = dataclasses.replace(cfg, out=str(Path(scratch) / "run"), checkpoint_every=0)
        return run_server(InProcessGrid(client_app, nodes, data_dir=trial_cfg.data_dir), trial_cfg).history


def _best(history: list[dict], metric: str, step: str, higher: bool) -> tuple[int, float] | None:
    rows = [(int(r[step]), float(r[metric])) for r in history if math.isfinite(float(r.get(metric, math.nan)))]
    if not rows:
        return None
    return (max if higher else min)(rows, key=lambda r: r[1])


def search(side: str, cfg: RunConfig, budget: Budget, run_trial: Callable[[RunConfig], list[dict]],
           on_trial: Callable[[str, dict], None] | None = None) -> list[dict]:
    """One side's trials, in order: settings, best step, validation metric, seconds, state."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metric, higher = main_metric(cfg.implicit, cfg.top_k), cfg.implicit
    step = "epoch" if side == "central" else "round"
    study = optuna.create_study(direction="maximize" if higher else "minimize",
                                sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    study.enqueue_trial(defaults(cfg))
    space, trials, start = distributions(cfg), [], time.perf_counter()
    while budget.allows(len(trials), time.perf_counter() - start):
        trial = study.ask(space)
        began = time.perf_counter()
        best = _best(run_trial(apply(cfg, side, {**trial.params, STEP[side]: cfg.epochs if side == "central"
                                                 else cfg.rounds})), metric, step, higher)
        entry = {"side": side, "trial": trial.number, **trial.params, STEP[side]: best[0] if best else None,
                 f"val_{metric}": best[1] if best else None, "seconds": time.perf_counter() - began,
                 "state": "complete" if best else "failed"}
        if best:
            study.tell(trial, best[1])
        else:  # no finite validation metric (diverged): TPE learns to avoid it
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        trials.append(entry)
        if on_trial:
            on_trial(side, entry)
    return trials


def tune(cfg: RunConfig, budget: Budget, on_trial: Callable[[str, dict], None] | None = None,
         run_dir: Path | None = None, sides: tuple[str, ...] = SIDES) -> dict:
    """Search each side's settings within `budget`; writes RUN_DIR/tune.json, trials.csv, and each
    side's chosen settings as a config file (central.toml, federated.toml)."""
    import optuna
    import pandas as pd

    from fedrec.run.build import ensure_shards, load_data, num_nodes
    from fedrec.simulations.federated import check_population

    start = time.perf_counter()
    if cfg.dp != "none":
        raise ConfigError(f"--tune does not run with --dp {cfg.dp}: the validation trials would spend privacy no "
                          "epsilon accounts for; tune without --dp, then run with the chosen settings and --dp")
    cfg = dataclasses.replace(cfg, validation=True, secure_aggregation="none").resolved().validate()
    run_dir = Path(run_dir) if run_dir else make_run_dir(cfg, "tune")
    metric = main_metric(cfg.implicit, cfg.top_k)
    runners = {"central": _central_trial}
    if "federated" in sides:
        nodes = num_nodes(cfg, check_population(cfg))
        shards = ensure_shards(cfg, nodes)  # the devices' validation shards, cut once for every trial
        runners["federated"] = lambda trial_cfg: _federated_trial(trial_cfg, nodes, shards)
    load_data(cfg)  # read (and cache) the data before any clock starts: no side's budget pays for it
    trials, chosen = [], {}
    for side in sides:
        done = search(side, cfg, budget, runners[side], on_trial)
        trials += done
        complete = [t for t in done if t["state"] == "complete"]
        if not complete:
            raise ConfigError(f"every {side} trial, the defaults' included, gave no finite validation {metric}; "
                              "check the data and the settings tune does not search")
        best = (max if cfg.implicit else min)(complete, key=lambda t: t[f"val_{metric}"])
        chosen[side] = {k: best[k] for k in (*space_for(cfg), STEP[side], f"val_{metric}", "trial")}
    report = {"dataset": cfg.dataset, "split": cfg.split, "metric": metric,
              "direction": "maximize" if cfg.implicit else "minimize", "validation": protocol(cfg),
              "budget": {"trials_per_side": budget.trials, "seconds_per_side": budget.seconds,
                         "rule": "a side stops before a trial once either limit is reached; at least one trial"},
              "search": {"library": f"optuna {optuna.__version__}", "sampler": f"TPESampler(seed={cfg.seed})",
                         "space": {k: list(v) for k, v in space_for(cfg).items()},
                         "first_trial": "the defaults", "steps": f"best evaluated {', '.join(STEP.values())} "
                                                             f"(every {cfg.eval_every}) up to the settings' maxima"},
              "chosen": chosen, "trials": trials, "wall_seconds": time.perf_counter() - start,
              "config": cfg.to_dict()}
    write_json(run_dir / "tune.json", report)
    for side in sides:  # ready for --config: `fedrec simulate --config RUN_DIR/federated.toml` (scored on test)
        write_config(run_dir, dataclasses.replace(apply(cfg, side, chosen[side]), validation=False), f"{side}.toml")
    frame = pd.DataFrame(trials)
    frame.astype({step: "Int64" for step in STEP.values() if step in frame}).to_csv(run_dir / "trials.csv", index=False)
    report["run_dir"] = str(run_dir)
    return report
