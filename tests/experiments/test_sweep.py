"""`fedrec privacy-sweep` (experiments/sweep.py) on a tiny synthetic federation: the central and the
non-private federated references, then per target epsilon a central-DP run through Ray's simulation
engine and the audit of its updates."""

from __future__ import annotations

import json
import math

import pytest

from fedrec.experiments.sweep import run_sweep
from fedrec.run.config import RunConfig

pytestmark = pytest.mark.engine  # the sweep's federated runs go through Ray's simulation engine


def test_privacy_sweep_reports_accuracy_epsilon_and_audit_per_target(tmp_path):
    cfg = RunConfig(synthetic_users=60, synthetic_items=30, synthetic_density=0.25, dim=4, rounds=3, epochs=3,
                    eval_every=3, clipping_norm=0.5, out=str(tmp_path / "sweep"))
    lines = []
    report = run_sweep(cfg, [4.0], targets=5, log=lines.append)
    assert report["metric"] == "rmse" and report["clipping_norm"] == 0.5
    assert report["run_dir"] == str(tmp_path / "sweep")
    for reference in (report["central"], report["non_private"]):
        assert 0 < reference["rmse"] < 2  # ratings 1 to 5: trained, not diverged
    (row,) = report["results"]
    assert row["target_epsilon"] == 4.0 and row["rounds"] == 3 and row["delta"] == cfg.target_delta
    assert 0 < row["epsilon"] <= 4.0 + 1e-3  # calibrated to the target
    assert math.isfinite(row["noise_multiplier"]) and row["noise_multiplier"] > 0
    assert math.isfinite(row["rmse"]) and row["rmse"] > 0
    assert 0 <= row["auc"] <= 1 and 0 <= row["prior_auc"] <= 1
    assert 0 <= row["epsilon_lower"] <= row["epsilon"]  # an empirical lower bound above the accountant's is a bug
    written = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert written == {k: v for k, v in report.items() if k != "run_dir"}
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    assert len(lines) == 3  # central, non-private federated, one line per epsilon
