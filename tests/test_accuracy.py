"""The accuracy benchmark's bookkeeping (its runs themselves go through the engine)."""

from __future__ import annotations

from types import SimpleNamespace

from fedrec.run.config import RunConfig
from fedrec.simulations import accuracy


def test_the_federated_curve_follows_the_runs_own_top_k(monkeypatch):
    rows = [{"round": 1, "train_loss": 0.5}, {"round": 2, "hr@5": 0.2, "ndcg@5": 0.1}]
    outcome = SimpleNamespace(history=rows, summary={"metrics": rows[-1], "num_nodes": 2}, wall_seconds=1.0)
    monkeypatch.setattr(accuracy, "simulate", lambda cfg: outcome)
    case = accuracy._fed(RunConfig(split="loo", top_k=5), users_per_node=0, log=lambda line: None)
    assert case["curve"] == [{"round": 2, "hr@5": 0.2}]
