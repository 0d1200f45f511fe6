"""The published federated recommenders (PFedRec, FedRecon, FCF) beyond the contract every algorithm meets
(tests/models/test_algorithms.py): FedRecon's devices keep nothing, FCF's two statistics rebuild its gradient,
each runs through the in-process federation with the privacy options it admits, and the leave-one-out
protocol of their papers (a validation item, the best-validation round, the papers' negatives)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from fedrec.client.app import app as client_app
from fedrec.datasets import cohort
from fedrec.models.algorithm import DeviceKeys
from fedrec.models.fcf import ITEM_GRAD, USER_GRAM
from fedrec.models.metrics import reported
from fedrec.privacy.device import ROUNDS, DevicePolicy, device_step, new_users
from fedrec.run.build import load_data, make_algorithm
from fedrec.run.config import ConfigError, RunConfig
from fedrec.server.runner import run_server
from fedrec.simulations.central import run_central
from fedrec.simulations.inprocess import InProcessGrid

BASELINES = ("pfedrec", "fedrecon", "fcf")


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _loo(tmp_path, model: str, **changes) -> RunConfig:
    base = RunConfig(dataset="synthetic", synthetic_users=60, synthetic_items=60, synthetic_density=0.25, split="loo",
                     negatives=20, model=model, dim=6, rounds=4, epochs=4, eval_every=1, out=str(tmp_path / "run"))
    return dataclasses.replace(base, **changes)


def _device(model: str, split: str = "loo"):
    cfg = RunConfig(dataset="synthetic", synthetic_users=30, synthetic_items=25, synthetic_density=0.3, split=split,
                    negatives=5, model=model, dim=4).resolved()
    split_ = load_data(cfg)
    return cfg, split_, make_algorithm(cfg, split_.n_items, split_.rating_scale)


# ---------------------------------------------------------------- FedRecon: stateless devices
@pytest.mark.parametrize("split", ["random", "loo"])
def test_fedrecon_devices_keep_nothing_between_rounds(split):
    """A FedRecon device's state holds its participation count only, and a round's upload is the same whether
    the device took part before or starts afresh. Positive control: MF's upload depends on its carried state."""
    for model, stateless in (("fedrecon", True), ("mf", False)):
        cfg, data, algorithm = _device(model, split)
        policy = DevicePolicy()
        rows = cohort(data, np.arange(data.n_users))
        shared = algorithm.init_server("fedavg", 1.0).broadcast()
        first = device_step(algorithm, shared, new_users(algorithm, rows.users, data.n_users, policy), rows, 1,
                            policy, cfg.seed)
        carried = device_step(algorithm, shared, first.state, rows, 2, policy, cfg.seed).upload
        fresh = device_step(algorithm, shared, new_users(algorithm, rows.users, data.n_users, policy), rows, 2, policy,
                            cfg.seed).upload
        same = all(np.array_equal(carried[k], fresh[k]) for k in carried)
        assert same == stateless, model
        if stateless:
            assert set(first.state) == {ROUNDS}


