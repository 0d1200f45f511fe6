"""`fedrec robustness` (experiments/robustness.py) on a tiny synthetic federation, in process: dropouts
cost a finite, bounded share of the updates, and a run stopped half-way and resumed on fresh devices
ends exactly where the clean run does. (The poisoning case is audit/poisoning.py's, tested there.)"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from fedrec.experiments.robustness import run_robustness, same_model


def test_robustness_reports_dropouts_and_an_identical_resume(small_cfg, tmp_path):
    cfg = dataclasses.replace(small_cfg, rounds=4, eval_every=2)
    lines = []
    report = run_robustness(cfg, dropout=0.3, poisoning=False, log=lines.append)
    assert report["metric"] == "rmse" and set(report["cases"]) == {"dropout", "resume"}
    dropout = report["cases"]["dropout"]
    assert dropout["dropout"] == 0.3 and 0 < dropout["clean"] <= 4 and 0 < dropout["rmse"] <= 4
    assert math.isfinite(dropout["relative_change"])
    assert dropout["relative_change"] == dropout["rmse"] / dropout["clean"] - 1
    assert 0.1 < dropout["users_failed_share"] < 0.6  # each sampled device fails with probability 0.3
    assert 0 <= dropout["rounds_skipped"] < cfg.rounds
    resume = report["cases"]["resume"]
    assert resume["stopped_after"] == cfg.rounds // 2 and resume["status_before"] == "interrupted"
    assert resume["identical"] is True and resume["rmse"] == dropout["clean"]
    written = json.loads((tmp_path / "run" / "robustness.json").read_text())
    assert written["cases"] == report["cases"] and report["run_dir"] == str(tmp_path / "run")
    assert any(line.startswith("clean: rmse") for line in lines)


def test_a_model_that_differs_in_one_value_is_not_the_same():
    model = {"item-emb": np.zeros((3, 2), np.float32), "item-bias": np.zeros(3, np.float32)}
    assert same_model(model, {k: v.copy() for k, v in model.items()})
    assert not same_model(model, {**model, "item-bias": np.array([0, 0, 1e-7], np.float32)})
    assert not same_model(model, {"item-emb": model["item-emb"]})
