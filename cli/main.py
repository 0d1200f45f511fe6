"""The `fedrec` command line. Every run-config setting is a flag (`--users-per-round`),
and `--config FILE` reads a TOML file first; bad input gives one line and exit code 2.

Its options are built from RunConfig's field metadata (help, choices, group, internal). This
module imports no numpy, pandas, torch or Flower: each command imports what it runs, so that
`fedrec --help` answers at once."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import signal
import sys
import threading
import typing
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Optional

import click
import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from fedrec.cli.extras import require
from fedrec.datasets.errors import DataError
from fedrec.experiments.bench import CASE_NAMES, DEFAULT_CASES
from fedrec.experiments.tune import DEFAULT_TRIALS, SEARCHED
from fedrec.run.config import CENTRAL_SETTINGS, DATA_SETTINGS, ConfigError, RunConfig, ignored_settings, with_defaults
from fedrec.run.finished import ANY_RUN, locate
from fedrec.run.rundir import make_run_dir, remove_if_empty


class _OneLineErrors(typer.core.TyperGroup):
    """A bad flag or flag value is one line and exit 2, like every other bad input (not click's panel);
    Ctrl-C is one line and exit 130 (typer's own handler would exit silently)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            _fail(error.format_message())
        except KeyboardInterrupt:
            _interrupted(None)


# Unexpected errors still show a traceback, but without local variables (megabytes of arrays).
cli = typer.Typer(no_args_is_help=True, add_completion=False, cls=_OneLineErrors, pretty_exceptions_show_locals=False)
console = Console(stderr=True)
out = Console()


def _show_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        out.print(f"fedrec {version('fedrec')}", highlight=False)
        raise typer.Exit()


@cli.callback(help=__doc__.split("\n\n")[0])
def _options(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                          help="Print fedrec's version and exit.")) -> None:
    pass


ALL_SETTINGS = frozenset(f.name for f in fields(RunConfig))
# tune searches these itself, validates on its own split and runs its trials in this process without privacy
TUNE_SETTINGS = ALL_SETTINGS - SEARCHED - {
    "validation", "dp", "noise_multiplier", "target_epsilon", "target_delta", "accountant", "max_rounds_per_user",
    "reproducible_noise", "secure_aggregation", "secagg_shares", "secagg_threshold", "secagg_min_fraction",
    "secagg_timeout", "resume", "keep_checkpoints", "checkpoint_every", "ray_address"}
# Settings each command reads; the others are hidden from its --help, refused as flags, and reset (with
# a note) when a --config file sets them, so a saved config never claims what a run did not do.
# Commands not listed here (benchmarks, audits) choose their own cases and take every setting.
COMMAND_SETTINGS = {
    "central": (CENTRAL_SETTINGS, "central trains one model on pooled data; federated and privacy settings "
                                  "apply to simulate and compare"),
    "tune": (TUNE_SETTINGS, f"tune searches {', '.join('--' + n.replace('_', '-') for n in sorted(SEARCHED))} "
                            "itself, on a validation split, and runs its trials in this process without DP or SecAgg+"),
    "simulate": (ALL_SETTINGS - {"epochs"}, "epochs are the central baseline's; simulate trains for --rounds"),
    "compare": (ALL_SETTINGS - {"resume"}, "compare starts new runs; --resume applies to simulate"),
    "partition": (DATA_SETTINGS | {"users_per_node", "out"}, "partition only cuts the data into per-node shards"),
}
# Commands whose run directory is checked (and created) before any work: command -> runs/<name>-<time>.
RUN_DIR_NAMES = {"central": "central", "simulate": "federated", "compare": "compare", "tune": "tune",
                 "accuracy": "accuracy", "bench": "bench", "audit": "audit", "secagg_bench": "secagg-bench",
                 "clip_check": "clip-check", "privacy_sweep": "sweep"}
RESUMABLE = {"simulate"}
RESUME_TAKES = {"resume"}  # what may go with --resume: the run continues with its own saved settings


def _fail(message: str) -> typing.NoReturn:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)  # [...] is no markup
    raise typer.Exit(2)


