"""Per-user clipping bounds each user's *total* contribution, in every upload mode; clip-check measures it.

The DP guarantee needs the sensitivity bound on what the server actually sums: a user's whole scattered
upload (every statistic) must have L2 norm <= C, and a cohort's upload must be exactly the sum of its
users' uploads. tests/models/test_algorithms.py holds the bound for every algorithm; here it is also tight
(an unclipped user untouched, a clipped one at C), the cohort sum holds in every upload mode with
implicit negatives and local epochs, and `fedrec clip-check` measures it on every user.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.audit import clipcheck
from fedrec.datasets import SyntheticSpec, cohort, generate
from fedrec.datasets.splits import random_holdout
from fedrec.models.algorithm import DECOYS, RowContributions, Statistic, Sums
from fedrec.models.defaults import Hyper
from fedrec.models.registry import ALGORITHMS
from fedrec.privacy import device as device_module
from fedrec.privacy.clip import clip
from fedrec.privacy.device import device_step, new_users
from fedrec.privacy.policy import UPDATE_MODES, DevicePolicy
from fedrec.privacy.upload import scatter
from fedrec.run.config import ConfigError, RunConfig

# Few items and dense ratings: implicit negatives often repeat an item (the case the
# per-pair summing exists for), and heavy users rate a large share of the catalogue.
SPLIT = random_holdout(generate(SyntheticSpec(users=60, items=30, density=0.3, seed=11))[0], 0.2, 11)
SEED = 77  # reproducible decoys, so single-user and cohort runs draw the same ones


def _step(users, hyper: Hyper, policy: DevicePolicy, round_: int):
    users = np.asarray(users)
    algorithm = ALGORITHMS[hyper.model](hyper, SPLIT.n_items, SPLIT.rating_scale)
    shared = algorithm.init_server("fedavg", 1.0).broadcast()
    state = new_users(algorithm, users, SPLIT.n_users, policy)
    result = device_step(algorithm, shared, state, cohort(SPLIT, users), round_, policy, hyper.seed)
    return result, scatter(result.upload, algorithm.statistics(), SPLIT.n_items)


def _norm(arrays: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum((a.astype(np.float64) ** 2).sum() for a in arrays.values())))


@settings(max_examples=60, deadline=None)
@given(users=st.lists(st.integers(0, SPLIT.n_users - 1), min_size=1, max_size=4, unique=True).map(sorted),
       mode=st.sampled_from(UPDATE_MODES), local_epochs=st.integers(1, 3), implicit=st.booleans(),
       train_negatives=st.integers(1, 6), clip_norm=st.floats(1e-3, 1.0), lr=st.floats(0.01, 1.0),
       round_=st.integers(1, 50), model=st.sampled_from(sorted(ALGORITHMS)))
def test_each_users_upload_is_clipped_and_the_cohort_sums_them(users, mode, local_epochs, implicit, train_negatives,
                                                               clip_norm, lr, round_, model):
    cls = ALGORITHMS[model]
    if mode == "padded" and DECOYS in cls.refuses:
        mode = "sparse"  # refused (tests/models/test_svdpp.py, tests/models/test_bpmf.py)
    implicit = (implicit and cls.implicit_feedback) or not cls.rating_feedback
    hyper = Hyper(model=model, dim=4, lr=lr, local_epochs=local_epochs, implicit=implicit,
                  train_negatives=train_negatives, seed=2)
    policy = DevicePolicy(update_mode=mode, clipping_norm=clip_norm, reproducible_seed=SEED)
    singles = []
    for user in users:
        result, arrays = _step([user], hyper, policy, round_)
        before = float(torch.cat(result.sums.norms)[0])
        assert _norm(arrays) <= clip_norm * (1 + 1e-5)
        # Tight, not just bounded: an unclipped user is untouched and a clipped one sits at C.
        np.testing.assert_allclose(_norm(arrays), min(before, clip_norm), rtol=1e-4, atol=1e-7)
        singles.append(arrays)
    _, together = _step(users, hyper, policy, round_)
    for key, value in together.items():
        np.testing.assert_allclose(value, sum(s[key] for s in singles), rtol=0, atol=1e-6 * clip_norm, err_msg=key)


def test_repeated_items_of_one_user_are_clipped_together():
    """Regression: implicit negatives drawn twice (and positives with their negatives) were
    once normed row by row, so a user whose rows of one item pointed the same way uploaded
    more than C. With 4 negatives per positive out of 30 items, repeats are the rule."""
    hyper = Hyper(model="mf", dim=4, lr=0.5, local_epochs=2, implicit=True, train_negatives=4, seed=2)
    clip_norm = 0.01
    policy = DevicePolicy(update_mode="dense", clipping_norm=clip_norm, reproducible_seed=SEED)
    heavy = np.argsort(-SPLIT.train_index().counts())[:50]  # the 50 heaviest users
    ratios = [_norm(_step([u], hyper, policy, 3)[1]) / clip_norm for u in heavy]
    assert max(ratios) <= 1 + 1e-5
    assert np.median(ratios) > 0.99  # C binds for most users, so the bound is really exercised


def test_an_update_too_large_for_float32_scaling_contributes_nothing():
    """Red-team finding: for a finite but huge update, C/norm is a float32 subnormal and its
    rounding let the clipped norm pass C; a non-finite row came out as NaN. Both now fail closed."""
    statistics = {"rows": Statistic(4), "total": Statistic(1, per_item=False)}
    for row in ([3.0e38] * 4, [float("inf"), 1.0, 0.0, 0.0]):
        part = RowContributions(2, torch.tensor([0, 1]), torch.tensor([0, 1]),
                                {"rows": torch.tensor([row, [0.3, 0.4, 0.0, 0.0]])}, {"total": torch.zeros(2, 1)})
        sums = Sums.zeros(statistics, 2)
        sums.add(part, *clip(part, 0.05), statistics)
        assert torch.all(sums.arrays["rows"][0] == 0)  # the huge user contributes nothing
        ordinary = float(torch.linalg.vector_norm(sums.arrays["rows"][1]))
        assert 0.049 < ordinary <= 0.05  # the ordinary user is clipped as before


# ---------------------------------------------------------------- fedrec clip-check
def _check_cfg(tmp_path, **changes) -> RunConfig:
    return RunConfig(dataset="synthetic", synthetic_users=40, synthetic_items=30, synthetic_density=0.3, dim=4,
                     clipping_norm=0.01, out=str(tmp_path / "clip"), **changes)


@pytest.mark.parametrize("model,modes", [("mf", {"dense", "sparse", "padded"}), ("svdpp", {"dense", "sparse"})])
def test_clip_check_measures_every_user_at_or_below_c_in_each_mode_its_algorithm_admits(tmp_path, model, modes):
    report = clipcheck.run_clip_check(_check_cfg(tmp_path, model=model), [1], [1, 2], log=lambda line: None)
    assert {r["mode"] for r in report["results"]} == modes and len(report["results"]) == 2 * len(modes)
    assert all(r["users"] == 40 and r["over_bound"] == 0 for r in report["results"])
    assert 0.999 < report["max_ratio"] <= 1 + 1e-5  # C binds: the bound is measured where it matters
    assert (tmp_path / "clip" / "clip_check.json").is_file()


def test_clip_check_sees_clipping_that_does_not_bind(tmp_path, monkeypatch):
    """Positive control: with the device's clipping switched off, clip-check reports users over C."""
    monkeypatch.setattr(device_module, "clip", lambda contributions, c: clip(contributions, 0.0))
    report = clipcheck.run_clip_check(_check_cfg(tmp_path, model="mf"), [1], [1], log=lambda line: None)
    assert report["max_ratio"] > 2 and all(r["over_bound"] > 0 for r in report["results"])


def test_clip_check_refuses_an_algorithm_that_admits_no_clipping(tmp_path):
    cfg = dataclasses.replace(_check_cfg(tmp_path), model="bpmf")
    with pytest.raises(ConfigError, match="refuses"):
        clipcheck.run_clip_check(cfg, [1], [1], log=lambda line: None)
    assert not (tmp_path / "clip").exists()  # nothing half-written
