"""The research harness's command line: `compare --repeats`, `accuracy --repeats` (called from their
commands in cli/main.py) and `fedrec experiment`. Registered on cli/main.py's `cli` when it is imported;
like it, imports nothing heavy until a command runs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from fedrec.datasets.errors import DataError
from fedrec.run.config import ConfigError, RunConfig

from .main import (
    _announce,
    _fail,
    _fetch_data,
    _progress,
    _quiet_engines,
    _raise_if_interrupted,
    _tracker,
    cli,
    console,
    out,
    run_federated_cli,
)


def run_session_cli(cfg: RunConfig, label: str):
    """A federation of a repeat (experiments/repeats.py federate_in_session), with a progress bar."""
    from fedrec.experiments.repeats import federate_in_session

    with _progress(cfg.rounds, label, timed=cfg.dp == "none") as progress:
        task = progress.add_task(label, total=cfg.rounds, info="")
        return federate_in_session(cfg, on_round=_tracker(progress, task, "round"))


def compare_repeats_cli(cfg: RunConfig, count: int) -> None:
    from fedrec.experiments.compare_repeats import describe_repeat, interval_table, run_compare_repeats
    from fedrec.simulations.central import run_central

    _quiet_engines()
    state = {}

    def on_repeat(rep) -> None:
        state["label"] = f"{rep.index}/{count}"
        console.print(describe_repeat(rep), highlight=False)
        if rep.index == 1:
            _announce(cfg, False, console)

    def central_side(side_cfg: RunConfig):
        with _progress(side_cfg.epochs, f"central {state['label']}") as progress:
            task = progress.add_task("central", total=side_cfg.epochs, info="")
            return run_central(side_cfg, on_epoch=_tracker(progress, task, "epoch"))

    # A joined Ray cluster is Flower's engine's: there each federation is a run of its own.
    federated_side = run_federated_cli if cfg.ray_address else \
        (lambda side_cfg: run_session_cli(side_cfg, f"federated {state['label']}"))
    report = run_compare_repeats(cfg, count, central_side, federated_side, on_repeat)
    rows = interval_table(report["intervals_frame"], report["difference_frame"])
    paired = rows.get("central - federated", {})
    metrics = [m for m in dict.fromkeys(report["intervals_frame"]["metric"]) if m in paired]
    _print_intervals(f"central vs federated: {cfg.dataset}, {report['model']}, {count} repeats", rows, metrics)
    out.print(f"results in {report['run_dir']} (results.csv: one row per run and metric)")



def _print_intervals(title: str, rows: dict[str, dict[str, str]], metrics: list[str]) -> None:
    """One row per run (or difference), one column per metric, each cell "mean ± half-width"."""
    table = Table(title=f"{title} (mean ± 95% interval half-width)")
    table.add_column("run")
    for metric in metrics:
        table.add_column(metric, justify="right")
    for name, values in rows.items():
        table.add_row(name, *[values.get(m, "") for m in metrics])
    out.print(table)

def accuracy_repeats_cli(cfg: RunConfig, count: int, users_per_node: int) -> None:
    from fedrec.experiments.accuracy_repeats import run_accuracy_repeats, table_rows

    report = run_accuracy_repeats(cfg, count, users_per_node, log=lambda line: console.print(line, highlight=False))
    rows = table_rows(report["intervals_frame"], report["difference_frame"])
    _print_intervals(f"accuracy, {count} repeats", rows, list(dict.fromkeys(m for r in rows.values() for m in r)))
    out.print(f"results in {report['run_dir']}/accuracy.json (results.csv: one row per run and metric)")


@cli.command()
def experiment(file: Path = typer.Argument(..., help="the grid: a TOML file (examples/ holds the docs' grids)"),
               out_dir: str = typer.Option("", "--out", help="where results go (default: runs/experiment-<time>); "
                                                             "a finished or stopped grid's OUT resumes it"),
               data_dir: str = typer.Option("", "--data-dir", help="data root, over the file's data-dir")) -> None:
    """Run a grid of algorithms x settings x repeats: one tidy results.csv, a plot per axis with
    reference lines. Each cell's result is kept as it finishes: run the same command again to resume."""
    run_dir = None
    try:
        from fedrec.experiments.grid import read_grid
        from fedrec.experiments.grid_run import run_grid

        grid = read_grid(file, data_dir)
        _fetch_data(grid.base)
        _quiet_engines()
        with _progress(len(grid.cells), "grid") as progress:
            task = progress.add_task("grid", total=len(grid.cells), info="")

            def on_cell(cell, status: str) -> None:
                _raise_if_interrupted()
                progress.update(task, advance=status != "running", info=cell.key if status == "running" else "")

            report = run_grid(grid, out_dir, str(file.resolve()), on_cell)
        run_dir = report["run_dir"]
    except KeyboardInterrupt:
        console.print("interrupted; run the same command again to resume (finished cells are kept)",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except (ConfigError, DataError) as error:
        _fail(str(error))
    frame = report["frame"]
    from fedrec.experiments.stats import interval_text, summarize

    metric = main_metric_of(grid)
    table = Table(title=f"{grid.name}: {metric}, mean ± 95% interval half-width")
    by = ["algorithm", "side", *grid.axes]
    rows = summarize(frame[frame["metric"] == metric], by=[c for c in by if c in frame])
    for column in (*by, "n", metric):
        table.add_column(column, justify="right")
    for row in rows.to_dict("records"):
        table.add_row(*[("" if row[c] != row[c] else str(row[c])) for c in (*by, "n")],
                      interval_text(row["mean"], row["low"], row["high"]))
    out.print(table)
    note = " (resumed)" if report["resumed"] else ""
    out.print(f"results in {run_dir}/results.csv{note}; plots: {', '.join(p.name for p in report['plots'])}")


def main_metric_of(grid) -> str:
    from fedrec.run.rundir import main_metric

    return main_metric(grid.base.implicit, grid.base.top_k)