def _interrupted(run_dir: Path | None, writes: bool = False) -> typing.NoReturn:
    """Ctrl-C: one line, the conventional exit code 130; what the run had written, if anything, stays
    (`writes`: the command makes a run directory, maybe not yet)."""
    kept = run_dir is not None and run_dir.is_dir() and any(run_dir.iterdir())
    where = f"; what it wrote so far is in {run_dir}" if kept else (", nothing written" if writes else "")
    console.print(f"interrupted{where}", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(130)


def _flags(names) -> str:
    return ", ".join("--" + n.replace("_", "-") for n in names)


def _settings(name: str, flags: dict, config_file: Path | None) -> RunConfig:
    """The run's settings from the file and flags, refusing what this command would not use."""
    if flags.get("resume") and name not in RESUMABLE:
        raise ConfigError(f"--resume does not apply to {name.replace('_', '-')}; it continues a `fedrec simulate` run")
    if flags.get("resume") and (config_file or set(flags) - RESUME_TAKES):
        extra = _flags(sorted(set(flags) - RESUME_TAKES)) or "--config"
        raise ConfigError(f"--resume continues {flags['resume']} with its own saved settings; drop {extra}")
    base = RunConfig.from_toml(config_file) if config_file else RunConfig()
    if base.resume:
        raise ConfigError(f"{config_file} sets resume; pass --resume RUN_DIR on the command line instead")
    cfg = RunConfig.from_mapping(flags, base)
    if name not in COMMAND_SETTINGS:
        return cfg.validate()
    cfg.check_values()  # a malformed value is reported as such, before whether it applies
    reads, why = COMMAND_SETTINGS[name]
    ignored = ignored_settings(cfg, reads)
    given = [n for n in ignored if n in flags]
    if given:
        outside = [n for n in given if ignored[n] == "outside"]
        reasons = [f"{_flags(outside)} {'does' if len(outside) == 1 else 'do'} not apply to "
                   f"{name.replace('_', '-')}: {why}"] if outside else []
        reasons += [f"{_flags([n])} does not apply {ignored[n]}" for n in given if n not in outside]
        raise ConfigError("; ".join(reasons))
    if ignored:  # set by the file only: the file's other settings still apply
        console.print(f"note: {name.replace('_', '-')} does not use {_flags(ignored)} from {config_file}; "
                      "they are ignored", highlight=False, soft_wrap=True)
        cfg = with_defaults(cfg, list(ignored))
    return cfg.validate()


def _option(f: dataclasses.Field, hidden: bool):
    """A RunConfig field as a flag: its help, its choices, its group's help panel; an internal one hidden."""
    meta, help, metavar = f.metadata, f.metadata["help"], None
    shown = "off" if f.default is False else (f.default != "" or "empty")  # click hides a False or '' default
    choices = meta.get("choices")
    if choices and len("|".join(choices)) > 20:  # a long list would squeeze its panel's help column: in the help
        help, metavar = f"{help} One of: {', '.join(choices)}.", "NAME"
    return typer.Option(f.default, "--" + f.name.replace("_", "-"), help=help, show_default=shown, metavar=metavar,
                        hidden=hidden or meta.get("internal", False), rich_help_panel=meta.get("group"),
                        click_type=click.Choice(choices) if choices else None)


def _config_command(fn):
    """Give `fn(cfg, **extra)` one CLI option per RunConfig field, plus --config."""
    hints = typing.get_type_hints(fn)  # annotations are strings under `from __future__ import annotations`
    own = [p.replace(annotation=hints[p.name]) for p in list(inspect.signature(fn).parameters.values())[1:]]
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                default=typer.Option(None, "--config", help="TOML file with settings (flags win)."))]
    reads = COMMAND_SETTINGS.get(fn.__name__, (ALL_SETTINGS,))[0]
    for f in fields(RunConfig):
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=type(f.default),
                                        default=_option(f, hidden=f.name not in reads)))
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

    def command(**kwargs):
        extra = {p.name: kwargs.pop(p.name) for p in own}
        config_file = kwargs.pop("config")
        run_dir = keep = None
        try:
            try:
                # Only flags given on the command line override the --config file, not the defaults shown.
                source = click.get_current_context().get_parameter_source
                flags = {k: v for k, v in kwargs.items() if source(k) == click.core.ParameterSource.COMMANDLINE}
                cfg = _settings(fn.__name__, flags, config_file)
                _fetch_data(cfg)  # a download shows its own progress, before the command's bars start
                if fn.__name__ in RUN_DIR_NAMES:  # before any work: a bad --out must not cost a finished run
                    target = Path(cfg.out or cfg.resume or "runs/new").expanduser().absolute()
                    keep = next(p for p in (target, *target.parents) if p.exists()).resolve()
                    run_dir = make_run_dir(cfg, RUN_DIR_NAMES[fn.__name__])
                    cfg = dataclasses.replace(cfg, out=str(run_dir))
                fn(cfg, **extra)
            except BaseException:
                if run_dir is not None:
                    remove_if_empty(run_dir, keep)  # a failed or interrupted run leaves no empty directory behind
                raise
        except KeyboardInterrupt:
            _interrupted(run_dir, writes=fn.__name__ in RUN_DIR_NAMES)
        except (ConfigError, DataError) as error:
            _fail(str(error))
        except MemoryError:
            _fail(f"out of memory while running {fn.__name__.replace('_', '-')}; lower --dim, --users-per-round, "
                  "--users-per-node or the data size")
        except OSError as error:
            if error.filename is None:
                raise
            _fail(f"{error.filename}: {error.strerror or error}")

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = fn.__doc__
    command.__name__ = fn.__name__
    return command


def _located(run: Path, kinds: str = ANY_RUN) -> Path:
    """The run a command acts on: --run itself, or a compare directory's federated run (said in one line)."""
    paths = locate(run, kinds)
    if paths.note:
        console.print(paths.note, highlight=False, markup=False, soft_wrap=True)
    return paths.run


def _fetch_data(cfg: RunConfig) -> None:
    """Download the run's MovieLens data set if it is not there yet (saying so, with progress)."""
    if cfg.dataset == "synthetic":
        return
    from fedrec.datasets.download import dataset_folder

    dataset_folder(cfg.dataset, cfg.data_dir or None, progress=_download_bar if console.is_terminal else None)


@contextlib.contextmanager
def _download_bar(title: str, total: int | None):
    columns = (TextColumn(f"[bold]{title}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TextColumn("eta"),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(title, total=total)
        yield lambda size: progress.advance(task, size)


def _quiet_engines() -> None:
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # Flower logs every round at INFO, and run_simulation (deprecated since 1.28, kept in
    # the pinned 1.42) prints a banner: both would drown the progress display.
    os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
    from flwr.supercore.logger import update_console_handler

    update_console_handler(level=os.environ["FLWR_LOG_LEVEL"])


@contextlib.contextmanager
def _progress(total: int, label: str, timed: bool = True):
    """A progress bar on stderr; `timed=False` (DP runs) shows no elapsed time or ETA: seconds per
    round depend on who was sampled, and the run's ledger does not release them."""
    clock = (TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()) if timed else ()
    progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), *clock, console=console, transient=False)
    try:
        with progress:
            try:
                yield progress
            except BaseException:
                progress.live.transient = True  # a failed run shows its one error line, not a stopped bar
                console.quiet = not console.is_terminal  # (on a file or pipe, rich would end it with a blank line)
                raise
    finally:
        console.quiet = False


def _show(title: str, rows: dict[str, dict[str, float]]) -> None:
    table = Table(title=title)
    names = sorted({k for r in rows.values() for k in r})
    table.add_column("run")
    for name in names:
        table.add_column(name, justify="right")
    for run, metrics in rows.items():
        table.add_row(run, *[f"{metrics[n]:.4f}" if n in metrics else "" for n in names])
    out.print(table)


