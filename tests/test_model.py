"""The MF model, the local step and the central trainer, on data with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.datasets import SyntheticSpec, cohort, generate
from fedrec.datasets.splits import leave_one_out, random_holdout
from fedrec.models import (
    Hyper,
    ItemParams,
    ServerOptimizer,
    UserState,
    local_train,
    sample_negatives,
    train_central,
    training_rows,
)

HYPER = Hyper(dim=8, seed=3)


@pytest.fixture(scope="module")
def synthetic():
    ratings, truth = generate(SyntheticSpec(users=400, items=120, density=0.15, rank=4, noise=0.3, seed=2))
    return random_holdout(ratings, 0.2, seed=2), truth


def _train(split, users, hyper=HYPER, clip=0.0, round_=1):
    rows = cohort(split, users)
    items = ItemParams.init(split.n_items, hyper, 3.0)
    state = UserState.init(np.asarray(users), split.n_users, hyper)
    seg, item, target = training_rows(rows, split.n_items, hyper, round_)
    return local_train(items, state, seg, item, target, hyper, clip_norm=clip)


@pytest.mark.parametrize("implicit", [False, True])
def test_a_users_result_does_not_depend_on_its_batch(synthetic, implicit):
    split = synthetic[0] if not implicit else leave_one_out(generate(SyntheticSpec(users=100, items=80, seed=1))[0], 20)
    hyper = Hyper(dim=8, seed=3, implicit=implicit, local_epochs=3)
    together_state, together = _train(split, [4, 9, 30], hyper)
    parts = [_train(split, [u], hyper) for u in (4, 9, 30)]
    for pos, (state, _) in enumerate(parts):
        torch.testing.assert_close(together_state.emb[pos], state.emb[0])
    torch.testing.assert_close(together.emb_delta, sum(p[1].emb_delta for p in parts), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together.bias_delta, sum(p[1].bias_delta for p in parts), rtol=1e-5, atol=1e-6)


def test_clipping_bounds_every_users_update(synthetic):
    split, _ = synthetic
    _, raw = _train(split, [0, 1, 2])
    assert (raw.norms > 0.01).all()
    for user in (0, 1, 2):
        _, clipped = _train(split, [user], clip=0.01)
        norm = torch.sqrt((clipped.emb_delta**2).sum() + (clipped.bias_delta**2).sum() + clipped.global_bias_delta**2)
        assert float(norm) <= 0.01 * (1 + 1e-5)


def test_negatives_are_unrated_and_independent_of_the_batch():
    users = np.array([5, 8])
    segment = np.array([0, 0, 1])
    positives = np.array([1, 2, 1])
    seg, items = sample_negatives(users, segment, positives, np.array([8, 4]), 6, seed=0, round_=2)
    assert not ({(0, 1), (0, 2), (1, 1)} & set(zip(seg.tolist(), items.tolist())))
    _, alone = sample_negatives(users[1:], np.array([0]), np.array([1]), np.array([4]), 6, seed=0, round_=2)
    np.testing.assert_array_equal(items[seg == 1], alone)


def test_central_training_recovers_known_structure(synthetic):
    split, truth = synthetic
    rows = cohort(split, np.arange(split.n_users))
    result = train_central(rows, split.n_users, split.n_items, Hyper(dim=8, reg_user=0.05, reg_item=0.1, seed=0),
                           epochs=150, eval_every=150)
    oracle = np.sqrt(np.mean((truth.expected(split.test.user, split.test.item) - split.test.rating) ** 2))
    mean_only = np.sqrt(np.mean((split.train.rating.mean() - split.test.rating) ** 2))
    assert result.metrics["rmse"] < oracle + 0.5 * (mean_only - oracle)  # most of the learnable signal
    assert result.history[-1]["train_loss"] < 0.9 * mean_only**2


def test_implicit_training_ranks_far_above_chance():
    split = leave_one_out(generate(SyntheticSpec(users=300, items=150, density=0.1, seed=4))[0], 99)
    rows = cohort(split, np.arange(split.n_users))
    # MF alone: the synthetic timestamps are random, so recency re-scoring (models/recency.py) adds only noise here
    result = train_central(rows, split.n_users, split.n_items, Hyper(dim=8, implicit=True, reg_user=0.01,
                           reg_item=0.01, reg_bias=0.001, recency_weight=0.0), epochs=60, eval_every=60)
    assert result.metrics["hr@10"] > 0.25  # chance is 0.10
    assert 0 < result.metrics["recall@10"] <= 1


def test_fedavg_server_step_adds_the_mean_change():
    items = ItemParams.init(5, Hyper(dim=2), 3.0)
    before = {k: v.clone() for k, v in items.tensors().items()}
    delta = {k: torch.full_like(v, 0.5) for k, v in items.tensors().items()}
    ServerOptimizer(items, "fedavg", lr=1.0).step(delta)
    for k, v in items.tensors().items():
        torch.testing.assert_close(v, before[k] + 0.5)
    with pytest.raises(ValueError, match="unknown strategy"):
        ServerOptimizer(items, "fedsgdx", lr=1.0)


@pytest.mark.parametrize("implicit", [False, True])
def test_training_a_cohort_in_chunks_of_users_changes_no_users_result(monkeypatch, implicit):
    """Users are independent: a node that trains its users a chunk at a time (memory) gets
    each user's state, norm and touched items as in one batch, and the same sum."""
    from fedrec.models import local

    split = random_holdout(generate(SyntheticSpec(users=40, items=30, density=0.3, seed=5))[0], 0.2, 5)
    rows = cohort(split, np.arange(40))
    hyper = Hyper(dim=4, implicit=implicit, train_negatives=2 if implicit else 0, local_epochs=2)
    items = ItemParams.init(split.n_items, hyper, 3.0)
    state = UserState.init(np.arange(40), 40, hyper)
    seg, item, target = local.training_rows(rows, split.n_items, hyper, 1)
    whole_state, whole = local.local_train(items, state, seg, item, target, hyper, clip_norm=0.05)
    monkeypatch.setattr(local, "USERS_PER_CHUNK", 7)
    chunked_state, chunked = local.local_train(items, state, seg, item, target, hyper, clip_norm=0.05)
    for name in ("emb", "bias", "m", "v", "step"):  # float kernels may round differently by batch size
        torch.testing.assert_close(getattr(chunked_state, name), getattr(whole_state, name), rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked.norms, whole.norms, rtol=1e-6, atol=0)
    for name in ("pair_item", "pair_user"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name))
    torch.testing.assert_close(chunked.emb_delta, whole.emb_delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked.bias_delta, whole.bias_delta, rtol=0, atol=1e-6)
    assert chunked.num_rows == whole.num_rows and chunked.loss_sum == pytest.approx(whole.loss_sum, rel=1e-6)
