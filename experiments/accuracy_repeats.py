"""`fedrec accuracy --repeats N`: the whole benchmark N times with seeds seed, seed+1, ... (its ML-100K
case already covers the folds u1..u5), the federations in this process (experiments/repeats.py).
Writes results.csv (one row per run and metric: central, federated and the Surprise peers),
accuracy.json (each repeat's report, each case's mean and 95% interval, the paired
central-minus-federated difference) and accuracy.png (each case's headline metric with error bars)."""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
from pathlib import Path

import pandas as pd

from fedrec.run.config import RunConfig
from fedrec.run.rundir import make_run_dir, write_json

from . import accuracy
from .repeats import Repeat, federate_in_session, one_torch_thread, repeats
from .stats import COLUMNS, CONFIDENCE, interval_text, paired_difference, summarize, tidy


def run_accuracy_repeats(cfg: RunConfig, count: int, users_per_node: int = 0, log=print) -> dict:
    run_dir = make_run_dir(cfg, "accuracy")
    rows, reports = [], []
    # the federations' run directories are scratch; central runs get one torch thread too (repeats.one_torch_thread)
    with tempfile.TemporaryDirectory(prefix="fedrec-accuracy-") as scratch, one_torch_thread():
        numbers = itertools.count()
        token = accuracy._FEDERATE.set(
            lambda c: federate_in_session(dataclasses.replace(c, out=str(Path(scratch) / f"run-{next(numbers)}"))))
        try:
            for rep in repeats(cfg, count):
                log(f"repeat {rep.index}/{count}: seed {rep.seed}")
                report = accuracy._suite(rep.cfg, users_per_node, log, 0, run_dir)
                reports.append(report)
                rows += case_rows(report, rep)
        finally:
            accuracy._FEDERATE.reset(token)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame.to_csv(run_dir / "results.csv", index=False)
    intervals, difference = summarize(frame), paired_difference(frame)
    out = {"repeats": count, "confidence": CONFIDENCE, "seeds": [cfg.seed + r for r in range(count)],
           "users_per_node": users_per_node, "intervals": intervals.to_dict("records"),
           "difference": difference.to_dict("records"), "runs": reports}
    write_json(run_dir / "accuracy.json", out)
    plot_cases(intervals, run_dir / "accuracy.png", count)
    return out | {"run_dir": str(run_dir), "intervals_frame": intervals, "difference_frame": difference}


def _split_of(case: str) -> str:
    return "loo" if "loo" in case else "u1" if case.startswith("ml100k-u1-") else "random"


def case_rows(report: dict, rep: Repeat) -> list[dict]:
    """Tidy rows of one repeat's report: experiment = the case, fold = the split it ran on."""
    rows = []
    for name, case in report["cases"].items():
        if name == "ml100k-u1":  # the u1 fold of ml100k-u1-u5 again
            continue
        runs = case["folds"].items() if name == "ml100k-u1-u5" else [(_split_of(name), case)]
        for fold, run in runs:
            model = run["central"]["model"]
            for side in ("central", "federated"):
                rows += tidy(name, model, side, rep.index, rep.seed, fold, run[side]["metrics"])
            for peer, result in run.get("peers", {}).items():
                if "rmse" in result:
                    rows += tidy(name, peer, "peer", rep.index, rep.seed, fold,
                                 {"rmse": result["rmse"], "mae": result["mae"]})
    return rows


def headline(metrics) -> str | None:
    return "rmse" if "rmse" in set(metrics) else next((m for m in metrics if m.startswith("hr@")), None)


def plot_cases(intervals: pd.DataFrame, path: Path, count: int) -> None:
    """Per case, its headline metric (RMSE, or HR@k on leave-one-out) for each side, with error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(intervals["experiment"]))
    fig, axes = plt.subplots(1, len(cases), figsize=(3 * len(cases), 3.6), squeeze=False)
    for ax, case in zip(axes[0], cases):
        rows = intervals[intervals["experiment"] == case]
        metric = headline(rows["metric"])
        rows = rows[rows["metric"] == metric]
        labels = [s if s != "peer" else a for s, a in zip(rows["side"], rows["algorithm"])]
        err = (rows["mean"] - rows["low"]).fillna(0)
        ax.bar(range(len(rows)), rows["mean"], yerr=err, capsize=4, color="tab:blue", alpha=0.7)
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
        low = float((rows["low"].fillna(rows["mean"])).min())
        ax.set_ylim(low * 0.97, float(rows["high"].fillna(rows["mean"]).max()) * 1.02)
        ax.set_title(f"{case}\n{metric}", fontsize=8)
    fig.suptitle(f"fedrec accuracy: mean and 95% interval over {count} repeats", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table_rows(intervals: pd.DataFrame, difference: pd.DataFrame) -> dict[str, dict[str, str]]:
    """'case side' -> metric -> 'mean ± half-width', for the console table."""
    rows: dict[str, dict[str, str]] = {}
    for frame in (intervals, difference):
        for r in frame.itertuples():
            if r.metric == "train_loss":
                continue
            who = r.algorithm if r.side == "peer" else r.side
            rows.setdefault(f"{r.experiment} {who}", {})[r.metric] = interval_text(r.mean, r.low, r.high)
    return rows