def _tracker(progress: Progress, task, key: str, first=None):
    """The progress bar's update per row; `first()` runs before the first (the run has started: its
    settings and data passed every check, so nothing printed before would precede an error line)."""
    pending = [first] if first else []

    def update(row: dict) -> None:
        _raise_if_interrupted()
        while pending:
            pending.pop()()
        shown = {k: v for k, v in row.items() if (k in ("rmse", "train_loss") or k.startswith("hr@")) and v == v}
        info = " ".join(f"{k}={v:.4f}" for k, v in shown.items())
        progress.update(task, completed=row[key], info=info)
    return update


def _announce(cfg: RunConfig, central: bool = False, console: Console = console) -> None:
    """The run's model and what it protects, as it starts (stderr, above the progress bar)."""
    from fedrec.privacy.guarantee import describe
    from fedrec.run.build import burn_in
    from fedrec.run.config import applies

    steps, unit = (cfg.epochs, "epochs") if central else (cfg.rounds, "rounds")
    resolved = cfg.resolved()
    console.print(f"model: {resolved.model_reason()}", highlight=False, soft_wrap=True)
    if applies(resolved, "burn_in") and burn_in(cfg.burn_in, steps) < cfg.burn_in:  # the model reads it
        console.print(f"note: --burn-in {cfg.burn_in} is more than half of the {steps} {unit}; the model averages "
                      f"the draws after {burn_in(cfg.burn_in, steps)}", highlight=False, soft_wrap=True)
    console.print(guarantee_line({"guarantee": describe(resolved, central=central)["guarantee"]}), highlight=False,
                  soft_wrap=True)


def guarantee_line(privacy: dict) -> str:
    from fedrec.privacy.guarantee import line

    return line(privacy)


def run_central_cli(cfg: RunConfig):
    from fedrec.simulations.central import run_central

    epochs = cfg.resolved().epochs
    with _progress(epochs, "central") as progress:
        task = progress.add_task("central", total=epochs, info="")
        outcome = run_central(cfg, on_epoch=_tracker(progress, task, "epoch",
                                                     lambda: _announce(cfg, True, progress.console)))
    return outcome


