"""Per-user clipping bounds each user's *total* contribution, in every upload mode.

The DP guarantee needs the sensitivity bound on what the server actually sums: a user's
whole scattered upload (item rows, item biases, global bias) must have L2 norm <= C, and
a cohort's upload must be exactly the sum of its users' uploads.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.datasets import SyntheticSpec, cohort, generate
from fedrec.datasets.splits import random_holdout
from fedrec.models import Hyper, ItemParams, UserState
from fedrec.models.defaults import UPDATE_MODES
from fedrec.models.device import DevicePolicy, device_step
from fedrec.models.upload import scatter_upload

# Few items and dense ratings: implicit negatives often repeat an item (the case the
# per-pair summing exists for), and heavy users rate a large share of the catalogue.
SPLIT = random_holdout(generate(SyntheticSpec(users=60, items=30, density=0.3, seed=11))[0], 0.2, 11)
SEED = 77  # reproducible decoys, so single-user and cohort runs draw the same ones


def _step(users, hyper: Hyper, policy: DevicePolicy, round_: int):
    users = np.asarray(users)
    items = ItemParams.init(SPLIT.n_items, hyper, 0.0 if hyper.implicit else 3.0)
    state = UserState.init(users, SPLIT.n_users, hyper)
    return device_step(items, state, cohort(SPLIT, users), SPLIT.n_items, hyper, policy, round_)


def _dense(result, hyper: Hyper) -> dict[str, np.ndarray]:
    return scatter_upload(result.upload, SPLIT.n_items, hyper.upload_width)


def _norm(arrays: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum((a**2).sum() for a in arrays.values())))


@settings(max_examples=60, deadline=None)
@given(users=st.lists(st.integers(0, SPLIT.n_users - 1), min_size=1, max_size=4, unique=True).map(sorted),
       mode=st.sampled_from(UPDATE_MODES), local_epochs=st.integers(1, 3), implicit=st.booleans(),
       train_negatives=st.integers(1, 6), clip=st.floats(1e-3, 1.0), lr=st.floats(0.01, 1.0),
       round_=st.integers(1, 50), model=st.sampled_from(["mf", "svdpp", "bpmf"]))
def test_each_users_upload_is_clipped_and_the_cohort_sums_them(users, mode, local_epochs, implicit, train_negatives,
                                                               clip, lr, round_, model):
    if model != "mf" and mode == "padded":
        mode = "sparse"  # refused under SVD++ and BPMF (tests/test_svdpp.py, tests/test_bpmf.py)
    implicit = implicit and model != "bpmf"  # BPMF models ratings only
    hyper = Hyper(model=model, dim=4, lr=lr, local_epochs=local_epochs, implicit=implicit,
                  train_negatives=train_negatives, seed=2)
    policy = DevicePolicy(update_mode=mode, clip_norm=clip, reproducible_seed=SEED)
    singles = []
    for user in users:
        result = _step([user], hyper, policy, round_)
        arrays = _dense(result, hyper)
        before = float(result.update.norms[0])
        assert _norm(arrays) <= clip * (1 + 1e-5)
        # Tight, not just bounded: an unclipped user is untouched and a clipped one sits at C.
        np.testing.assert_allclose(_norm(arrays), min(before, clip), rtol=1e-4, atol=1e-7)
        singles.append(arrays)
    together = _dense(_step(users, hyper, policy, round_), hyper)
    for key, value in together.items():
        np.testing.assert_allclose(value, sum(s[key] for s in singles), rtol=0, atol=1e-6 * clip, err_msg=key)


def test_repeated_items_of_one_user_are_clipped_together():
    """Regression: implicit negatives drawn twice (and positives with their negatives) were
    once normed row by row, so a user whose rows of one item pointed the same way uploaded
    more than C. With 4 negatives per positive out of 30 items, repeats are the rule."""
    hyper = Hyper(dim=4, lr=0.5, local_epochs=2, implicit=True, train_negatives=4, seed=2)
    clip = 0.01
    policy = DevicePolicy(update_mode="dense", clip_norm=clip, reproducible_seed=SEED)
    heavy = np.argsort(-SPLIT.train_index().counts())[:50]  # the 50 heaviest users
    ratios = [_norm(_dense(_step([u], hyper, policy, 3), hyper)) / clip for u in heavy]
    assert max(ratios) <= 1 + 1e-5
    assert np.median(ratios) > 0.99  # C binds for most users, so the bound is really exercised


def test_an_update_too_large_for_float32_scaling_contributes_nothing():
    """Red-team finding: for a finite but huge update, C/norm is a float32 subnormal and its
    rounding let the clipped norm pass C; a non-finite row came out as NaN. Both now fail closed."""
    import torch

    from fedrec.models.local import clip_per_user

    for row in ([3.0e38] * 4, [float("inf"), 1.0, 0.0, 0.0]):
        dq, db, mu, _ = clip_per_user(torch.tensor([0, 1]), torch.tensor([row, [0.3, 0.4, 0.0, 0.0]]),
                                      torch.zeros(2), torch.zeros(2), 0.05)
        assert torch.all(dq[0] == 0) and float(db[0]) == 0 and float(mu[0]) == 0
        assert float(torch.linalg.vector_norm(dq[1].double())) <= 0.05  # the ordinary user is clipped as before
        assert float(torch.linalg.vector_norm(dq[1].double())) > 0.049
