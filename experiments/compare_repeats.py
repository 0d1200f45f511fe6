"""`fedrec compare --repeats N`: N central-vs-federated pairs (experiments/repeats.py says how repeats
differ), each in OUT/repeat-<i>/{central,federated}, and over them: results.csv (one row per run and
metric), summary.json and comparison.md (mean and 95% interval per side, and the paired
central-minus-federated difference), comparison.png (the federated curve with error bars per round,
central's mean and interval as a band)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from fedrec.run.config import RunConfig
from fedrec.run.rundir import dp_label, main_metric, make_run_dir, write_json

from .compare import model_title
from .repeats import Repeat, one_torch_thread, repeats
from .stats import COLUMNS, CONFIDENCE, interval_text, paired_difference, summarize, t_interval, tidy


def run_compare_repeats(cfg: RunConfig, count: int, central_fn, federated_fn, on_repeat=None) -> dict:
    """`central_fn(cfg)` and `federated_fn(cfg)` run one side into cfg.out (as for run_compare);
    `on_repeat(repeat)` is told as each repeat starts."""
    cfg = dataclasses.replace(cfg, model=cfg.resolved().model)  # --model auto decided once, for every repeat
    run_dir = make_run_dir(cfg, "compare")
    rows, curves, runs = [], [], []
    with one_torch_thread():  # both sides: see repeats.one_torch_thread
        for rep in repeats(cfg, count):
            if on_repeat:
                on_repeat(rep)
            where = run_dir / f"repeat-{rep.index}"
            central = central_fn(dataclasses.replace(rep.cfg, out=str(where / "central")))
            federated = federated_fn(dataclasses.replace(rep.cfg, out=str(where / "federated")))
            for side, outcome in (("central", central), ("federated", federated)):
                rows += tidy("compare", cfg.model, side, rep.index, rep.seed, rep.fold, outcome.summary["metrics"])
            curves += [{"repeat": rep.index, **row} for row in federated.history]
            runs.append({"repeat": rep.index, "seed": rep.seed, "fold": rep.fold,
                         "dir": str(where.relative_to(run_dir)), "privacy": federated.summary["privacy"]})
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame.to_csv(run_dir / "results.csv", index=False)
    intervals, difference = summarize(frame), paired_difference(frame)
    report = {"repeats": count, "confidence": CONFIDENCE, "model": cfg.model, "runs": runs,
              "intervals": intervals.to_dict("records"), "difference": difference.to_dict("records")}
    write_json(run_dir / "summary.json", report)
    (run_dir / "comparison.md").write_text("\n".join(comparison_lines(cfg, runs, intervals, difference)) + "\n")
    metric = main_metric(cfg.implicit, cfg.top_k)
    central_values = frame[(frame.side == "central") & (frame.metric == metric)]["value"]
    plot_curves(pd.DataFrame(curves), metric, t_interval(central_values), run_dir / "comparison.png",
                f"{cfg.dataset}: federated {metric} per round vs central, {count} repeats (95% intervals)")
    return report | {"run_dir": run_dir, "frame": frame, "intervals_frame": intervals, "difference_frame": difference}


def interval_table(intervals: pd.DataFrame, difference: pd.DataFrame) -> dict[str, dict[str, str]]:
    """side -> metric -> 'mean ± half-width': what the console table and comparison.md show."""
    table: dict[str, dict[str, str]] = {}
    for frame in (intervals, difference):
        for r in frame.itertuples():
            table.setdefault(r.side, {})[r.metric] = interval_text(r.mean, r.low, r.high)
    return table


def comparison_lines(cfg: RunConfig, runs: list[dict], intervals: pd.DataFrame, difference: pd.DataFrame) -> list[str]:
    folds = sorted({r["fold"] for r in runs})
    seeds = [r["seed"] for r in runs]
    lines = [f"# Central vs federated: {cfg.dataset}, {len(runs)} repeats", "",
             f"Model: {model_title(cfg.model)} ({cfg.model_reason()}).",
             f"Repeats: seeds {seeds[0]}..{seeds[-1]}, split{'s' if len(folds) > 1 else ''} {', '.join(folds)} "
             "(each repeat's central and federated runs share their seed and split: the difference is paired).",
             f"Each cell: mean ± half-width of the {CONFIDENCE:.0%} Student-t interval over the repeats. "
             "results.csv holds every run's value.", ""]
    table = interval_table(intervals, difference)
    paired = "central - federated"
    metrics = [m for m in dict.fromkeys(intervals["metric"]) if m in table.get(paired, {})]
    lines += [f"| metric | central | federated | {paired} (paired) |", "|---|---|---|---|"]
    lines += [f"| {m} | {table['central'][m]} | {table['federated'][m]} | {table[paired][m]} |" for m in metrics]
    labels = list(dict.fromkeys(dp_label(r["privacy"]) for r in runs))
    if any(labels):
        lines += ["", f"Federated runs' privacy, each: {'; '.join(labels)}. The repeats train on the same users' "
                      f"data: together they release {len(runs)} models, whose privacy losses compose (at most the "
                      "sum of the epsilons). The central side is the non-private baseline: not covered by any "
                      "epsilon."]
    return lines + ["", "Plot: comparison.png. Each repeat's runs: repeat-<i>/central, repeat-<i>/federated."]


def plot_curves(curves: pd.DataFrame, metric: str, reference: tuple[float, float, float], path: Path,
                title: str) -> None:
    """The federated metric per round, mean and interval over repeats; the central mean and its band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if metric in curves:
        points = summarize(curves.dropna(subset=[metric]).rename(columns={metric: "value"})[["round", "value"]],
                           by=["round"])
        err = (points["mean"] - points["low"]).fillna(0)
        ax.errorbar(points["round"], points["mean"], yerr=err, marker="o", markersize=3, capsize=3, label="federated")
    mean, low, high = reference
    ax.axhline(mean, color="black", linestyle="--", label=f"central ({interval_text(mean, low, high)})")
    if low == low:  # an interval (one repeat has none)
        ax.axhspan(low, high, color="gray", alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def describe_repeat(rep: Repeat) -> str:
    return f"repeat {rep.index}: seed {rep.seed}, split {rep.fold}"