def run_federated_cli(cfg: RunConfig):
    _quiet_engines()
    from fedrec.server.runner import resumed_config
    from fedrec.simulations.federated import simulate as simulate_federated

    if cfg.resume:
        cfg = resumed_config(cfg)  # its own settings: the progress bar needs its rounds
    rounds = cfg.resolved().rounds  # an algorithm of few releases sets its own
    with _progress(rounds, "federated", timed=cfg.dp == "none") as progress:
        task = progress.add_task("federated", total=rounds, info="starting engine")
        outcome = simulate_federated(cfg, on_round=_tracker(progress, task, "round",
                                                            lambda: _announce(cfg, False, progress.console)),
                           say=lambda line: progress.console.print(line, highlight=False))
    if outcome.status == "interrupted":  # checkpointed: one line, the conventional exit code of Ctrl-C
        console.print(f"interrupted after round {outcome.history[-1]['round'] if outcome.history else 0}; "
                      f"continue with: fedrec simulate --resume {outcome.run_dir}", highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    return outcome


@cli.command()
@_config_command
def central(cfg: RunConfig) -> None:
    """Train the central baseline (all data in one place)."""
    outcome = run_central_cli(cfg)
    _show(f"central {cfg.dataset} {cfg.split}, {outcome.summary['model']}, {outcome.summary['wall_seconds']:.1f} s",
          {"central": outcome.summary["metrics"]})
    out.print(guarantee_line(outcome.summary["privacy"]), highlight=False, soft_wrap=True)
    out.print(f"results in {outcome.run_dir}")


@cli.command()
@_config_command
def simulate(cfg: RunConfig) -> None:
    """Federated training through Flower's simulation engine."""
    outcome = run_federated_cli(cfg)
    timing = f", {outcome.wall_seconds:.1f} s" if "wall_seconds" in outcome.summary else ""  # DP runs do not release it
    _show(f"federated {cfg.dataset} {cfg.split}, {outcome.summary['model']}{dp_title(outcome.summary)}{timing}",
          {"federated": outcome.summary["metrics"]})
    out.print(guarantee_line(outcome.summary["privacy"]), highlight=False, soft_wrap=True)
    out.print(f"results in {outcome.run_dir}")


def dp_title(summary: dict) -> str:
    """', eps 7.99, delta 1e-05, z 1.23' for a DP run's table title ('' otherwise)."""
    from fedrec.run.rundir import dp_label

    label = dp_label(summary.get("privacy") or {})
    return f", {label}" if label else ""


_TUNE_TRIALS = typer.Option(0, "--tune-trials", help=f"trials per side (central, federated); with neither this nor "
                                                    f"--tune-seconds: {DEFAULT_TRIALS}")
_TUNE_SECONDS = typer.Option(0.0, "--tune-seconds", help="seconds per side: no trial starts after them (0: no limit)")


def run_tune_cli(cfg: RunConfig, trials: int, seconds: float, run_dir: Path):
    """Both sides' searches with a progress bar each; prints the chosen settings."""
    _quiet_engines()
    from fedrec.experiments.tune import SIDES, Budget
    from fedrec.experiments.tune import tune as run_tune

    budget = Budget.of(trials, seconds)
    with _progress(budget.trials or 0, "tune") as progress:
        tasks = {side: progress.add_task(side, total=budget.trials or None, info="") for side in SIDES}
        best: dict[str, float] = {}

        def on_trial(side: str, entry: dict) -> None:
            _raise_if_interrupted()
            value = next(v for k, v in entry.items() if k.startswith("val_"))
            if value is not None:
                best[side] = value if side not in best else (max if cfg.implicit else min)(best[side], value)
            info = f"{side}: trial {entry['trial']} " + (f"{value:.4f}, best {best[side]:.4f}" if value is not None
                                                         else "failed")
            progress.update(tasks[side], advance=1, info=info)

        report = run_tune(cfg, budget, on_trial, run_dir)
    table = Table(title=f"chosen on validation ({report['validation'].split(';')[0]})")
    names = list(dict.fromkeys(k for chosen in report["chosen"].values() for k in chosen))
    names = [n for n in names if n != "trial" and not n.startswith("val_")] + [f"val_{report['metric']}", "trial"]
    for column in ("setting", *report["chosen"]):
        table.add_column(column, justify="right")
    for name in names:
        table.add_row(name.replace("_", "-"), *(f"{c[name]:.4g}" if isinstance(c.get(name), float)
                                                else str(c.get(name, "")) for c in report["chosen"].values()))
    out.print(table)
    return report


_REPEATS = typer.Option(1, "--repeats", help="runs with seeds seed, seed+1, ... (and on ML-100K u1..u5, the next "
                                              "folds), reported as mean and 95% interval; their federations run in "
                                              "this process, sharing its start-up")


@cli.command()
@_config_command
def compare(cfg: RunConfig, tune: bool = typer.Option(False, "--tune", help="first choose each side's settings on "
                                                       "a validation split (as fedrec tune), then run with them"),
            tune_trials: int = _TUNE_TRIALS, tune_seconds: float = _TUNE_SECONDS, repeats: int = _REPEATS) -> None:
    """Central and federated runs with the same model, split and seeds, side by side."""
    if tune:
        require("tune", "compare --tune")
    from fedrec.experiments.compare import run_compare
    from fedrec.experiments.repeats import check_repeats

    check_repeats(repeats)
    if repeats > 1:
        if tune:
            raise ConfigError("--tune runs once: tune first (fedrec tune), then compare --repeats with --config "
                              "of the chosen settings")
        from fedrec.cli.research import compare_repeats_cli

        return compare_repeats_cli(cfg, repeats)

    if (tune_trials or tune_seconds) and not tune:
        raise ConfigError("--tune-trials and --tune-seconds apply with --tune; add --tune")
    searched = [n for n in sorted(SEARCHED) if tune and getattr(cfg, n) != getattr(RunConfig(), n)]
    if searched:
        raise ConfigError(f"{_flags(searched)}: --tune chooses {'it' if len(searched) == 1 else 'them'}; "
                          "drop it or drop --tune")
    if tune and cfg.dp != "none":
        raise ConfigError(f"--tune does not run with --dp {cfg.dp}: its validation trials would spend privacy no "
                          "epsilon accounts for; tune without --dp, then pass the chosen settings with --dp")
    tuner = (lambda run_dir: run_tune_cli(cfg, tune_trials, tune_seconds, run_dir)) if tune else None
    report = run_compare(cfg, run_central_cli, run_federated_cli, tuner)
    central, federated = report["central"], report["federated"]
    models = central["model"] if central["model"] == federated["model"] else \
        f"central {central['model']} vs federated {federated['model']}: different models"
    _show(f"central vs federated: {cfg.dataset} {cfg.split}, {models}{dp_title(federated)}",
          {"central": central["metrics"], "federated": federated["metrics"]})
    out.print(guarantee_line(federated["privacy"]).replace("privacy:", "federated privacy:", 1), highlight=False,
              soft_wrap=True)
    if "epsilon" in federated["privacy"]:
        out.print("note: central/ is the non-private baseline on the same users' data; the federated run's epsilon "
                  "does not cover it", highlight=False, soft_wrap=True)
    out.print(f"results in {report['run_dir']}")


@cli.command()
@_config_command
def tune(cfg: RunConfig, tune_trials: int = _TUNE_TRIALS, tune_seconds: float = _TUNE_SECONDS) -> None:
    """Choose central's and federated's settings on a validation split of the training data (never the
    test set): Optuna's TPE sampler, the same budget per side; writes OUT/tune.json, OUT/trials.csv and
    the chosen settings as OUT/central.toml and OUT/federated.toml (for --config)."""
    require("tune", "fedrec tune")
    report = run_tune_cli(cfg, tune_trials, tune_seconds, Path(cfg.out))
    out.print(f"results in {report['run_dir']}; run with them: fedrec simulate --config "
              f"{report['run_dir']}/federated.toml (central: --config {report['run_dir']}/central.toml)",
              highlight=False, soft_wrap=True)


@cli.command()
@_config_command
def accuracy(cfg: RunConfig, users_per_node_federated: int = typer.Option(
        0, help="users per SuperNode in the federated runs (1 = one user per node; 0 = auto cohorts)"),
        tune_trials: int = typer.Option(0, help="also tune the federated settings on validation, this many trials "
                                               "per data set, and score them against the peers (0: skip)"),
        sequential: bool = typer.Option(False, help="run the central runs and peers alone, not beside the federated "
                                                    "runs: slower, and their seconds are each run's own"),
        repeats: int = typer.Option(1, "--repeats", help="the whole benchmark with seeds seed, seed+1, ...: each "
                                                         "case's mean and 95% interval; its federations run in "
                                                         "this process, sharing its start-up"),
) -> None:
    """Accuracy benchmark: central vs federated on ML-100K u1-u5 and leave-one-out, and on synthetic data."""
    from fedrec.experiments.repeats import check_repeats

    if tune_trials < 0:
        raise ConfigError(f"--tune-trials must be >= 0 (got {tune_trials})")
    check_repeats(repeats)
    if tune_trials and repeats > 1:
        raise ConfigError("--tune-trials runs once: drop --repeats, or tune first and pass the chosen settings")
    if tune_trials:
        require("tune", "accuracy --tune-trials")
    _quiet_engines()
    if repeats > 1:
        from fedrec.cli.research import accuracy_repeats_cli

        return accuracy_repeats_cli(cfg, repeats, users_per_node_federated)
    from fedrec.experiments.accuracy import run_accuracy

    report = run_accuracy(cfg, users_per_node_federated, log=lambda line: console.print(line, highlight=False),
                          tune_trials=tune_trials, concurrent=not sequential)
    cases = report["cases"]
    rows = {f"ml100k u1-u5 {side} (mean)": {"rmse": rmse}
            for side, rmse in cases["ml100k-u1-u5"]["mean_rmse"].items()}
    for name in [c for c in cases if c != "ml100k-u1-u5"]:
        for mode in ("central", "federated"):
            rows[f"{name} {mode}"] = {k: v for k, v in cases[name][mode]["metrics"].items() if k != "train_loss"}
        for peer, result in cases[name].get("peers", {}).items():  # skipped peers: their reason is logged above
            if "rmse" in result:
                rows[f"{name} peer {peer}"] = {"rmse": result["rmse"], "mae": result["mae"]}
    for name, case in report.get("tuned", {}).items():
        rows[f"{name} federated, tuned"] = {k: v for k, v in case["federated"]["metrics"].items() if k != "train_loss"}
        rows[f"{name} best peer"] = {"rmse": case["best_peer_rmse"]}
    _show("accuracy", rows)
    out.print(f"results in {report['run_dir']}/accuracy.json")


@cli.command()
@_config_command
def bench(cfg: RunConfig,
          one_user_rounds: int = typer.Option(3, help="rounds of the slow one-user-per-node case"),
          cases: str = typer.Option(",".join(DEFAULT_CASES),
                                    help=f"comma-separated cases of: {', '.join(CASE_NAMES)}")) -> None:
    """Throughput and memory through Flower's simulation engine; writes OUT/bench.json.

    --rounds sets the rounds of each case. Pass --dataset ml-100k --data-dir DIR for the
    real ML-100K; otherwise its shape is used with synthetic ratings."""
    if cfg.dataset not in ("ml-100k", "synthetic"):
        raise ConfigError("bench runs on ml-100k (if you have it) or synthetic data of its shape")
    names = [name.strip() for name in cases.split(",") if name.strip()]
    unknown = sorted(set(names) - set(CASE_NAMES))
    if unknown or not names:
        raise ConfigError(f"--cases: unknown case(s) {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(CASE_NAMES)}")
    _quiet_engines()
    from fedrec.experiments.bench import run_bench

    report = run_bench(cfg, cfg.rounds, one_user_rounds, names,
                       log=lambda line: console.print(line, highlight=False))
    floor = report.get("engine_floor_seconds_per_round")
    table = Table(title="fedrec bench" + (f" (engine floor {floor:.3f} s/round)" if floor else ""))
    for column in ("case", "model", "K", "updates/s", "s/round", "end-to-end s", "peak RSS MB", "users", "nodes"):
        table.add_column(column, justify="right")
    for name, c in report["cases"].items():
        if "rmse_deployment" in c:  # the Deployment Engine against Ray: a line of its own
            continue
        table.add_row(name, c["model"], str(c["dim"]), f"{c['updates_per_second']:.0f}",
                      f"{c['seconds_per_round']:.3f}", f"{c['end_to_end_seconds']:.1f}", f"{c['peak_rss_mb']:.0f}",
                      str(c["num_users"]), str(c["num_nodes"]))
    if table.row_count:
        out.print(table)
    for name, c in report["cases"].items():
        if "rmse_deployment" in c:
            out.print(f"{name} ({c['model']}, K={c['dim']}): RMSE {c['rmse_deployment']:.6f} (Deployment Engine, "
                      f"{c['supernodes']} SuperNodes) vs {c['rmse_ray']:.6f} (Ray), difference "
                      f"{c['rmse_difference']:.1e}; s/round {c['seconds_per_round_deployment']:.2f} vs "
                      f"{c['seconds_per_round_ray']:.3f}")
    out.print(f"results in {report['run_dir']}/bench.json")


@cli.command()
@_config_command
def partition(cfg: RunConfig, nodes: int = typer.Option(
        0, min=0, help="shards to cut (0: as many as simulate would use with --users-per-node)")) -> None:
    """Cut the data into one shard per node, each holding only its users' own rows.

    Written once (simulate cuts and caches its shards on first use). --out DIR, else the
    cache, ~/.cache/fedrec/shards ($FEDREC_SHARD_CACHE overrides). Point a SuperNode at
    its shard with --node-config 'shard="DIR/node-00000"'; it reads nothing else."""
    from fedrec.run.build import ensure_shards, num_nodes, population

    count = nodes or num_nodes(cfg, population(cfg))
    with _progress(count, "shards") as progress:
        task = progress.add_task("cut", total=count, info="")
        root = ensure_shards(cfg, count, out=cfg.out or None,
                             progress=lambda done: progress.update(task, completed=done))
    out.print(str(root.resolve()))


def _parse_epsilons(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--epsilons {text!r} is not a comma-separated list of numbers") from None
    if not values or not all(0 < v < math.inf for v in values):
        raise ConfigError("--epsilons needs positive, finite numbers")
    return values


@cli.command()
@_config_command
def audit(cfg: RunConfig, targets: int = typer.Option(50, help="target users to attack"),
          k: int = typer.Option(10, help="k of precision@k"),
          epsilons: str = typer.Option("", help="target epsilons to audit, comma-separated "
                                                "(default: --target-epsilon)"),
          canaries: int = typer.Option(200_000, min=10, help="canary users per audit run, at most one per "
                                                             "coordinate of the statistics (local DP: at most 400, "
                                                             "each on a node of its own)")) -> None:
    ("""Leakage audit: item-inference attackers, canary lower bounds on epsilon (federated runs of canary """
     """users through the real server and devices), the seed attack. Writes OUT/audit.json.""")
    _quiet_engines()  # the in-process rounds (SecAgg+ and the canary runs) would log every stage
    from fedrec.audit.audit import run_audit

    values = _parse_epsilons(epsilons) if epsilons else None
    report = run_audit(cfg, targets, k, log=lambda line: console.print(line, highlight=False), epsilons=values,
                       canaries=canaries)
    table = Table(title=f"leakage audit: {cfg.dataset}, {targets} target users")
    for column in ("attacker", "observer", "mode", "dp", "secagg", "epsilon", "AUC", f"precision@{k}",
                   "epsilon lower bound"):
        table.add_column(column, justify="right")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in report["results"]:
        table.add_row(r["attacker"], r["observer"], r.get("mode", "-"), r["dp"], r["secure_aggregation"],
                      fmt(r["epsilon"], ".2f"),
                      fmt(r.get("auc"), ".3f"), fmt(r.get("precision_at_k"), ".3f"),
                      fmt(r.get("epsilon_lower"), ".2f") + (f" ({r['confidence']:.0%})" if "confidence" in r else ""))
    out.print(table)
    out.print(f"results in {report['run_dir']}/audit.json")


@cli.command("secagg-bench")
@_config_command
def secagg_bench(cfg: RunConfig, nodes: str = typer.Option("10,50,200", help="one-user nodes of the in-process cases"),
                 deploy_nodes: str = typer.Option("10", help="SuperNodes of the loopback deployment cases "
                                                             "('' to skip)")) -> None:
    """Seconds per round and bytes per device with and without SecAgg+; writes OUT/secagg_bench.json."""
    try:
        inprocess = [int(v) for v in nodes.split(",") if v.strip()]
        deployed = [int(v) for v in deploy_nodes.split(",") if v.strip()]
    except ValueError:
        raise ConfigError("--nodes and --deploy-nodes take comma-separated whole numbers") from None
    if min(inprocess + deployed, default=3) < 3:
        raise ConfigError("SecAgg+ needs at least 3 nodes per case")
    _quiet_engines()
    from fedrec.experiments.secagg_bench import run_secagg_bench

    report = run_secagg_bench(cfg, inprocess, deployed, cfg.rounds,
                              log=lambda line: console.print(line, highlight=False))
    out.print(f"results in {report['run_dir']}/secagg_bench.json")


@cli.command("serve-bench")
def serve_bench(run: Path = typer.Option(..., "--run", help="a finished central, federated or compare run "
                                                             "directory"),
                starts: int = typer.Option(5, min=1, help="fresh `fedrec serve` processes to time"),
                repeats: int = typer.Option(200, min=1, help="in-process cold-start fits per number of ratings"),
                http_repeats: int = typer.Option(30, min=1, help="POST /new per number of ratings"),
                out_dir: str = typer.Option("", "--out", help="where serve_bench.json goes [default: "
                                                              "runs/serve-bench-<time>]")) -> None:
    """The demo page's speed: `fedrec serve` start to first page, and a cold-start fit + top-10
    (in process and through POST /new) for 5, 10, 15 and 20 ratings; writes OUT/serve_bench.json."""
    try:
        require("serve", "fedrec serve-bench")
        _located(run)  # before making OUT: a wrong --run leaves nothing behind
        from fedrec.experiments.serve_bench import FIRST_PAGE_TARGET, FIT_TARGET, run_serve_bench

        run_dir = make_run_dir(RunConfig(out=out_dir), "serve-bench")
        report = run_serve_bench(run, run_dir, starts, repeats, http_repeats,
                                 log=lambda line: console.print(line, highlight=False))
    except (ConfigError, DataError) as error:
        _fail(str(error))
    table = Table(title="fedrec serve-bench (seconds)")
    for column in ("measure", "median", "p95", "max", "n", "target"):
        table.add_column(column, justify="right")
    rows = [("serve start -> GET / 200", report["start_up"]["first_page_seconds"], FIRST_PAGE_TARGET),
            ("serve start -> device page 200", report["start_up"]["device_page_seconds"], None),
            ("fit + top-10, in process", report["fit_top10_in_process"]["all"], FIT_TARGET),
            *((f"  {k} ratings", s, None) for k, s in report["fit_top10_in_process"]["by_ratings"].items()),
            ("POST /new (fit + top-10 + page)", report["fit_top10_http"]["all"], FIT_TARGET),
            *((f"  {k} ratings", s, None) for k, s in report["fit_top10_http"]["by_ratings"].items()),
            ("first POST /new, during start-up imports", {"n": 1, **dict.fromkeys(
                ("median", "p95", "max"), report["fit_top10_http"]["first_post_after_start_seconds"])}, FIT_TARGET)]
    for name, s, target in rows:
        table.add_row(name, f"{s['median']:.4f}", f"{s['p95']:.4f}", f"{s['max']:.4f}", str(s["n"]),
                      f"<= {target}" if target else "")
    out.print(table)
    out.print(f"results in {report['out']}/serve_bench.json")


@cli.command()
@_config_command
def robustness(cfg: RunConfig,
               dropout_rate: float = typer.Option(0.3, help="share of sampled devices failing each round"),
               poisoning: bool = typer.Option(True, help="also run the poisoning experiment")) -> None:
    """Dropouts, stop-and-resume and poisoning against clean runs of the same settings; writes OUT/robustness.json."""
    if not 0 < dropout_rate < 1:
        raise ConfigError(f"--dropout-rate must be between 0 and 1 (got {dropout_rate})")
    _quiet_engines()
    from fedrec.experiments.robustness import run_robustness

    report = run_robustness(cfg, dropout_rate, poisoning, log=lambda line: console.print(line, highlight=False))
    out.print(f"results in {report['run_dir']}/robustness.json")


@cli.command("clip-check")
@_config_command
def clip_check(cfg: RunConfig,
               check_negatives: str = typer.Option("1,4", help="implicit: training negatives per positive to check"),
               check_local_epochs: str = typer.Option("1,2", help="local epochs to check, comma-separated")) -> None:
    """Measure every user's contribution norm over C in each upload mode; writes OUT/clip_check.json."""
    from fedrec.audit.clipcheck import run_clip_check

    try:
        neg = [int(v) for v in check_negatives.split(",")]
        epochs = [int(v) for v in check_local_epochs.split(",")]
    except ValueError:
        raise ConfigError("--check-negatives and --check-local-epochs take comma-separated whole numbers") from None
    if min(neg + epochs) < 1:
        raise ConfigError("--check-negatives and --check-local-epochs must be >= 1")
    report = run_clip_check(cfg, neg, epochs, log=lambda line: console.print(line, highlight=False))
    out.print(f"max contribution/C over every user and mode: {report['max_ratio']:.7f}")
    out.print(f"results in {report['run_dir']}/clip_check.json")


@cli.command("privacy-sweep")
@_config_command
def privacy_sweep(cfg: RunConfig, epsilons: str = typer.Option("1,2,4,8,16", help="target epsilons, comma-separated"),
                  targets: int = typer.Option(30, help="users attacked per epsilon"),
                  models: str = typer.Option("", help="algorithms to sweep side by side, comma-separated (e.g. "
                                                      "mf,dpstats; each with what it admits); empty: --model")) -> None:
    """Accuracy and audit per target epsilon (central DP), per algorithm, with non-private references."""
    from fedrec.models.registry import algorithm_class

    values = _parse_epsilons(epsilons)
    names = [m.strip() for m in models.split(",") if m.strip()] or None
    try:
        bounded = [algorithm_class(n).bounded_norm for n in (names or [cfg.resolved().model])]
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.clipping_norm <= 0 and not all(bounded):
        raise ConfigError("privacy-sweep needs --clipping-norm > 0")
    _quiet_engines()
    from fedrec.experiments.sweep import run_sweep

    report = run_sweep(cfg, values, targets, log=lambda line: console.print(line, highlight=False), models=names)
    metric = report["metric"]
    device = "" if report["device_only"] is None else f", device-only {report['device_only']:.4f}"
    table = Table(title=f"privacy sweep ({metric}; non-private {report['non_private'][metric]:.4f}, "
                        f"central {report['central'][metric]:.4f}{device})")
    for column in ("model", "target eps", "eps", "eps vs server", "delta", "z", metric, "direction AUC", "prior AUC",
                   "canary eps lower"):
        table.add_column(column, justify="right")

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for r in report["results"]:
        table.add_row(r["model"], f"{r['target_epsilon']:g}", f"{r['epsilon']:.2f}",
                      fmt(r["epsilon_against_server"], ".2f"), f"{r['delta']:g}", f"{r['noise_multiplier']:.3f}",
                      f"{r[metric]:.4f}", fmt(r["auc"], ".3f"), fmt(r["prior_auc"], ".3f"), f"{r['epsilon_lower']:.2f}")
    out.print(table)
    for name, ref in report.get("references", {}).items():
        out.print(f"{name}: non-private federated {ref['non_private'][metric]:.4f}, "
                  f"central {ref['central'][metric]:.4f}")
    out.print(f"results in {report['run_dir']}/sweep.json (and sweep.csv, sweep.png)")


@cli.command()
def deploy(nodes: int = typer.Option(3, min=1, help="SuperNodes to start (node I hosts partition I of N)"),
           dir: Optional[Path] = typer.Option(None, "--dir", help="certs, keys, database, logs, run "
                                                                  "[default: runs/deploy-<time>]"),
           insecure: bool = typer.Option(False, help="no TLS, no SuperNode authentication: loopback tests only"),
           run_config: str = typer.Option("rounds=3 eval-every=3", help="flwr run --run-config, "
                                                                       "e.g. 'rounds=3 synthetic-users=300'"),
           keep_running: bool = typer.Option(False, help="leave the federation up after the run "
                                                         "and print how to stop it"),
           data_dir: Optional[Path] = typer.Option(
               None, help="where nodes read data [default: $FEDREC_DATA_DIR or ~/.cache/fedrec]")) -> None:
    ("""A SuperLink and N SuperNodes on this machine (TLS, SuperNode authentication, state in a database), """
     """one fedrec run.""")
    import time

    from fedrec.deploy.deploy import deploy as run_deploy

    root = dir or Path("runs") / f"deploy-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        code = run_deploy(nodes, root, run_config, insecure, keep_running, data_dir,
                          log=lambda line: console.print(line, highlight=False, markup=False))
    except (FileExistsError, ValueError, TimeoutError, RuntimeError) as error:  # bad --dir / paths: 2; failed start: 1
        console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2 if isinstance(error, (FileExistsError, ValueError)) else 1) from None
    raise typer.Exit(code)


