"""One device's view of a run: its ratings, its kept (or re-fitted) vector, its uploads and epsilon."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from fedrec.client import controls, storage, uploads
from fedrec.client.app import app as client_app
from fedrec.client.storage import ENV_DIR
from fedrec.datasets import cohort
from fedrec.models.factors import GLOBAL_BIAS, ITEM_BIAS, ITEM_EMB
from fedrec.models.saved import load_model
from fedrec.personal import device_sent as dv_sent
from fedrec.personal import device_view as dv
from fedrec.privacy.upload import ITEM_INDEX
from fedrec.run.build import load_data, make_algorithm
from fedrec.run.config import ConfigError
from fedrec.server.runner import privacy_plan, run_server
from fedrec.server.sampling import sample_users, sampling_rng
from fedrec.simulations.federated import device_dir
from fedrec.simulations.inprocess import InProcessGrid


def _kept_run(small_cfg, tmp_path, monkeypatch, **changes):
    run = tmp_path / "run"
    cfg = dataclasses.replace(small_cfg, rounds=4, eval_every=2, users_per_round=20, checkpoint_every=1,
                              keep_checkpoints=True, out=str(run), **changes)
    monkeypatch.setenv(ENV_DIR, str(device_dir(run)))
    run_server(InProcessGrid(client_app, 2), cfg)
    rounds = {}
    for round_ in range(1, 5):
        for user in sample_users(60, 20, "fixed", sampling_rng(cfg, round_)):
            rounds.setdefault(int(user), []).append(round_)
    return cfg, run, rounds


def _uploaded(run, times: int) -> int:
    """A user of node 0 whose device logged at least `times` uploads."""
    (series,) = controls.series_dirs(device_dir(run) / "node-0")
    return next(u for u in range(30) if len(uploads.of_user(series, u)) >= times)


def test_a_user_sees_its_ratings_its_kept_vector_and_each_upload(small_cfg, tmp_path, monkeypatch):
    cfg, run, rounds = _kept_run(small_cfg, tmp_path, monkeypatch)
    user = next(u for u in range(30) if len(rounds.get(u, [])) >= 2)
    view = dv.device_view(run, str(user))
    rows = cohort(load_data(cfg), [user])
    assert view.ratings == [(f"item {i}", float(r)) for i, r in zip(rows.train_item, rows.train_rating)]
    (series,) = controls.series_dirs(device_dir(run) / "node-0")
    np.testing.assert_array_equal(view.vector, storage.load(series, 4)[2]["emb"][user])
    assert view.vector_source == dv.FROM_STATE and not view.opted_out and not view.erased
    assert [u.round for u in view.uploads] == rounds[user]
    n_items = load_data(cfg).n_items
    assert view.uploads[0].arrays == [(ITEM_EMB, (n_items, cfg.dim), 4 * n_items * cfg.dim),
                                      (ITEM_BIAS, (n_items, 1), 4 * n_items), (GLOBAL_BIAS, (1,), 4)]
    assert all(u.norm > 0 and u.clipped_norm <= u.norm and u.noise == "none" and u.epsilon is None
               and not u.secure_aggregation for u in view.uploads)
    assert view.epsilon is None and "user vector" in view.never_uploaded
    sent = " | ".join(view.also_sent)  # what else left the device, besides the uploads listed
    assert "num-rows" in sent and "loss-sum" in sent and "nonzero rows of each dense upload" in sent
    assert "each evaluation round (every 2 rounds), sums over this user's held-out ratings" in sent
    assert "until its opt-out" not in sent and "un-noised (the server adds" not in sent
    assert view.bytes_stored > 4 * cfg.dim and "audit.jsonl lists the arrays of all" in view.audit_evidence


def test_a_user_that_never_trained_or_a_run_without_device_state_gets_a_refitted_vector(small_cfg, tmp_path,
                                                                                        monkeypatch):
    cfg, run, rounds = _kept_run(small_cfg, tmp_path, monkeypatch)
    never = next(u for u in range(60) if u not in rounds)
    split = load_data(cfg)
    rows = cohort(split, [never])
    model = {k: torch.as_tensor(v) for k, v in load_model(run).items()}
    fit = make_algorithm(cfg, split.n_items, split.rating_scale).fit_user(model, rows.train_item, rows.train_rating)
    view = dv.device_view(run, str(never))
    assert view.vector_source == dv.NEVER_TRAINED and view.uploads == []
    np.testing.assert_allclose(view.vector, fit.emb[0])
    shutil.rmtree(device_dir(run))
    view = dv.device_view(run, str(min(rounds)))
    assert view.vector_source == dv.REFITTED and view.uploads == []


def test_a_sparse_upload_lists_the_rows_it_carried(small_cfg, tmp_path, monkeypatch):
    cfg, run, rounds = _kept_run(small_cfg, tmp_path, monkeypatch, update_mode="sparse")
    user = min(rounds)
    (first, *_) = dv.device_view(run, str(user)).uploads
    n = len(cohort(load_data(cfg), [user]).train_item)  # every rated item's row moves
    assert first.arrays[0] == (ITEM_INDEX, (n,), 8 * n) and first.arrays[1][1] == (n, cfg.dim)


def test_local_dp_epsilon_composes_over_the_users_own_rounds(small_cfg, tmp_path, monkeypatch):
    cfg, run, rounds = _kept_run(small_cfg, tmp_path, monkeypatch, dp="local", clipping_norm=0.5,
                                 noise_multiplier=2.0, max_rounds_per_user=4)
    user = _uploaded(run, 2)  # DP sampling draws from OS entropy: ask the devices who took part
    view = dv.device_view(run, str(user))
    assert len(view.uploads) >= 2
    plan = privacy_plan(dataclasses.replace(cfg, max_rounds_per_user=4), 60)[1]
    assert [u.epsilon for u in view.uploads] == [plan.epsilon(k) for k in range(1, len(view.uploads) + 1)]
    assert view.epsilon == view.uploads[-1].epsilon and view.uploads[0].noise.startswith("local")
    assert "check_train_reply" in view.audit_evidence and not (run / "audit.jsonl").exists()


def test_central_dp_uploads_carry_the_runs_epsilon_after_their_round(small_cfg, tmp_path, monkeypatch):
    _, run, rounds = _kept_run(small_cfg, tmp_path, monkeypatch, dp="central", clipping_norm=0.5,
                               noise_multiplier=1.0)
    epsilon = dict(pd.read_csv(run / "metrics.csv")[["round", "epsilon"]].values)
    view = dv.device_view(run, str(_uploaded(run, 1)))
    assert view.uploads and all(u.epsilon == epsilon[u.round] and u.noise.startswith("central")
                                for u in view.uploads)
    assert view.epsilon == json.loads((run / "summary.json").read_text())["privacy"]["epsilon"]
    assert any("not against the server" in line for line in view.also_sent)  # it saw the un-noised update
    assert any("nonzero rows of each dense upload" in line for line in view.also_sent)  # the server sees them


def test_a_sparse_upload_lists_the_rated_items_and_local_dp_sends_no_row_count(small_cfg, tmp_path, monkeypatch):
    _, run, _ = _kept_run(small_cfg, tmp_path, monkeypatch, update_mode="sparse")
    sent = " | ".join(dv.device_view(run, str(_uploaded(run, 1))).also_sent)
    assert "item-index lists the items this user rated" in sent and "num-rows" in sent
    _, run, _ = _kept_run(small_cfg, tmp_path / "ldp", monkeypatch, dp="local", clipping_norm=0.5,
                          noise_multiplier=1.0)
    sent = " | ".join(dv.device_view(run, str(_uploaded(run, 1))).also_sent)
    assert "num-rows" not in sent and "nonzero rows" not in sent and "held-out ratings" in sent


def test_the_audit_evidence_reports_a_user_side_array_if_a_reply_ever_carried_one(small_cfg, tmp_path, monkeypatch):
    _, run, _ = _kept_run(small_cfg, tmp_path, monkeypatch)
    with open(run / "audit.jsonl", "a") as audit:
        audit.write(json.dumps({"round": 5, "arrays": {"user-emb": {"shape": [8]}}}) + "\n")
    assert "user-emb: not only item-side arrays" in dv.device_view(run, "3").audit_evidence


def test_controls_show_in_the_view_and_erase_empties_it(small_cfg, tmp_path, monkeypatch):
    _, run, rounds = _kept_run(small_cfg, tmp_path, monkeypatch)
    user = str(min(rounds))
    dv.set_consent(run, user, train=False)
    view = dv.device_view(run, user)
    assert view.opted_out and "until its opt-out" in " ".join(view.also_sent)
    assert view.also_sent[-1] == dv_sent.LOOKS_LIKE_A_FAILURE
    dv.erase_device(run, user)
    view = dv.device_view(run, user)
    assert view.erased and not view.opted_out and view.ratings == [] and view.uploads == []
    assert view.bytes_stored == 0 and not view.vector.any() and view.vector_source == dv.ERASED


def test_an_unknown_user_or_a_directory_without_a_model_is_a_config_error(small_cfg, tmp_path, monkeypatch):
    _, run, _ = _kept_run(small_cfg, tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match="unknown user 'nobody'"):
        dv.device_view(run, "nobody")
    with pytest.raises(ConfigError, match="has no model.npz"):
        dv.device_view(tmp_path, "1")


def test_movielens_ratings_show_their_titles(shared_data, tmp_path, monkeypatch):
    from fedrec.run.config import RunConfig

    run = tmp_path / "run"
    cfg = RunConfig(dataset="ml-100k", split="u1", data_dir=str(shared_data), rounds=1, dim=8, users_per_round=20,
                    keep_checkpoints=True, out=str(run))
    monkeypatch.setenv(ENV_DIR, str(device_dir(run)))
    run_server(InProcessGrid(client_app, 2, data_dir=str(shared_data)), cfg)
    view = dv.device_view(run, "1")  # ML-100K's own id of its first user
    assert ("Toy Story (1995)", 5.0) in view.ratings and len(view.ratings) == len(
        cohort(load_data(cfg), [0]).train_item)


def test_a_central_run_has_no_device_trail_and_a_refitted_vector(small_cfg):
    from fedrec.simulations.central import run_central

    run = run_central(dataclasses.replace(small_cfg, epochs=2)).run_dir
    view = dv.device_view(run, "3")
    assert view.vector_source == dv.REFITTED and view.uploads == [] and view.epsilon is None
    assert view.audit_evidence.startswith("a central run")
    assert view.never_uploaded == [] and view.also_sent == [dv_sent.CENTRAL]
    assert "pooled on one server" in dv_sent.CENTRAL


def test_under_secure_aggregation_an_upload_is_the_masked_dense_update_and_the_user_count():
    from fedrec.privacy.secagg import COUNT, secure_order
    from fedrec.run.config import RunConfig

    cfg = RunConfig(secure_aggregation="secagg+", update_mode="dense", dim=4, model="mf")
    statistics = make_algorithm(cfg, 10, (1.0, 5.0)).statistics()
    arrays = dv.upload_arrays(cfg, statistics, 10, 3)
    assert [a[0] for a in arrays] == secure_order(statistics) and arrays[0][1:] == ((10, 4), 8 * 40)
    assert arrays[-1] == (COUNT, (1,), 8)
