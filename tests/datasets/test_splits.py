"""Splits and per-user partitions: deterministic, complete, and nothing else on a device."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.datasets import (
    DataError,
    Interactions,
    Ratings,
    SyntheticSpec,
    cohort,
    generate,
    load_split,
    user_partition,
)
from fedrec.datasets.splits import leave_one_out, random_holdout


def _ratings(seed=0, users=50, items=80):
    return generate(SyntheticSpec(users=users, items=items, density=0.15, seed=seed))[0]


def test_random_holdout_is_deterministic_and_keeps_every_user_in_train():
    r = _ratings()
    a, b = random_holdout(r, 0.3, seed=7), random_holdout(r, 0.3, seed=7)
    np.testing.assert_array_equal(a.test.item, b.test.item)
    assert not np.array_equal(a.test.item, random_holdout(r, 0.3, seed=8).test.item)
    assert set(a.train.user) == set(range(r.n_users))
    assert len(a.train) + len(a.test) == len(r.data)
    frac = len(a.test) / len(r.data)
    assert 0.25 < frac < 0.35
    pairs = lambda x: set(zip(x.user.tolist(), x.item.tolist()))  # noqa: E731
    assert not pairs(a.train) & pairs(a.test)


def test_leave_one_out_holds_out_latest_with_unrated_negatives():
    r = _ratings()
    s = leave_one_out(r, n_negatives=20, seed=3)
    assert s.implicit and len(s.test) == r.n_users  # every user has 20 unrated items here
    for j, u in enumerate(s.test.user):
        own = r.data.user == u
        assert s.test.timestamp[j] == r.data.timestamp[own].max()
        rated = set(r.data.item[own].tolist())
        assert not rated & set(s.test_negatives[j].tolist())
        assert len(set(s.test_negatives[j].tolist())) == 20
    np.testing.assert_array_equal(s.test_negatives, leave_one_out(r, 20, seed=3).test_negatives)


def test_leave_one_out_skips_users_without_enough_negatives():
    r = _ratings(items=30)
    counts = np.bincount(r.data.user)
    s = leave_one_out(r, n_negatives=25)
    assert set(s.test.user.tolist()) == set(np.flatnonzero((30 - counts >= 25) & (counts >= 2)).tolist())
    with pytest.raises(DataError, match="lower the number of negatives"):
        leave_one_out(r, n_negatives=30)


def test_canonical_split_maps_onto_full_ids(tmp_path, write_dataset):
    folder = write_dataset(tmp_path, "ml-100k")
    (folder / "u1.base").write_text("10\t100\t4\t1\n20\t100\t5\t3\n30\t300\t1\t4\n")
    (folder / "u1.test").write_text("10\t200\t3\t2\n")
    s = load_split("ml-100k", "u1", data_dir=str(tmp_path))
    assert (s.n_users, s.n_items, len(s.train), len(s.test)) == (3, 3, 3, 1)
    assert (s.test.user[0], s.test.item[0]) == (0, 1)
    (folder / "u2.base").write_text("10\t999\t4\t1\n")
    (folder / "u2.test").write_text("10\t200\t3\t2\n")
    with pytest.raises(DataError, match=r"u2.base:1: item 999 is not in"):
        load_split("ml-100k", "u2", data_dir=str(tmp_path))


def test_canonical_split_only_for_ml100k():
    with pytest.raises(DataError, match="only for ml-100k"):
        load_split("synthetic", "u1")


def test_partition_holds_exactly_one_users_rows():
    s = random_holdout(_ratings(), 0.2, seed=1)
    for u in (0, 17, 49):
        p = user_partition(s, u)
        assert sorted(p.train_item.tolist()) == sorted(s.train.item[s.train.user == u].tolist())
        assert sorted(p.test_item.tolist()) == sorted(s.test.item[s.test.user == u].tolist())
        assert (p.train_segment == 0).all()
    c = cohort(s, [3, 9])
    assert len(c.train_item) == (s.train.user == 3).sum() + (s.train.user == 9).sum()
    np.testing.assert_array_equal(c.train_counts(), [(s.train.user == 3).sum(), (s.train.user == 9).sum()])


def test_synthetic_is_deterministic_long_tailed_and_on_the_star_scale():
    spec = SyntheticSpec(users=3000, items=400, density=0.05, seed=5)
    a, truth = generate(spec)
    b, _ = generate(spec)
    np.testing.assert_array_equal(a.data.item, b.data.item)
    assert set(np.unique(a.data.rating).tolist()) <= {1, 2, 3, 4, 5}
    per_user = np.bincount(a.data.user, minlength=spec.users)
    assert per_user.min() >= 2 and per_user.max() > 10 * np.median(per_user)  # heavy users exist
    per_item = np.bincount(a.data.item, minlength=spec.items)
    top = np.sort(per_item)[::-1]
    assert top[: spec.items // 10].sum() > 0.3 * top.sum()  # popular items dominate
    assert 0.6 * spec.density < len(a.data) / (spec.users * spec.items) <= spec.density * 1.05
    # Ratings follow the generating model: the true expectation beats the global mean.
    exp = truth.expected(a.data.user, a.data.item)
    assert np.sqrt(np.mean((exp - a.data.rating) ** 2)) < 0.8 * np.std(a.data.rating)


def test_interactions_reject_ragged_arrays():
    with pytest.raises(ValueError):
        Interactions(np.zeros(2, int), np.zeros(3, int), np.zeros(2), np.zeros(2, int))
    assert isinstance(_ratings(), Ratings)
