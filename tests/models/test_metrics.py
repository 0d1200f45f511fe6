"""Metric properties (Hypothesis) and a few known answers."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedrec.models.metrics import add_sums, error_sums, finish, full_ranking_sums, loo_sums

floats = st.floats(-10, 10, allow_nan=False, width=32)


@given(arrays(np.float32, st.integers(1, 50), elements=floats), st.data())
@settings(max_examples=40, deadline=None)
def test_rmse_mae_bounds_and_row_order_invariance(pred, data):
    target = data.draw(arrays(np.float32, len(pred), elements=floats))
    m = finish(error_sums(torch.as_tensor(pred), torch.as_tensor(target)))
    assert 0 <= m["mae"] <= m["rmse"] + 1e-9
    assert m["rmse"] <= np.abs(pred.astype(float) - target).max() + 1e-6
    perm = data.draw(st.permutations(range(len(pred))))
    m2 = finish(error_sums(torch.as_tensor(pred[perm]), torch.as_tensor(target[perm])))
    assert math.isclose(m["rmse"], m2["rmse"], rel_tol=1e-9, abs_tol=1e-12)


@given(st.integers(1, 30), st.integers(1, 40), st.integers(1, 20), st.data())
@settings(max_examples=40, deadline=None)
def test_hr_ndcg_bounds_perfect_ranking_and_order(n, n_neg, k, data):
    pos = torch.as_tensor(data.draw(arrays(np.float32, n, elements=floats)))
    neg = torch.as_tensor(data.draw(arrays(np.float32, (n, n_neg), elements=floats)))
    m = finish(loo_sums(pos, neg, k), k)
    assert 0 <= m[f"ndcg@{k}"] <= m[f"hr@{k}"] <= 1
    perfect = finish(loo_sums(neg.max(dim=1).values + 1, neg, k), k)
    assert perfect[f"hr@{k}"] == 1 and perfect[f"ndcg@{k}"] == 1
    perm = torch.as_tensor(data.draw(st.permutations(range(n))))
    shuffled = finish(loo_sums(pos[perm], neg[perm], k), k)
    assert all(math.isclose(shuffled[key], m[key], rel_tol=1e-12) for key in m)


def test_ties_count_against_the_positive():
    m = finish(loo_sums(torch.zeros(4), torch.zeros(4, 99), 10), 10)
    assert m["hr@10"] == 0


def test_known_ndcg():
    # positive ranked third (two negatives above): ndcg = 1/log2(4) = 0.5
    m = finish(loo_sums(torch.tensor([1.0]), torch.tensor([[3.0, 2.0, 0.0]]), 10), 10)
    assert m["hr@10"] == 1 and math.isclose(m["ndcg@10"], 0.5)


@given(st.integers(1, 8), st.integers(2, 30), st.integers(1, 10), st.data())
@settings(max_examples=40, deadline=None)
def test_full_ranking_bounds_and_perfect(users, items, k, data):
    scores = torch.as_tensor(data.draw(arrays(np.float32, (users, items), elements=floats)))
    relevant = torch.as_tensor(data.draw(arrays(bool, (users, items))))
    exclude = torch.as_tensor(data.draw(arrays(bool, (users, items)))) & ~relevant
    m = finish(full_ranking_sums(scores, exclude, relevant, k), k)
    if relevant.any(dim=1).any():
        assert 0 <= m[f"recall@{k}"] <= 1 and 0 <= m[f"full-ndcg@{k}"] <= 1 + 1e-9
        ideal = relevant.float() * 100 + scores.clamp(-10, 10)
        best = finish(full_ranking_sums(ideal, exclude, relevant, k), k)
        assert math.isclose(best[f"full-ndcg@{k}"], 1.0, rel_tol=1e-9)


def test_full_ranking_excludes_training_items():
    scores = torch.tensor([[9.0, 8.0, 1.0, 0.0]])
    exclude = torch.tensor([[True, True, False, False]])
    relevant = torch.tensor([[False, False, True, False]])
    assert finish(full_ranking_sums(scores, exclude, relevant, 1), 1)["recall@1"] == 1.0
    assert finish(full_ranking_sums(scores, torch.zeros_like(exclude), relevant, 1), 1)["recall@1"] == 0.0


def test_sums_add_up_across_devices():
    a = error_sums(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]))
    b = error_sums(torch.tensor([5.0]), torch.tensor([3.0]))
    whole = error_sums(torch.tensor([1.0, 2.0, 5.0]), torch.tensor([2.0, 2.0, 3.0]))
    assert finish(add_sums(dict(a), b)) == finish(whole)
