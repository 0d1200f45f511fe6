"""`fedrec secagg-bench` (experiments/secagg_bench.py) on a tiny synthetic federation: in process and on
Ray's simulation engine, plain and SecAgg+ side by side. Its loopback-deployment cases are left out: one
ClientApp process per message makes a SecAgg+ round there take a minute (tests/deploy/test_deploy.py covers the
loopback federation)."""

from __future__ import annotations

import json
import math

import pytest

from fedrec.experiments.secagg_bench import run_secagg_bench
from fedrec.run.config import RunConfig

pytestmark = pytest.mark.engine  # Ray's simulation engine


def _finite_positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_secagg_bench_times_plain_and_secure_rounds_in_process_and_on_ray(tmp_path):
    cfg = RunConfig(synthetic_users=60, synthetic_items=30, synthetic_density=0.2, dim=4, users_per_node=20,
                    out=str(tmp_path / "bench"))
    lines = []
    report = run_secagg_bench(cfg, inprocess_nodes=[3], deploy_nodes=[], rounds=3, log=lines.append)
    assert report["rounds"] == 3 and report["deployment"] == {} and report["run_dir"] == str(tmp_path / "bench")
    inprocess = report["inprocess"]["3"]
    assert set(inprocess) == {"plain", "secagg+"}
    for row in inprocess.values():
        assert all(_finite_positive(row[k]) for k in ("seconds_per_round", "wall_seconds", "device_step_seconds",
                                                      "bytes_up_per_device_round", "bytes_down_per_device_round"))
        assert row["device_step_seconds"] < row["wall_seconds"]
    # a SecAgg+ device sends its masked vector and the protocol's keys and shares: more than a plain one
    assert inprocess["secagg+"]["bytes_up_per_device_round"] > inprocess["plain"]["bytes_up_per_device_round"]
    ray = report["ray_cohorts"]  # rounds after the first that did not evaluate: round 2
    assert set(ray) == {"plain", "secagg+"} and ray["plain"]["nodes"] == ray["secagg+"]["nodes"] == 3
    assert all(_finite_positive(row["seconds_per_round"]) and row["seconds_per_round"] < row["wall_seconds"]
               for row in ray.values())
    written = json.loads((tmp_path / "bench" / "secagg_bench.json").read_text())
    assert written == {k: v for k, v in report.items() if k != "run_dir"}
    assert len(lines) == 2 + 2  # one line per case
