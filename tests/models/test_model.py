"""Biased MF, its training round and the central trainer, on data with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.datasets import SyntheticSpec, cohort, generate
from fedrec.datasets.splits import leave_one_out, random_holdout
from fedrec.models import train as training
from fedrec.models.algorithm import DeviceKeys
from fedrec.models.central import train_central
from fedrec.models.defaults import Hyper
from fedrec.models.mf import MF, sample_negatives
from fedrec.models.randomness import negatives_key
from fedrec.models.server_opt import ServerOptimizer
from fedrec.privacy.clip import clip

HYPER = Hyper(dim=8, seed=3)


@pytest.fixture(scope="module")
def synthetic():
    ratings, truth = generate(SyntheticSpec(users=400, items=120, density=0.15, rank=4, noise=0.3, seed=2))
    return random_holdout(ratings, 0.2, seed=2), truth


def _train(split, users, hyper=HYPER, clip_norm=0.0, round_=1):
    """A round for `users` through the training loop; (new state, sums, each user's norm)."""
    mf = MF(hyper, split.n_items, split.rating_scale)
    shared = {k: torch.as_tensor(v) for k, v in mf.init_server().broadcast().items()}
    state = mf.new_users(np.asarray(users), split.n_users, None)
    new, sums = training.train_cohort(mf, shared, state, cohort(split, users), round_, DeviceKeys(hyper.seed),
                                      lambda c: clip(c, clip_norm))
    return new, sums, torch.cat(sums.norms)


@pytest.mark.parametrize("implicit", [False, True])
def test_a_users_result_does_not_depend_on_its_batch(synthetic, implicit):
    split = synthetic[0] if not implicit else leave_one_out(generate(SyntheticSpec(users=100, items=80, seed=1))[0], 20)
    hyper = Hyper(dim=8, seed=3, implicit=implicit, local_epochs=3)
    together_state, together, _ = _train(split, [4, 9, 30], hyper)
    parts = [_train(split, [u], hyper) for u in (4, 9, 30)]
    for pos, (state, _, _) in enumerate(parts):
        torch.testing.assert_close(together_state["emb"][pos], state["emb"][0])
    for name, value in together.arrays.items():
        torch.testing.assert_close(value, sum(p[1].arrays[name] for p in parts), rtol=1e-5, atol=1e-6)


def test_clipping_bounds_every_users_update(synthetic):
    split, _ = synthetic
    _, _, raw = _train(split, [0, 1, 2])
    assert (raw > 0.01).all()
    for user in (0, 1, 2):
        _, clipped, _ = _train(split, [user], clip_norm=0.01)
        norm = torch.sqrt(sum((v**2).sum() for v in clipped.arrays.values()))
        assert float(norm) <= 0.01 * (1 + 1e-5)


def test_negatives_are_unrated_and_independent_of_the_batch():
    users = np.array([5, 8])
    segment = np.array([0, 0, 1])
    positives = np.array([1, 2, 1])
    key = negatives_key(0, 2)
    seg, items = sample_negatives(users, segment, positives, np.array([8, 4]), 6, key)
    assert not ({(0, 1), (0, 2), (1, 1)} & set(zip(seg.tolist(), items.tolist())))
    _, alone = sample_negatives(users[1:], np.array([0]), np.array([1]), np.array([4]), 6, key)
    np.testing.assert_array_equal(items[seg == 1], alone)


def test_central_training_recovers_known_structure(synthetic):
    split, truth = synthetic
    rows = cohort(split, np.arange(split.n_users))
    mf = MF(Hyper(dim=8, reg_user=0.05, reg_item=0.1, seed=0), split.n_items, split.rating_scale)
    result = train_central(mf, rows, split.n_users, epochs=150, eval_every=150)
    oracle = np.sqrt(np.mean((truth.expected(split.test.user, split.test.item) - split.test.rating) ** 2))
    mean_only = np.sqrt(np.mean((split.train.rating.mean() - split.test.rating) ** 2))
    assert result.metrics["rmse"] < oracle + 0.5 * (mean_only - oracle)  # most of the learnable signal
    assert result.history[-1]["train_loss"] < 0.9 * mean_only**2


def test_implicit_training_ranks_far_above_chance():
    split = leave_one_out(generate(SyntheticSpec(users=300, items=150, density=0.1, seed=4))[0], 99)
    rows = cohort(split, np.arange(split.n_users))
    # MF alone: the synthetic timestamps are random, so recency re-scoring (models/recency.py) adds only noise here
    mf = MF(Hyper(dim=8, implicit=True, reg_user=0.01, reg_item=0.01, reg_bias=0.001, recency_weight=0.0),
            split.n_items, split.rating_scale)
    result = train_central(mf, rows, split.n_users, epochs=60, eval_every=60)
    assert result.metrics["hr@10"] > 0.25  # chance is 0.10
    assert 0 < result.metrics["recall@10"] <= 1


def test_fedavg_server_step_adds_the_mean_change():
    params = MF(Hyper(dim=2), 5, (1.0, 5.0)).init_server().params
    before = {k: v.clone() for k, v in params.items()}
    ServerOptimizer(params, "fedavg", lr=1.0).step({k: torch.full_like(v, 0.5) for k, v in params.items()})
    for k, v in params.items():
        torch.testing.assert_close(v, before[k] + 0.5)
    with pytest.raises(ValueError, match="unknown strategy"):
        ServerOptimizer(params, "fedsgdx", lr=1.0)


@pytest.mark.parametrize("implicit", [False, True])
def test_training_a_cohort_in_chunks_of_users_changes_no_users_result(monkeypatch, implicit):
    """Users are independent: a node that trains its users a chunk at a time (memory) gets each user's
    state and norm as in one batch, and the same sum."""
    split = random_holdout(generate(SyntheticSpec(users=40, items=30, density=0.3, seed=5))[0], 0.2, 5)
    hyper = Hyper(dim=4, implicit=implicit, train_negatives=2 if implicit else 0, local_epochs=2)
    whole_state, whole, whole_norms = _train(split, np.arange(40), hyper, clip_norm=0.05)
    monkeypatch.setattr(training, "USERS_PER_CHUNK", 7)
    chunked_state, chunked, chunked_norms = _train(split, np.arange(40), hyper, clip_norm=0.05)
    for name, value in whole_state.items():  # float kernels may round differently by batch size
        torch.testing.assert_close(chunked_state[name], value, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked_norms, whole_norms, rtol=1e-6, atol=0)
    for name, value in whole.arrays.items():
        torch.testing.assert_close(chunked.arrays[name], value, rtol=0, atol=1e-6)
    assert chunked.num_rows == whole.num_rows and chunked.loss_sum == pytest.approx(whole.loss_sum, rel=1e-6)