@cli.command()
def recommend(run: Path = typer.Option(..., "--run", help="a finished central, federated or compare run directory "
                                                          "(of a compare directory: its federated run)"),
              user: str = typer.Option(..., help="the user's id in the data set"),
              n: int = typer.Option(10, min=1, help="how many items"),
              as_json: bool = typer.Option(False, "--json", help="print a JSON list of {item, title, score}"),
              include_unrated: bool = typer.Option(False, "--include-unrated-items",
                                                   help="also rank items no user rated in training (the model "
                                                        "never learned them: their scores are initial values)"),
              data_dir: Optional[Path] = typer.Option(
                  None, help="where this device reads the user's ratings [default: the run's]")) -> None:
    """A user's top-N unrated items from a run's global model, one line each: score and title.

    The user's vector is re-fitted here, as on the user's device, from the user's own
    training ratings against the saved item model (model.npz holds no user vectors)."""
    try:
        run = _located(run)
        from fedrec.personal.recommend import recommend as top_items

        picks = top_items(run, user, n, str(data_dir) if data_dir else None, include_unrated)
    except (ConfigError, DataError) as error:
        _fail(str(error))
    if as_json:
        out.print_json(data=picks)
        return
    for pick in picks:
        out.print(f"{pick['score']:.2f}  {pick['title']}", highlight=False, markup=False)


