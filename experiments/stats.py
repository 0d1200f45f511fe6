"""Repeated runs in numbers: the tidy table (one row per run and metric), each group's mean with a
Student-t confidence interval over its repeats, and the paired central-minus-federated difference.

The tidy columns are the same for compare, accuracy, privacy-sweep and experiment grids, so that one
`pandas.read_csv` and one `groupby` read any of them."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd

COLUMNS = ["experiment", "algorithm", "side", "repeat", "seed", "fold", "metric", "value"]
CONFIDENCE = 0.95
SPENT = ["epsilon", "noise_multiplier"]  # what a DP run spent: outcomes, like the value, not settings to group by


def tidy(experiment: str, algorithm: str, side: str, repeat: int, seed: int, fold: str, metrics: dict,
         **extra) -> list[dict]:
    """One row per metric of one run; `extra` columns (a grid cell's settings) go in front of `metric`."""
    base = {"experiment": experiment, "algorithm": algorithm, "side": side, "repeat": repeat, "seed": seed,
            "fold": fold, **extra}
    return [base | {"metric": name, "value": float(value)} for name, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)]


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean over independent repeats. One value has
    no spread to estimate: its interval is (nan, nan), never a made-up zero width."""
    from scipy import stats

    data = [float(v) for v in values]
    n = len(data)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(data) / n
    if n == 1:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in data) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def summarize(frame: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Mean, 95% interval and count of `value` per group (default: every column but what differs
    between repeats, and the epsilon a DP run spent, an outcome like the value), one row per group,
    in first-seen order."""
    by = by or [c for c in frame.columns if c not in ("repeat", "seed", "fold", "value", *SPENT)]
    rows = []
    for key, group in frame.groupby(by, sort=False, dropna=False):
        mean, low, high = t_interval(group["value"])
        rows.append(dict(zip(by, key if isinstance(key, tuple) else (key,))) |
                    {"mean": mean, "low": low, "high": high, "n": len(group)})
    return pd.DataFrame(rows, columns=[*by, "mean", "low", "high", "n"])


def paired_difference(frame: pd.DataFrame, first: str = "central", second: str = "federated") -> pd.DataFrame:
    """Per metric, `first` minus `second` of the same repeat (same seed and fold), and the interval of
    those differences: pairing removes what the two sides share (the split, the seed's draw)."""
    keys = [c for c in frame.columns if c not in ("side", "value")]
    a = frame[frame["side"] == first].set_index(keys)["value"]
    b = frame[frame["side"] == second].set_index(keys)["value"]
    both = pd.DataFrame({"a": a, "b": b}).dropna().reset_index()
    both["value"] = both["a"] - both["b"]
    both["side"] = f"{first} - {second}"
    return summarize(both[[c for c in frame.columns]])


def interval_text(mean: float, low: float, high: float, digits: int = 4) -> str:
    """'0.9123 ± 0.0041' (a symmetric t-interval as its half-width), or the mean alone for one run."""
    half = (high - low) / 2
    tiny = 0 < max(abs(mean), 0 if math.isnan(half) else half) < 5 * 10 ** -(digits + 1)  # would print as 0.0000
    number = f".{digits - 2}e" if tiny else f".{digits}f"
    return f"{mean:{number}}" if math.isnan(low) else f"{mean:{number}} ± {half:{number}}"
