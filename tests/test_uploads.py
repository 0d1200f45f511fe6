"""Upload modes (dense, sparse, padded), local DP noise, and the leakage audit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedrec.client.app import app as client_app
from fedrec.common import schema
from fedrec.datasets import SyntheticSpec, cohort, generate
from fedrec.datasets.splits import random_holdout
from fedrec.models import Hyper, ItemParams, UserState, local_train, training_rows
from fedrec.models.upload import build_upload, decoy_rows, scatter_upload
from fedrec.server.app import run_server
from fedrec.simulations.audit import precision_at_k, roc_auc, run_audit
from fedrec.simulations.inprocess import InProcessGrid

H = Hyper(dim=6, seed=1)


@pytest.fixture(scope="module")
def split():
    return random_holdout(generate(SyntheticSpec(users=200, items=150, density=0.08, seed=3))[0], 0.2, 3)


def _update(split, users, decoys=False, clip=0.0):
    rows = cohort(split, users)
    items = ItemParams.init(split.n_items, H, 3.0)
    state = UserState.init(np.asarray(users), split.n_users, H)
    seg, item, target = training_rows(rows, split.n_items, H, 1)
    noise = None
    if decoys:
        d_seg, d_item, d_noise = decoy_rows(rows.users, rows.train_segment, rows.train_item, split.n_items, 1.0, H, 1,
                                            item_weight=np.ones(split.n_items))
        seg, item = torch.cat([seg, torch.as_tensor(d_seg)]), torch.cat([item, torch.as_tensor(d_item)])
        target = torch.cat([target, torch.zeros(len(d_seg))])
        noise = torch.cat([torch.full((len(rows.train_item),), float("nan")), torch.as_tensor(d_noise)])
    return rows, local_train(items, state, seg, item, target, H, clip_norm=clip, decoy_noise=noise)


def test_sparse_upload_is_the_dense_one_without_the_zero_rows(split):
    rows, (_, update) = _update(split, [1, 2, 3])
    dense, sparse = build_upload(update, "dense"), build_upload(update, "sparse")
    assert set(sparse[schema.ITEM_INDEX].tolist()) == set(rows.train_item.tolist())
    for key, value in scatter_upload(sparse, split.n_items, H.dim).items():
        np.testing.assert_allclose(value, dense[key], rtol=1e-6)
    assert sparse[schema.ITEM_EMB].nbytes < dense[schema.ITEM_EMB].nbytes


def test_padded_upload_adds_unrated_decoys_without_touching_the_user(split):
    rows, (state_plain, _) = _update(split, [7])
    _, (state_padded, update) = _update(split, [7], decoys=True)
    uploaded = build_upload(update, "padded")[schema.ITEM_INDEX]
    rated = set(rows.train_item.tolist())
    decoys = set(uploaded.tolist()) - rated
    assert rated <= set(uploaded.tolist()) and len(decoys) == len(rated)
    torch.testing.assert_close(state_plain.emb, state_padded.emb)  # decoys never move the user's own vector
    emb = scatter_upload(build_upload(update, "padded"), split.n_items, H.dim)[schema.ITEM_EMB]
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
        outcome = run_server(InProcessGrid(client_app, 60), dataclasses.replace(small_cfg, update_mode=mode, rounds=3,
                                                                                eval_every=3))
        results[mode] = outcome.summary
    assert results["sparse"]["bytes_up"] < results["padded"]["bytes_up"] < results["dense"]["bytes_up"]
    assert results["sparse"]["metrics"]["rmse"] == pytest.approx(results["dense"]["metrics"]["rmse"], rel=1e-5)
    assert np.isfinite(results["padded"]["metrics"]["rmse"])


def test_auc_and_precision_known_answers():
    truth = np.array([True, False, True, False])
    assert roc_auc(np.array([0.9, 0.1, 0.8, 0.2]), truth) == 1.0
    assert roc_auc(np.array([0.1, 0.9, 0.2, 0.8]), truth) == 0.0
    assert roc_auc(np.ones(4), truth) == 0.5
    assert precision_at_k(np.array([0.9, 0.1, 0.8, 0.2]), truth, 2) == 1.0


def test_audit_sees_through_plain_uploads_and_not_through_dp(small_cfg):
    cfg = dataclasses.replace(small_cfg, synthetic_users=300, synthetic_items=120, dp="central", clipping_norm=0.1,
                              target_epsilon=2.0, users_per_round=30, sampling="poisson", epochs=10, rounds=10)
    results = {(r["observer"], r["mode"], r["dp"]): r for r in run_audit(cfg, targets=15, log=None)["results"]}
    assert results[("upload", "dense", "none")]["auc"] == 1.0
    assert results[("aggregate", "dense", "none")]["auc"] == 1.0
    assert results[("upload", "padded", "none")]["precision_at_k"] < 0.9
    assert results[("aggregate", "dense", "central")]["auc"] < 0.65
    assert results[("upload", "dense", "local")]["auc"] < 0.65
    assert results[("upload", "sparse", "local")]["auc"] == 1.0  # the row set itself leaks