@cli.command()
def consent(run: Path = typer.Option(..., "--run", help="a finished federated or compare run directory (of a "
                                                        "compare directory: its federated run)"),
            user: str = typer.Option(..., help="the user's id in the data set"),
            opt_out: bool = typer.Option(False, "--opt-out", help="the device stops training this user"),
            opt_in: bool = typer.Option(False, "--opt-in", help="the device trains this user again")) -> None:
    """Record a user's consent to train on its own device (the server is not told).

    An opt-out applies from the round after the run's last (not retroactive: a forget replay
    trains the user in earlier rounds as before); from then on the device sends nothing of the
    user, neither training updates nor evaluation sums, like a device that dropped out; it
    still gets recommendations on the device."""
    if opt_out == opt_in:
        _fail("pass one of --opt-out and --opt-in")
    try:
        run = _located(run, "federated or compare")
        from fedrec.personal.device_view import set_consent

        set_consent(run, user, train=opt_in)
    except (ConfigError, DataError) as error:
        _fail(str(error))
    out.print(f"user {user}: {'opted in to' if opt_in else 'opted out of'} training, recorded on its device",
              highlight=False, markup=False)


@cli.command()
def forget(run: Path = typer.Option(..., "--run", help="a finished federated run that kept its checkpoints, or "
                                                       "the compare directory holding it"),
           user: str = typer.Option(..., help="the user's id in the data set"),
           verify: bool = typer.Option(False, "--verify", help="also run the never-had-the-user run from "
                                                               "scratch and compare the models")) -> None:
    """Erase a user on its device and remove its influence from the model by exact replay.

    Replays the federation without the user from the last checkpoint kept before the user
    first took part (needs a run made with --keep-checkpoints); reports what it cost. Under DP it
    erases the device only and says what bounds the user's influence: a replay would release a
    second model from the other users' data that no accounting covers."""
    try:
        run = _located(run, "federated or compare")
    except ConfigError as error:
        _fail(str(error))
    _quiet_engines()
    from fedrec.personal.forget import forget as run_forget

    try:
        report = run_forget(run, user, verify,
                            say=lambda line: out.print(line, highlight=False, markup=False, soft_wrap=True))
    except (ConfigError, DataError) as error:
        _fail(str(error))
    except Exception as error:  # e.g. a run directory changed under the replay: one line, no traceback
        from fedrec.personal.forget_lock import pending_path

        cut_short = pending_path(run.expanduser().resolve()).is_file()  # else no replay began: nothing to finish
        _fail(f"fedrec forget failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
              + ("; run it again to finish (a replay cut short resumes)" if cut_short else ""))
    if report.get("replayed") is False:
        return  # a DP run: forget said what it did and what bounds the user (its note); the device part succeeded
    out.print(f"rounds replayed: {report['rounds_replayed']} (from round {report['from_round']} to "
              f"{report['last_round']}), {report['seconds']:.1f} s; {report['note']}", highlight=False, markup=False,
              soft_wrap=True)


