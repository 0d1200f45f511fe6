"""The accuracy benchmark's bookkeeping (its runs themselves go through the engine)."""

from __future__ import annotations

from types import SimpleNamespace

from fedrec.experiments import accuracy
from fedrec.run.config import RunConfig


def test_the_federated_curve_follows_the_runs_own_top_k(monkeypatch):
    rows = [{"round": 1, "train_loss": 0.5, "seconds": 0.25}, {"round": 2, "hr@5": 0.2, "ndcg@5": 0.1, "seconds": 0.75}]
    outcome = SimpleNamespace(history=rows, summary={"metrics": rows[-1], "num_nodes": 2}, wall_seconds=1.0)
    monkeypatch.setattr(accuracy, "simulate", lambda cfg: outcome)
    case = accuracy._fed(RunConfig(split="loo", top_k=5), users_per_node=0, log=lambda line: None)
    assert case["curve"] == [{"round": 2, "hr@5": 0.2}]
    assert case["mean_round_seconds"] == 0.5  # what the PFedRec speed comparison reads


def test_fold_means_cover_every_fold_and_only_peers_that_ran_on_all(monkeypatch):
    rmse = {"u1": 0.9, "u2": 0.8, "u3": 0.85, "u4": 0.95, "u5": 1.0}
    monkeypatch.setattr(accuracy, "_central", lambda cfg, log: {"metrics": {"rmse": rmse[cfg.split]}})
    monkeypatch.setattr(accuracy, "_fed", lambda cfg, n, log: {"metrics": {"rmse": rmse[cfg.split] + 0.01}})
    peers = {"SVD": lambda s: {"rmse": rmse[s] + 0.05},
             "SVD++": lambda s: {"skipped": "x"} if s == "u3" else {"rmse": 1.0}}
    monkeypatch.setattr(accuracy, "_peers", lambda cfg, log: {k: f(cfg.split) for k, f in peers.items()})
    result = accuracy._folds(RunConfig(dataset="ml-100k"), 0, log=lambda line: None)
    assert sorted(result["folds"]) == ["u1", "u2", "u3", "u4", "u5"]
    assert result["mean_rmse"]["central"] == sum(rmse.values()) / 5
    assert abs(result["mean_rmse"]["federated"] - (sum(rmse.values()) / 5 + 0.01)) < 1e-12
    assert abs(result["mean_rmse"]["peer SVD"] - (sum(rmse.values()) / 5 + 0.05)) < 1e-12
    assert "peer SVD++" not in result["mean_rmse"]  # a mean over four folds would not be comparable


def test_the_tuned_case_runs_federated_with_the_chosen_settings_and_compares_to_the_best_peer(monkeypatch, tmp_path):
    from fedrec.experiments import tune as tune_module

    seen = {}

    def fake_tune(cfg, budget, run_dir=None, sides=()):
        assert run_dir.is_dir()  # tune writes its files into it
        seen["tune"] = (budget.trials, sides, cfg.validation)
        return {"chosen": {"federated": {**tune_module.defaults(cfg), "dim": 20, "bpmf_alpha": 2.0, "rounds": 7}}}

    monkeypatch.setattr(tune_module, "tune", fake_tune)
    monkeypatch.setattr(accuracy, "_peers", lambda cfg, log: {"SVD": {"rmse": 0.95}, "SVD++": {"rmse": 0.93},
                                                              "KNN": {"skipped": "no"}})
    monkeypatch.setattr(accuracy, "_fed", lambda cfg, n, log: (seen.setdefault("fed", cfg),
                                                               {"metrics": {"rmse": 0.931}})[1])
    case = accuracy._tuned(RunConfig(dataset="ml-100k", split="u1"), 5, tmp_path, 0, log=lambda line: None)
    assert seen["tune"] == (5, ("federated",), False)  # tune itself turns validation on for its trials
    # --model auto runs BPMF on u1, so its settings are the ones tuned
    assert (seen["fed"].dim, seen["fed"].bpmf_alpha, seen["fed"].rounds, seen["fed"].validation) == (20, 2.0, 7, False)
    assert case["best_peer_rmse"] == 0.93 and case["no_worse_than_best_peer"] is False


def test_central_runs_and_peers_go_beside_the_federated_runs_and_report_the_same(monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    threads = {"central": set(), "federated": set()}

    def central(cfg, log):
        threads["central"].add(threading.current_thread().name)
        return {"metrics": {"rmse": int(cfg.split[1]) / 10}}

    def federated(cfg, n, log):
        threads["federated"].add(threading.current_thread().name)
        return {"metrics": {"rmse": int(cfg.split[1]) / 10 + 0.01}}

    monkeypatch.setattr(accuracy, "_central", central)
    monkeypatch.setattr(accuracy, "_fed", federated)
    monkeypatch.setattr(accuracy, "_peers", lambda cfg, log: {"SVD": {"rmse": 1.0}})
    alone = accuracy._folds(RunConfig(dataset="ml-100k"), 0, log=lambda line: None)
    assert threads["central"] == threads["federated"] == {threading.main_thread().name}  # the control
    threads["central"].clear()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="aside") as aside:
        beside = accuracy._folds(RunConfig(dataset="ml-100k"), 0, log=lambda line: None, aside=aside)
    assert beside == alone
    assert threads["federated"] == {threading.main_thread().name}  # Ctrl-C handling needs the main thread
    assert all(name.startswith("aside") for name in threads["central"])
