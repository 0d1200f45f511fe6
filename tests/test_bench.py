"""`fedrec bench` (experiments/bench.py): the engine's floor and a cohort case of ML-100K's shape (synthetic
ratings), each in a fresh process through Ray's simulation engine."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedrec.experiments.bench import cases, run_bench
from fedrec.run.build import load_data
from fedrec.run.config import RunConfig

pytestmark = pytest.mark.engine


def test_bench_measures_the_engine_floor_and_a_cohort_case(tmp_path):
    base, lines = RunConfig(out=str(tmp_path / "bench")), []
    report = run_bench(base, rounds=3, one_user_rounds=1, names=("engine-floor", "ml100k-cohorts"), log=lines.append)
    floor = report["engine_floor_seconds_per_round"]
    assert math.isfinite(floor) and 0 < floor < 10
    case = report["cases"]["ml100k-cohorts"]
    assert set(report["cases"]) == {"ml100k-cohorts"}
    assert (case["num_users"], case["rounds"], case["num_nodes"]) == (943, 3, 2)  # ML-100K's users, 2 cohorts
    assert case["users_per_round"] == 943 and case["measured_rounds"] == 1  # round 1 warms up, round 3 evaluates
    for key in ("updates_per_second", "seconds_per_round", "max_seconds_per_round", "end_to_end_seconds",
                "peak_rss_mb", "partition_seconds", "partition_peak_rss_mb", "shard_set_mb"):
        assert math.isfinite(case[key]) and case[key] > 0, key
    assert case["updates_per_second"] == pytest.approx(943 / case["seconds_per_round"])
    assert case["seconds_per_round"] <= case["max_seconds_per_round"] < case["end_to_end_seconds"]
    split = load_data(cases(base, 3, 1)["ml100k-cohorts"])
    mean_rmse = float(np.sqrt(np.mean((split.test.rating - split.train.rating.mean()) ** 2)))
    assert 0 < case["metrics"]["rmse"] < mean_rmse  # it learned: better than predicting the mean rating
    assert report["ml100k_cohort_round_minus_floor_seconds"] == pytest.approx(case["seconds_per_round"] - floor)
    written = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert written == {k: v for k, v in report.items() if k != "run_dir"}
    assert len(lines) == 2  # the floor, then the case