@cli.command()
def serve(run: Path = typer.Option(..., "--run", help="a finished central, federated or compare run directory"),
          host: str = typer.Option("127.0.0.1", help="address to listen on (loopback: only this machine; on any "
                                                      "other, the token crosses the network in plain HTTP and "
                                                      "whoever reads it can act as an unclaimed device)"),
          port: int = typer.Option(8000, min=0, max=65535, help="port to listen on (0: any free port)"),
          data_dir: Optional[Path] = typer.Option(
              None, help="where the devices read their ratings [default: the run's]")) -> None:
    """A local web page showing one device's side of the run: what it stores, recommends and
    sends, a new device's cold start, consent and forgetting. Open it with the URL it prints: the
    URL carries a random access token, made afresh each start and shown nowhere else (there is no
    --token option: a command line is visible to every user of the machine); without it every page
    answers 403. A device's controls belong to the visitor who claims it first. Ctrl-C stops it."""
    try:
        require("serve", "fedrec serve")
        _located(run)  # the page serves a compare directory's federated run itself (the central one is its reference)
        from fedrec.demo.server import serve as serve_page

        serve_page(run, host, port, str(data_dir) if data_dir else None,
                   say=lambda line: out.print(line, highlight=False, markup=False, soft_wrap=True))
    except (ConfigError, DataError) as error:
        _fail(str(error))


