"""Upload modes (dense, sparse, padded), local DP noise, and the leakage audit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedrec.client.app import app as client_app
from fedrec.datasets import SyntheticSpec, cohort, generate
from fedrec.datasets.splits import random_holdout
from fedrec.models import Hyper, ItemParams, UserState, local_train, training_rows
from fedrec.privacy.policy import DevicePolicy, device_step
from fedrec.models.upload import build_upload, scatter_upload
from fedrec.run import schema
from fedrec.server.runner import run_server
from fedrec.simulations.inprocess import InProcessGrid

H = Hyper(dim=6, seed=1)


@pytest.fixture(scope="module")
def split():
    return random_holdout(generate(SyntheticSpec(users=200, items=150, density=0.08, seed=3))[0], 0.2, 3)


def _update(split, users, clip=0.0):
    rows = cohort(split, users)
    items = ItemParams.init(split.n_items, H, 3.0)
    state = UserState.init(np.asarray(users), split.n_users, H)
    seg, item, target = training_rows(rows, split.n_items, H, 1)
    return rows, local_train(items, state, seg, item, target, H, clip_norm=clip)


def _device(split, users, mode):
    """One round through device_step; a fixed seed makes its decoys reproducible."""
    policy = DevicePolicy(update_mode=mode, reproducible_seed=5)
    items = ItemParams.init(split.n_items, H, 3.0)
    state = UserState.init(np.asarray(users), split.n_users, H)
    return device_step(items, state, cohort(split, users), split.n_items, H, policy, 1)


def test_sparse_upload_is_the_dense_one_without_the_zero_rows(split):
    rows, (_, update) = _update(split, [1, 2, 3])
    dense, sparse = build_upload(update, "dense"), build_upload(update, "sparse")
    assert set(sparse[schema.ITEM_INDEX].tolist()) == set(rows.train_item.tolist())
    for key, value in scatter_upload(sparse, split.n_items, H.dim).items():
        np.testing.assert_allclose(value, dense[key], rtol=1e-6)
    assert sparse[schema.ITEM_EMB].nbytes < dense[schema.ITEM_EMB].nbytes


def test_padded_upload_adds_unrated_decoys_without_touching_the_user(split):
    rows = cohort(split, [7])
    plain, padded = _device(split, [7], "dense"), _device(split, [7], "padded")
    uploaded = padded.upload[schema.ITEM_INDEX]
    rated = set(rows.train_item.tolist())
    decoys = set(uploaded.tolist()) - rated
    assert rated <= set(uploaded.tolist()) and len(decoys) == len(rated)
    torch.testing.assert_close(plain.state.emb, padded.state.emb)  # decoys never move the user's own vector
    emb = scatter_upload(padded.upload, split.n_items, H.dim)[schema.ITEM_EMB]
    real_norm = np.linalg.norm(emb[sorted(rated)], axis=1).mean()
    decoy_norm = np.linalg.norm(emb[sorted(decoys)], axis=1).mean()
    assert 0.3 < decoy_norm / real_norm < 3  # decoys look like real rows in size


def test_local_noise_has_the_configured_std(split):
    _, (_, update) = _update(split, [4])
    clean = build_upload(update, "dense")[schema.ITEM_EMB]
    noisy = build_upload(update, "dense", local_noise_std=0.7, rng=np.random.default_rng(0))[schema.ITEM_EMB]
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
