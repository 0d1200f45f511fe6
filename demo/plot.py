"""The page's plot, drawn on the server as a PNG (no JavaScript, no chart library in the page).

Left: the federation's RMSE (rating runs) or HR@10 (implicit) per round, against the central
run's final value where the run has one beside it (a compare directory). Right, where the
run used DP: the privacy budget epsilon spent over rounds, the run's and this device's.
"""

from __future__ import annotations

import io

import pandas as pd

from .demo import Demo


def metric_history(demo: Demo) -> tuple[str, pd.DataFrame]:
    """(x column, frame with the metric and epsilon per round or epoch) from the run's metrics.csv."""
    try:
        frame = pd.read_csv(demo.paths.run / "metrics.csv")
    except (OSError, ValueError, pd.errors.EmptyDataError):
        frame = pd.DataFrame()
    x = "round" if "round" in frame else "epoch"
    return x, frame


def plot_png(demo: Demo, device_epsilon: list[tuple[int, float]] | None = None, device: str | None = None) -> bytes:
    from matplotlib.figure import Figure  # not pyplot: its global state is not safe across the server's threads
    from matplotlib.ticker import MaxNLocator

    x, frame = metric_history(demo)
    metric = demo.metric
    has_eps = "epsilon" in frame and frame["epsilon"].notna().any() or bool(device_epsilon)
    fig = Figure(figsize=(10 if has_eps else 6, 3.6))
    axes = fig.subplots(1, 2 if has_eps else 1, squeeze=False)
    ax = axes[0][0]
    if metric in frame and frame[metric].notna().any():
        points = frame[[x, metric]].dropna()
        label = "federated" if demo.federated else "central"
        ax.plot(points[x], points[metric], marker="o", color="#1f6f8b", label=label)
    else:
        ax.text(0.5, 0.5, f"no {metric} in this run's metrics.csv", ha="center", va="center", transform=ax.transAxes)
    central = demo.central_value
    if central is not None:
        ax.axhline(central, color="#c0392b", linestyle="--", label=f"central ({central:.4f})")
    ax.set_xlabel(x)
    ax.set_ylabel(metric.upper())
    ax.set_title(f"{metric.upper()} per {x}" + (" (lower is better)" if metric == "rmse" else " (higher is better)"))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    if has_eps:
        ax = axes[0][1]
        if "epsilon" in frame and frame["epsilon"].notna().any():
            points = frame[[x, "epsilon"]].dropna()
            ax.plot(points[x], points["epsilon"], color="#7d3c98", linewidth=4, alpha=0.35,  # shows under the device
                    label="the run's (any user)")
        if device_epsilon:
            rounds, eps = zip(*device_epsilon)
            ax.plot(rounds, eps, marker="o", linestyle="--", color="#d35400", label=f"device {device}'s rounds")
        ax.set_xlabel(x)
        ax.set_ylabel("epsilon")
        ax.set_title("privacy budget spent (epsilon)")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds and epochs are whole
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()
