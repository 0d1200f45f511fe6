"""A run directory: resolved config, per-step metrics CSV, summary.json, plot, audit."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from .config import ConfigError, RunConfig

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
    try:
        if path.is_dir() and any(path.iterdir()) and not resuming:
            finished = [name for name in FINISHED if (path / name).exists()]
            what = f"a run ({', '.join(finished)})" if finished else "files"
            hint = f", or continue it with fedrec simulate --resume {path}" if mode == "federated" else ""
            raise ConfigError(f"--out {path} already holds {what}; choose a new directory (results are never "
                              f"mixed){hint}")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".fedrec-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"--out {path} cannot be written ({error.strerror}); choose another directory") from None
    return path.resolve()


def remove_if_empty(path: Path, keep: Path | None = None) -> None:
    """Remove a run directory that a failed run left empty, and its empty parents up to `keep`."""
    for folder in (path, *path.parents):
        if folder == keep or not folder.is_dir() or any(folder.iterdir()):
            return
        folder.rmdir()


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    tmp.replace(path)  # readers never see a half-written file


def write_config(directory: Path, cfg: RunConfig) -> None:
    """The settings that define the experiment: `--config` of this file repeats it into a new
    directory from anywhere (no `out` or `resume`; `data-dir` absolute)."""
    lines = ["# Resolved fedrec run config: pass it back with --config to repeat the run.", "[tool.flwr.app.config]"]
    values = cfg.resolved().to_dict()
    values["data-dir"] = str(Path(cfg.data_dir).expanduser().resolve()) if cfg.data_dir else ""
    for key, value in values.items():
        if key not in ("out", "resume"):
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