# Ctrl-C raises KeyboardInterrupt, but a library's catch-all (e.g. around a lazy import) can swallow it:
# it is also remembered, and the next progress update raises it again. A second Ctrl-C leaves at once.
_ctrl_c = threading.Event()


def _on_ctrl_c(signum, frame) -> None:
    if _ctrl_c.is_set():
        os.write(2, b"interrupted\n")  # not through rich: the main thread may hold its console's lock
        os._exit(130)
    _ctrl_c.set()
    raise KeyboardInterrupt


def _raise_if_interrupted() -> None:
    if _ctrl_c.is_set():
        raise KeyboardInterrupt


INTRA_OP_THREADS = "1"
"""torch's (and BLAS's) threads per process unless OMP_NUM_THREADS says otherwise. fedrec's tensors are
small (a chunk of users, K <= 64): a second thread gains little, and on a busy 2-core machine its
OpenMP barriers wait for a descheduled thread. Central ML-100K u1, 60 epochs, load 5-7 on 2 cores,
back to back: MF 7.5-16.6 s with one thread against 55-74 s with two, BPMF 4.7-8.8 s against
11.4-30.8 s, the same RMSE. The engine's processes inherit it (the ClientApp actors set it anyway)."""

from fedrec.cli import research as _research  # noqa: E402,F401  (its commands: fedrec experiment)


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", INTRA_OP_THREADS)  # before any command imports torch
    signal.signal(signal.SIGINT, _on_ctrl_c)
    try:
        cli()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