def test_fedrecon_reconstructs_the_ridge_solution_of_its_rows():
    """On ratings, the reconstructed vector is local training's objective minimized exactly (MF's fit_user,
    the single-user ridge regression)."""
    cfg, data, algorithm = _device("fedrecon", "random")
    shared = {k: torch.as_tensor(v) for k, v in algorithm.init_server("fedavg", 1.0).broadcast().items()}
    rows = cohort(data, np.arange(5))
    users = algorithm.reconstruct(shared, torch.as_tensor(rows.train_segment), torch.as_tensor(rows.train_item),
                                  torch.as_tensor(rows.train_rating), 5)
    for j in range(5):
        mine = rows.train_segment == j
        alone = algorithm.fit_user(shared, rows.train_item[mine], rows.train_rating[mine])
        np.testing.assert_allclose(users.emb[j].numpy(), alone.emb[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(float(users.bias[j]), float(alone.bias[0]), atol=1e-5)


# ---------------------------------------------------------------- FCF: the gradient it rebuilds
def test_fcf_rebuilds_the_gradient_of_confidence_weighted_als():
    """The server's mean gradient from (sum x x^T, corrections) equals autograd's gradient of the paper's loss
    over every item, with each user's x_u solved in closed form."""
    cfg, data, algorithm = _device("fcf")
    server = algorithm.init_server("fedavg", 1.0)
    y0 = server.params["item-emb"].detach().clone()
    rows = cohort(data, np.arange(data.n_users))
    policy = DevicePolicy()
    result = device_step(algorithm, server.broadcast(), new_users(algorithm, rows.users, data.n_users, policy), rows,
                         1, policy, cfg.seed)
    algorithm.server_step(server, result.sums.arrays, float(data.n_users), 1)
    step = (server.params["item-emb"] - y0).double()  # fedavg at lr 1: minus the mean gradient

    y = y0.double().requires_grad_(True)
    x = algorithm.solve_users(y0, rows.train_segment, rows.train_item, data.n_users)
    p = torch.zeros(data.n_users, data.n_items, dtype=torch.float64)
    p[rows.train_segment, rows.train_item] = 1.0
    c = 1 + cfg.confidence * p
    loss = (c * (p - x @ y.T) ** 2).sum() / data.n_users + cfg.reg_item * (y ** 2).sum()
    loss.backward()
    np.testing.assert_allclose(step.numpy(), -y.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert set(result.sums.arrays) == {ITEM_GRAD, USER_GRAM}


def test_fcf_solves_each_user_exactly():
    """x_u minimizes the user's confidence-weighted loss with the items fixed: its gradient there is zero."""
    cfg, data, algorithm = _device("fcf")
    y = algorithm.init_server().params["item-emb"].double()
    rows = cohort(data, [3])
    x = algorithm.solve_users(y, rows.train_segment, rows.train_item, 1).requires_grad_(True)
    p = torch.zeros(data.n_items, dtype=torch.float64)
    p[rows.train_item] = 1.0
    loss = ((1 + cfg.confidence * p) * (p - y @ x[0]) ** 2).sum() + cfg.reg_user * (x ** 2).sum()
    loss.backward()
    assert float(x.grad.abs().max()) < 1e-8


# ---------------------------------------------------------------- each through the federation
@pytest.mark.parametrize("model", BASELINES)
def test_each_runs_through_the_in_process_federation_and_learns(model, tmp_path):
    """Every round through the real server and ClientApp; the training loss falls and the model holds
    what the algorithm's server releases."""
    outcome = run_server(InProcessGrid(client_app, 3), _loo(tmp_path, model, rounds=8, eval_every=8))
    losses = [row["train_loss"] for row in outcome.history]
    assert losses[-1] < losses[0], (model, losses)
    assert set(outcome.model) == set(make_algorithm(_loo(tmp_path, model), 60, (1.0, 5.0)).init_server().model())
    metrics = outcome.summary["metrics"]
    assert 0.0 <= metrics["hr@10"] <= 1.0 and np.isfinite(metrics["ndcg@10"])


@pytest.mark.parametrize("model", BASELINES)
@pytest.mark.parametrize("privacy", [dict(dp="central", clipping_norm=0.5, noise_multiplier=0.5),
                                     dict(dp="local", clipping_norm=0.5, noise_multiplier=0.5),
                                     dict(update_mode="sparse", users_per_round=20)])
def test_the_privacy_options_each_admits_run_through_the_pipeline(model, privacy, tmp_path):
    cfg = _loo(tmp_path, model, rounds=2, **privacy)
    summary = run_server(InProcessGrid(client_app, 2), cfg).summary
    assert np.isfinite(summary["metrics"]["hr@10"])
    if "dp" in privacy:
        assert summary["privacy"]["epsilon"] > 0


@pytest.mark.parametrize("model", ["pfedrec", "fcf"])
def test_implicit_only_algorithms_refuse_ratings(model):
    with pytest.raises(ConfigError, match="implicit feedback only"):
        RunConfig(model=model, split="random").validate()


@pytest.mark.parametrize("model", ["pfedrec", "fcf"])
def test_padded_uploads_are_refused_where_decoys_are(model):
    with pytest.raises(ConfigError, match="refuses"):
        RunConfig(model=model, split="loo", update_mode="padded").validate()


def test_pfedrec_scores_through_its_own_view_of_the_items(tmp_path):
    """Dual personalization: a device's view (the shared items fine-tuned on its rows) ranks otherwise than
    the shared items alone, and the score function is the user's own after a round."""
    cfg, data, algorithm = _device("pfedrec")
    policy = DevicePolicy()
    rows = cohort(data, np.arange(data.n_users))
    model = {k: torch.as_tensor(v) for k, v in algorithm.init_server().model().items()}
    state = new_users(algorithm, rows.users, data.n_users, policy)
    assert torch.equal(state["emb"][0], state["emb"][1])  # one public start, as the official code's
    trained = device_step(algorithm, algorithm.init_server().broadcast(), state, rows, 1, policy, cfg.seed).state
    assert not torch.equal(trained["emb"][0], trained["emb"][1])
    personal = algorithm.scores(model, trained, rows)
    shared = trained["emb"] @ model["item-emb"].T + trained["bias"][:, None]
    assert not torch.allclose(personal, shared)


# ---------------------------------------------------------------- the papers' protocol
def test_a_validation_item_is_held_out_beside_the_test_item():
    cfg = RunConfig(dataset="synthetic", synthetic_users=40, synthetic_items=50, synthetic_density=0.3, split="loo",
                    negatives=10)
    plain, held = load_data(cfg), load_data(dataclasses.replace(cfg, validation_item=True))
    assert held.test_validation.sum() == len(plain.test) and len(held.test) == 2 * len(plain.test)
    assert len(held.train) == len(plain.train) - len(plain.test)
    test, validation = held.test_validation == 0, held.test_validation == 1
    assert np.array_equal(held.test.item[test], plain.test.item)
    for user in held.test.user[validation]:  # the validation item: the user's latest training interaction
        kept = plain.train.timestamp[plain.train.user == user]
        assert held.test.timestamp[validation & (held.test.user == user)][0] == kept.max()
    assert held.test_negatives.shape == (len(held.test), 10)


def test_the_reported_row_is_the_best_validation_one():
    history = [{"round": 1, "val-hr@10": 0.2, "hr@10": 0.9}, {"round": 2, "val-hr@10": 0.5, "hr@10": 0.3},
               {"round": 3, "val-hr@10": 0.5, "hr@10": 0.4}, {"round": 4, "val-hr@10": 0.1, "hr@10": 0.8}]
    assert reported(history)[0]["round"] == 3  # the latest of equals, as PFedRec's code
    assert reported([{"round": 1, "hr@10": 0.9}, {"round": 2, "hr@10": 0.3}])[0]["round"] == 2  # no validation


@pytest.mark.parametrize("model", ["pfedrec", "mf"])
def test_runs_report_the_test_metrics_of_their_best_validation_round(model, tmp_path):
    cfg = _loo(tmp_path, model, validation_item=True, rounds=5, epochs=5)
    federated = run_server(InProcessGrid(client_app, 2), cfg)
    central = run_central(dataclasses.replace(cfg, out=str(tmp_path / "central")))
    for summary, history, step in ((federated.summary, federated.history, "round"),
                                   (central.summary, central.result.history, "epoch")):
        rows = [row for row in history if "val-hr@10" in row]
        assert len(rows) == 5
        best = max(rows, key=lambda row: (row["val-hr@10"], row[step]))
        assert summary[f"reported_{step}"] == best[step]
        assert summary["metrics"]["hr@10"] == pytest.approx(best["hr@10"])
    for metric, value in federated.summary["metrics"].items():
        assert value == pytest.approx(central.summary["metrics"][metric], rel=1e-5), metric


def test_the_papers_negatives_skip_held_out_items_and_ours_do_not():
    """--heldout-not-negative: no training negative is a held-out item. Positive control: without it, on
    dense data, some are (a device samples from what it has not trained on)."""
    for skip in (True, False):
        cfg = RunConfig(dataset="synthetic", synthetic_users=60, synthetic_items=20, synthetic_density=0.5,
                        split="loo", negatives=5, validation_item=True, heldout_not_negative=skip, model="mf",
                        train_negatives=8).resolved()
        data = load_data(cfg)
        algorithm = make_algorithm(cfg, data.n_items, data.rating_scale)
        rows = cohort(data, np.arange(data.n_users))
        seg, item, target = algorithm.training_rows(rows, 1, DeviceKeys(cfg.seed))
        negative = set(zip(rows.users[seg[target == 0].numpy()], item[target == 0].numpy()))
        held = set(zip(rows.users[rows.test_segment], rows.test_item))
        assert bool(negative & held) != skip
