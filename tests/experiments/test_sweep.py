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


def test_privacy_sweep_across_algorithms_reports_both_epsilons_and_references(tmp_path):
    """--models mf,dpstats: one table of rows per algorithm, each run with what it admits (dpstats: every user,
    its own clipping bound), both epsilons, the canary bound where the item-inference attackers do not apply,
    and the references (non-private federated and central per algorithm, device-only) in the JSON and CSV."""
    cfg = RunConfig(synthetic_users=60, synthetic_items=30, synthetic_density=0.25, dim=4, rounds=3, epochs=3,
                    eval_every=3, clipping_norm=0.5, users_per_round=30, sampling="poisson", accountant="rdp",
                    out=str(tmp_path / "sweep"))
    report = run_sweep(cfg, [4.0], targets=5, log=lambda line: None, models=["mf", "dpstats"])
    mf, dpstats = report["results"]
    assert (mf["model"], dpstats["model"]) == ("mf", "dpstats")
    assert mf["epsilon_against_server"] is None and mf["auc"] is not None  # central DP: the server adds the noise
    assert dpstats["rounds"] == 2 and 0 < dpstats["epsilon"] <= 4.0 + 1e-3 and dpstats["auc"] is None
    assert 0 <= dpstats["epsilon_lower"] <= dpstats["epsilon"]
    assert set(report["references"]) == {"mf", "dpstats"} and 0 < report["device_only"] < 2
    assert (tmp_path / "sweep" / "sweep.csv").read_text().count("\n") == 3
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
