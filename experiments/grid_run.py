"""Run an experiment grid (experiments/grid.py) into OUT, resumably:

    OUT/grid.json         the grid's name, digest and file: a rerun with another grid is refused
    OUT/cells/<cell>.json one finished cell (written atomically as it finishes: a rerun skips it)
    OUT/runs/<cell>/      a federated cell's run directory
    OUT/results.csv       one row per run and metric (experiments/stats.py columns, plus the axes and,
                          for a DP run, the epsilon it spent and its noise multiplier)
    OUT/<metric>_vs_<axis>.png  per axis: mean and 95% interval per algorithm, the references as lines

The federations run in this process, one after another (experiments/repeats.py federate_in_session).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from fedrec.run.config import ConfigError, RunConfig
from fedrec.run.rundir import main_metric, make_run_dir, write_json

from .grid import Cell, Grid
from .repeats import federate_in_session, one_torch_thread
from .stats import COLUMNS, SPENT, summarize, t_interval, tidy


def grid_dir(grid: Grid, out: str) -> tuple[Path, bool]:
    """OUT, new or resumed: (path, resumed). A directory of another grid, or of anything else, is refused."""
    path = Path(out).expanduser() if out else None
    if path is not None and (path / "grid.json").is_file():
        saved = json.loads((path / "grid.json").read_text())
        if saved.get("digest") != grid.digest:
            raise ConfigError(f"--out {path} holds results of another grid ({saved.get('file')}, since changed or "
                              "a different file); run it again unchanged to resume, or choose a new --out")
        return path.resolve(), True
    path = make_run_dir(RunConfig(out=out), "experiment")  # refused if it holds anything
    return path, False


def run_grid(grid: Grid, out: str = "", source: str = "", on_cell: Callable[[Cell, str], None] | None = None,
             on_round: Callable[[dict], None] | None = None) -> dict:
    """Every cell not finished yet; `on_cell(cell, status)`: "skipped" (finished before), "running" as
    it starts, "finished" once its result is written."""
    root, resumed = grid_dir(grid, out)
    if not resumed:
        write_json(root / "grid.json", {"name": grid.name, "digest": grid.digest, "file": source,
                                        "cells": len(grid.cells)})
    (root / "cells").mkdir(exist_ok=True)
    with one_torch_thread():  # central cells too: see repeats.one_torch_thread
        _run_cells(grid, root, on_cell, on_round)
    frame = results(grid, root)
    tmp = root / "results.csv.tmp"
    frame.to_csv(tmp, index=False)
    tmp.replace(root / "results.csv")
    plots = plot_grid(grid, frame, root)
    return {"run_dir": root, "frame": frame, "resumed": resumed, "plots": plots}


def _run_cells(grid: Grid, root: Path, on_cell, on_round) -> None:
    for cell in grid.cells:
        tell = on_cell or (lambda cell, status: None)
        if (root / "cells" / f"{cell.key}.json").is_file():
            tell(cell, "skipped")
            continue
        tell(cell, "running")
        write_json(root / "cells" / f"{cell.key}.json", run_cell(cell, root / "runs" / cell.key, on_round))
        tell(cell, "finished")


def run_cell(cell: Cell, run_dir: Path, on_round=None) -> dict:
    """One cell's result: its metrics, and for a DP run the epsilon it spent."""
    if cell.kind == "central":
        from fedrec.simulations.central import run_central

        summary = run_central(cell.cfg, write=False).summary
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a cell cut short by an earlier stop starts again
        summary = federate_in_session(dataclasses.replace(cell.cfg, out=str(run_dir)), on_round).summary
    privacy = summary.get("privacy", {})
    return {"kind": cell.kind, "algorithm": cell.algorithm, "axes": cell.axes, "repeat": cell.repeat.index,
            "seed": cell.repeat.seed, "fold": cell.repeat.fold, "metrics": summary["metrics"],
            "epsilon": privacy.get("epsilon"), "noise_multiplier": privacy.get("noise_multiplier"),
            "model": summary.get("model")}


def results(grid: Grid, root: Path) -> pd.DataFrame:
    """The tidy table of every finished cell: the stats columns, the grid's axes before `metric`."""
    rows = []
    for cell in grid.cells:
        path = root / "cells" / f"{cell.key}.json"
        if not path.is_file():
            continue
        done = json.loads(path.read_text())
        axes = {name: done["axes"].get(name) for name in grid.axes}
        rows += tidy(grid.name, done["algorithm"], done["kind"], done["repeat"], done["seed"], done["fold"],
                     done["metrics"], **axes, epsilon=done["epsilon"], noise_multiplier=done["noise_multiplier"])
    columns = [*COLUMNS[:6], *grid.axes, *SPENT, *COLUMNS[6:]]
    return pd.DataFrame(rows, columns=columns)


def plot_grid(grid: Grid, frame: pd.DataFrame, root: Path) -> list[Path]:
    """Per axis, the headline metric against it: one line per algorithm (and value of the other
    axes), with 95% error bars; each algorithm's references as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = main_metric(grid.base.implicit, grid.base.top_k)
    data = frame[frame["metric"] == metric]
    made = []
    for axis in grid.axes:
        others = [a for a in grid.axes if a != axis]
        cells = summarize(data[data["side"] == "federated"], by=["algorithm", *others, axis])
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, line in cells.groupby(["algorithm", *others], sort=False):
            key = key if isinstance(key, tuple) else (key,)
            label = ", ".join([f"{key[0]} federated", *(f"{a} {v}" for a, v in zip(others, key[1:]))])
            ax.errorbar(line[axis], line["mean"], yerr=(line["mean"] - line["low"]).fillna(0), marker="o",
                        capsize=3, label=label)
        styles = itertools.cycle(("--", ":", "-."))
        for (algorithm, side), group in data[data["side"] != "federated"].groupby(["algorithm", "side"], sort=False):
            _reference(ax, group, axis, [a for a in grid.axes if group[a].notna().any()], f"{algorithm} {side}",
                       dict(color="gray" if side == "non-private" else "black", linestyle=next(styles)))
        if axis in ("target-epsilon", "noise-multiplier"):
            ax.set_xscale("log", base=2)
        ax.set_xlabel(axis)
        ax.set_ylabel(metric)
        ax.set_title(f"{grid.name}: {metric} against {axis} (95% intervals)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = root / f"{metric.replace('@', '_at_')}_vs_{axis}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)
    return made


def _reference(ax, group: pd.DataFrame, axis: str, follows: list[str], name: str, style: dict) -> None:
    """A reference's mean: a curve where it follows the plotted axis, else a horizontal line (one per
    value of the other axes it follows)."""
    others = [a for a in follows if a != axis]
    if not follows:
        mean = t_interval(group["value"])[0]
        ax.axhline(mean, label=f"{name} ({mean:.4f})", **style)
        return
    points = summarize(group, by=follows)
    for key, line in (points.groupby(others, sort=False) if others else [((), points)]):
        key = key if isinstance(key, tuple) else (key,)
        label = ", ".join([name, *(f"{a} {v}" for a, v in zip(others, key))])
        if axis in follows:
            ax.plot(line[axis], line["mean"], label=label, **style)
        else:
            ax.axhline(float(line["mean"].mean()), label=f"{label} ({float(line['mean'].mean()):.4f})", **style)
