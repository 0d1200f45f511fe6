"""Peer baselines (simulations/peers.py): Surprise fitted on exactly a split's training rows."""

import builtins
import dataclasses

import numpy as np
import pytest

from fedrec.experiments.peers import INSTALL_HINT, PEERS, peer_results
from fedrec.run.build import load_data
from fedrec.run.config import RunConfig

pytest.importorskip("surprise", reason=INSTALL_HINT)


@pytest.fixture(scope="module")
def split():
    return load_data(RunConfig(dataset="synthetic", seed=3).resolved())  # ~32k training rows, 2 s for all peers


def test_peers_learn_the_split_they_are_given(split):
    """Each peer beats the training mean on the test rows (ids crossed between Surprise and the split,
    or test rows scored against other rows, would leave them at the mean), and a seed repeats SVD."""
    mean = float(split.train.rating.mean())
    mean_rmse = float(np.sqrt(np.mean((split.test.rating - mean) ** 2)))
    results = peer_results(split, seed=1)
    assert set(results) == set(PEERS)
    for name, result in results.items():
        assert result["rmse"] < 0.9 * mean_rmse, (name, result, mean_rmse)
        assert 0 < result["mae"] <= result["rmse"]
    assert peer_results(split, seed=1, names=("SVD",))["SVD"]["rmse"] == results["SVD"]["rmse"]


def test_without_surprise_every_peer_is_skipped_with_the_install_hint(split, monkeypatch):
    real_import = builtins.__import__

    def no_surprise(name, *args, **kwargs):
        if name == "surprise" or name.startswith("surprise."):
            raise ImportError("No module named 'surprise'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_surprise)
    assert peer_results(split) == {name: {"skipped": INSTALL_HINT} for name in PEERS}


def test_an_implicit_split_is_skipped_with_why(split):
    implicit = dataclasses.replace(split, test_negatives=[np.array([1, 2])] * len(split.test.user))
    assert all("implicit" in r["skipped"] for r in peer_results(implicit, names=("SVD",)).values())
