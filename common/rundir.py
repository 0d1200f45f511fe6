"""A run directory: resolved config, per-step metrics CSV, summary.json, plot, audit."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from .config import RunConfig


def make_run_dir(cfg: RunConfig, mode: str) -> Path:
    path = Path(cfg.out) if cfg.out else Path("runs") / f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    tmp.replace(path)  # readers never see a half-written file


def write_config(directory: Path, cfg: RunConfig) -> None:
    lines = ["# Resolved fedrec run config: pass it back with --config to repeat the run.", "[tool.flwr.app.config]"]
    for key, value in cfg.resolved().to_dict().items():
        lines.append(f"{key} = {json.dumps(value)}")
    (directory / "config.toml").write_text("\n".join(lines) + "\n")


def write_history(directory: Path, rows: list[dict], name: str = "metrics.csv") -> pd.DataFrame:
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


def main_metric(implicit: bool, k: int) -> str:
    return f"hr@{k}" if implicit else "rmse"
