"""A run directory: resolved config, per-step metrics CSV, summary.json, plot, audit.

RunWriter writes the files central and federated runs share, under the same names; what
only one kind writes (a federated run's audit.jsonl and checkpoints) stays with it.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError, RunConfig

if TYPE_CHECKING:  # imported where used: the command line makes run directories without loading torch or pandas
    import pandas as pd


# Files whose presence means a run was written here.
FINISHED = ("summary.json", "metrics.csv", "config.toml")


def make_run_dir(cfg: RunConfig, mode: str) -> Path:
    """The run directory, created and proven writable before any work (an unwritable --out must not
    cost a finished run). A directory that already holds files is refused, except by --resume of
    it: old and new results are never mixed. Calling it again for the same, still empty, directory
    (the CLI checks first, the runner later) is harmless."""
    if cfg.out or cfg.resume:
        path = Path(cfg.out or cfg.resume).expanduser()
    else:  # runs/<mode>-<time>, with a suffix when two runs start in the same second
        stamp = Path("runs") / f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = next(p for p in (Path(f"{stamp}{s}") for s in ("", *(f"-{i}" for i in range(2, 10**6))))
                    if not p.exists())
    if cfg.resume and not Path(cfg.resume).expanduser().is_dir():
        raise ConfigError(f"--resume {cfg.resume}: no such run directory")
    resuming = bool(cfg.resume) and path.resolve() == Path(cfg.resume).expanduser().resolve()
    made = next((p for p in reversed((path, *path.parents)) if not p.exists()), None)  # the first folder made here
    probe = path / ".fedrec-write-check"
    try:
        if path.is_dir() and any(path.iterdir()) and not resuming:
            finished = [name for name in FINISHED if (path / name).exists()]
            what = f"a run ({', '.join(finished)})" if finished else "files"
            hint = f", or continue it with fedrec simulate --resume {path}" if mode == "federated" else ""
            raise ConfigError(f"--out {path} already holds {what}; choose a new directory (results are never "
                              f"mixed){hint}")
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except BaseException as error:  # refused, unwritable or interrupted (Ctrl-C): nothing made here stays
        if made is not None and path.is_dir():
            probe.unlink(missing_ok=True)
            remove_if_empty(path, keep=made.parent)
        if isinstance(error, OSError):
            raise ConfigError(f"--out {path} cannot be written ({error.strerror}); choose another directory") from None
        raise
    return path.resolve()


def remove_if_empty(path: Path, keep: Path | None = None) -> None:
    """Remove the empty directories a failed or interrupted run left: inside its run directory (e.g.
    compare's central/ and federated/), the run directory if that left it empty, and its empty
    parents up to `keep`. Directories holding any file stay."""
    for inside, _, _ in sorted(os.walk(path), key=lambda entry: -len(Path(entry[0]).parts)):  # deepest first
        if Path(inside) != path and not any(Path(inside).iterdir()):
            Path(inside).rmdir()
    for folder in (path, *path.parents):
        if folder == keep or not folder.is_dir() or any(folder.iterdir()):
            return
        folder.rmdir()


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    tmp.replace(path)  # readers never see a half-written file


def write_config(directory: Path, cfg: RunConfig, name: str = "config.toml") -> None:
    """The settings that define the experiment: `--config` of this file repeats it into a new
    directory from anywhere (no `out` or `resume`; `data-dir` absolute). Flat `key = value` lines,
    which `flwr run APP CONNECTION --run-config FILE` reads too (it flattens tables into dotted keys)."""
    lines = ["# Resolved fedrec run config: repeat the run with `fedrec <command> --config FILE`",
             "# or `flwr run . CONNECTION --run-config FILE`."]
    values = cfg.resolved().to_dict()
    values["data-dir"] = str(Path(cfg.data_dir).expanduser().resolve()) if cfg.data_dir else ""
    for key, value in values.items():
        if key not in ("out", "resume"):
            lines.append(f"{key} = {json.dumps(value)}")
    (directory / name).write_text("\n".join(lines) + "\n")


def write_history(directory: Path, rows: list[dict], name: str = "metrics.csv") -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame.to_csv(directory / name, index=False)
    return frame


def plot_metric(frame: pd.DataFrame, x: str, metric: str, path: Path, title: str,
                reference: float | None = None, reference_label: str = "central") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    data = frame.dropna(subset=[metric]) if metric in frame else frame.iloc[0:0]
    if len(data):
        ax.plot(data[x], data[metric], marker="o", markersize=3, label="federated" if reference is not None else metric)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", label=f"{reference_label} ({reference:.4f})")
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dp_label(privacy: dict) -> str:
    """'ε=7.99, δ=1e-05, z=1.234' for a DP run's privacy summary; '' for any other run."""
    if "epsilon" not in privacy:
        return ""
    return f"ε={privacy['epsilon']:.3g}, δ={privacy['delta']:g}, z={privacy['noise_multiplier']:.4g}"


def main_metric(implicit: bool, k: int) -> str:
    return f"hr@{k}" if implicit else "rmse"


def metric_columns(implicit: bool, top_k: int, validation_item: bool = False) -> list[str]:
    """The evaluation metrics a run reports, in the order finish() gives them."""
    from fedrec.models.metrics import SUM_KEYS, VALIDATION, finish

    names = list(finish({k: 1.0 for k in SUM_KEYS}, top_k))
    return [n for n in names
            if (n in ("rmse", "mae")) != implicit and (validation_item or not n.startswith(VALIDATION))]


class RunWriter:
    """The files of a central or a federated run's directory: config.toml, metrics.csv (one row
    per evaluated epoch or per round), summary.json, model.npz and a plot of the headline metric.
    It writes what it is given: what a DP run may release is decided before (server/releases.py)."""

    def __init__(self, path: Path, cfg: RunConfig, mode: str):
        self.path, self.cfg, self.mode = Path(path), cfg, mode
        self.columns: list[str] = []

    @classmethod
    def create(cls, cfg: RunConfig, mode: str) -> RunWriter:
        """A writer for a new directory (make_run_dir: refused if it holds files, proven writable)."""
        return cls(make_run_dir(cfg, mode), cfg, mode)

    def write_config(self) -> None:
        write_config(self.path, self.cfg)

    def start_metrics(self, columns: list[str], rows: Iterable[dict] = ()) -> None:
        """metrics.csv afresh: the header and the rows so far (a resumed run's, from its checkpoint).
        Keys outside `columns` are left out; a missing value is an empty cell."""
        self.columns = columns
        with open(self.path / "metrics.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def add_metrics(self, row: dict) -> None:
        """One more row, flushed at once, so that `tail -f metrics.csv` shows a run's progress."""
        with open(self.path / "metrics.csv", "a", newline="") as handle:
            csv.DictWriter(handle, self.columns, extrasaction="ignore").writerow(row)

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / "summary.json", summary)

    def write_results(self, model: dict, step: str, catalogue: tuple | None = None, label: str = "") -> None:
        """The model (with the public item `catalogue`, (ids, titles), where known), and the
        headline metric per `step` ("epoch" or "round") plotted from metrics.csv; `label` (a DP
        run's epsilon, delta and z: dp_label) goes into the plot's title."""
        import pandas as pd

        from fedrec.models.saved import save_model

        save_model(self.path, model, *(catalogue or (None, None)))
        metric = main_metric(self.cfg.implicit, self.cfg.top_k)
        frame = pd.read_csv(self.path / "metrics.csv")
        title = f"{self.mode} {self.cfg.dataset} {self.cfg.split}: {metric} per {step}"
        plot_metric(frame, step, metric, self.path / f"{metric.replace('@', '_at_')}.png",
                    f"{title}\n{label}" if label else title)
