"""Upload modes (dense, sparse, padded), local DP noise, and the leakage audit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedrec.client.app import app as client_app
from fedrec.datasets import SyntheticSpec, cohort, generate
from fedrec.datasets.splits import random_holdout
from fedrec.models.defaults import Hyper
from fedrec.models.mf import MF
from fedrec.privacy.device import device_step, new_users
from fedrec.privacy.policy import DevicePolicy
from fedrec.privacy.upload import ITEM_INDEX, build_upload, scatter
from fedrec.server.runner import run_server
from fedrec.simulations.inprocess import InProcessGrid

H = Hyper(dim=6, seed=1)


@pytest.fixture(scope="module")
def split():
    return random_holdout(generate(SyntheticSpec(users=200, items=150, density=0.08, seed=3))[0], 0.2, 3)


def _device(split, users, mode, clip=0.0):
    """One round through device_step; a fixed seed makes its decoys reproducible."""
    mf = MF(H, split.n_items, split.rating_scale)
    policy = DevicePolicy(update_mode=mode, clipping_norm=clip, reproducible_seed=5)
    state = new_users(mf, np.asarray(users), split.n_users, policy)
    return mf, device_step(mf, mf.init_server().broadcast(), state, cohort(split, users), 1, policy, H.seed)


def test_sparse_upload_is_the_dense_one_without_the_zero_rows(split):
    mf, dense = _device(split, [1, 2, 3], "dense")
    _, sparse = _device(split, [1, 2, 3], "sparse")
    rows = cohort(split, [1, 2, 3])
    assert set(sparse.upload[ITEM_INDEX].tolist()) == set(rows.train_item.tolist())
    for key, value in scatter(sparse.upload, mf.statistics(), split.n_items).items():
        np.testing.assert_allclose(value, dense.upload[key], rtol=1e-6)
    assert sparse.upload["item-emb"].nbytes < dense.upload["item-emb"].nbytes


def test_padded_upload_adds_unrated_decoys_without_touching_the_user(split):
    rows = cohort(split, [7])
    mf, plain = _device(split, [7], "dense")
    _, padded = _device(split, [7], "padded")
    uploaded = padded.upload[ITEM_INDEX]
    rated = set(rows.train_item.tolist())
    decoys = set(uploaded.tolist()) - rated
    assert rated <= set(uploaded.tolist()) and len(decoys) == len(rated)
    torch.testing.assert_close(plain.state["emb"], padded.state["emb"])  # decoys never move the user's own vector
    emb = scatter(padded.upload, mf.statistics(), split.n_items)["item-emb"]
    real_norm = np.linalg.norm(emb[sorted(rated)], axis=1).mean()
    decoy_norm = np.linalg.norm(emb[sorted(decoys)], axis=1).mean()
    assert 0.3 < decoy_norm / real_norm < 3  # decoys look like real rows in size


def test_local_noise_has_the_configured_std(split):
    mf, result = _device(split, [4], "dense")
    clean = build_upload(result.sums, mf.statistics(), "dense")["item-emb"]
    noisy = build_upload(result.sums, mf.statistics(), "dense", noise_std=0.7, rng=np.random.default_rng(0))["item-emb"]
    assert np.std(noisy - clean) == pytest.approx(0.7, rel=0.03)


def test_federated_run_in_each_mode_trains_and_reports_bytes(small_cfg):
    results = {}
    for mode in ("dense", "sparse", "padded"):
        mode_cfg = dataclasses.replace(small_cfg, update_mode=mode, rounds=3, eval_every=3,
                                       out=f"{small_cfg.out}-{mode}")
        outcome = run_server(InProcessGrid(client_app, 60), mode_cfg)
        results[mode] = outcome.summary
    assert results["sparse"]["bytes_up"] < results["padded"]["bytes_up"] < results["dense"]["bytes_up"]
    assert results["sparse"]["metrics"]["rmse"] == pytest.approx(results["dense"]["metrics"]["rmse"], rel=1e-5)
    assert np.isfinite(results["padded"]["metrics"]["rmse"])
