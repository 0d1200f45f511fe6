"""One contract, run against every algorithm in the registry: federated equals central, the clipping
bound holds on what is summed, a cohort's sum is the sum of its users' uploads, the upload holds only
the declared statistics, and the server's state survives a checkpoint."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrec.client.app import app as client_app
from fedrec.datasets import cohort
from fedrec.models.algorithm import DECOYS
from fedrec.models.registry import ALGORITHMS
from fedrec.privacy.device import DevicePolicy, device_step, new_users
from fedrec.privacy.upload import ITEM_INDEX, UPDATE_MODES, scatter
from fedrec.run.build import load_data, make_algorithm
from fedrec.run.config import RunConfig
from fedrec.server.runner import run_server
from fedrec.simulations.central import run_central
from fedrec.simulations.inprocess import InProcessGrid

NAMES = sorted(ALGORITHMS)
IMPLICIT_ONLY = {"split": "loo", "negatives": 10}  # the data of algorithms that model no ratings


def _data(name: str) -> dict:
    return {} if ALGORITHMS[name].rating_feedback else IMPLICIT_ONLY


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _cfg(name: str, tmp_path, **changes) -> RunConfig:
    base = RunConfig(dataset="synthetic", synthetic_users=60, synthetic_items=40, synthetic_density=0.2, model=name,
                     dim=6, rounds=4, epochs=4, eval_every=2, out=str(tmp_path / "run"), **_data(name))
    return dataclasses.replace(base, **changes)


def _device(name: str, **changes):
    cfg = RunConfig(dataset="synthetic", synthetic_users=30, synthetic_items=25, synthetic_density=0.3, model=name,
                    dim=4, **_data(name), **changes).resolved()
    split = load_data(cfg)
    return cfg, split, make_algorithm(cfg, split.n_items, split.rating_scale)


@pytest.mark.parametrize("name", [n for n in NAMES if ALGORITHMS[n].rating_feedback])
def test_federated_equals_central(name, tmp_path):
    cfg = _cfg(name, tmp_path)
    federated = run_server(InProcessGrid(client_app, 3), cfg).summary["metrics"]
    central = run_central(dataclasses.replace(cfg, out=str(tmp_path / "central"))).summary["metrics"]
    for metric, value in federated.items():
        assert value == pytest.approx(central[metric], rel=1e-5), metric


@pytest.mark.parametrize("name", [n for n in NAMES if ALGORITHMS[n].implicit_feedback])
def test_federated_equals_central_on_implicit_feedback(name, tmp_path):
    cfg = _cfg(name, tmp_path, split="loo", negatives=10)
    federated = run_server(InProcessGrid(client_app, 3), cfg).summary["metrics"]
    central = run_central(dataclasses.replace(cfg, out=str(tmp_path / "central"))).summary["metrics"]
    for metric, value in federated.items():
        assert value == pytest.approx(central[metric], rel=1e-5), metric


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(NAMES), clip=st.floats(1e-4, 10.0), round_=st.integers(1, 5),
       mode=st.sampled_from(UPDATE_MODES))
def test_the_clipping_bound_holds_on_what_each_user_adds_to_the_sum(name, clip, round_, mode):
    """Each user alone through the device step: the norm of everything its upload adds (before device
    noise, which is accounted separately) is at most C, whatever the algorithm and upload shape."""
    cfg, split, algorithm = _device(name)
    if mode == "padded" and DECOYS in algorithm.refuses:
        mode = "sparse"
    policy = DevicePolicy(update_mode=mode, clipping_norm=clip)
    model = algorithm.init_server("fedavg", 1.0).broadcast()
    for user in range(0, split.n_users, 7):
        rows = cohort(split, [user])
        state = new_users(algorithm, rows.users, split.n_users, policy)
        result = device_step(algorithm, model, state, rows, round_, policy, cfg.seed)
        dense = scatter(result.upload, algorithm.statistics(), split.n_items)
        norm = np.sqrt(sum(float(np.square(v).sum()) for v in dense.values()))
        assert norm <= clip * (1 + 1e-6), (name, user, norm)


@pytest.mark.parametrize("name", NAMES)
def test_a_cohort_sends_the_sum_of_its_users_uploads(name):
    cfg, split, algorithm = _device(name)
    policy = DevicePolicy(clipping_norm=0.5)
    model = algorithm.init_server("fedavg", 1.0).broadcast()
    users = np.arange(12)
    rows = cohort(split, users)
    together = device_step(algorithm, model, new_users(algorithm, users, split.n_users, policy), rows, 2, policy,
                           cfg.seed).upload
    alone = [device_step(algorithm, model, new_users(algorithm, np.array([u]), split.n_users, policy),
                         cohort(split, [u]), 2, policy, cfg.seed).upload for u in users]
    for name_ in together:
        np.testing.assert_allclose(together[name_], sum(a[name_].astype(np.float64) for a in alone), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", UPDATE_MODES)
def test_the_upload_holds_only_the_declared_statistics(name, mode):
    cfg, split, algorithm = _device(name)
    if mode == "padded" and DECOYS in algorithm.refuses:
        pytest.skip(f"{name} refuses decoys")
    policy = DevicePolicy(update_mode=mode)
    rows = cohort(split, np.arange(5))
    result = device_step(algorithm, algorithm.init_server("fedavg", 1.0).broadcast(),
                         new_users(algorithm, rows.users, split.n_users, policy), rows, 1, policy, cfg.seed)
    statistics = algorithm.statistics()
    expected = set(statistics) | ({ITEM_INDEX} if mode != "dense" else set())
    assert set(result.upload) == expected
    listed = len(result.upload[ITEM_INDEX]) if mode != "dense" else split.n_items
    for stat_name, stat in statistics.items():
        shape = (listed, stat.width) if stat.per_item else (stat.width,)
        assert result.upload[stat_name].shape == shape, stat_name


@pytest.mark.parametrize("name", NAMES)
def test_the_server_state_survives_a_checkpoint(name):
    """A fresh server state loaded from another's arrays broadcasts and releases the same, and takes the
    same next step."""
    cfg, split, algorithm = _device(name)
    first = algorithm.init_server("fedadam", 0.05)
    policy = DevicePolicy()
    rows = cohort(split, np.arange(split.n_users))
    state = new_users(algorithm, rows.users, split.n_users, policy)
    for round_ in (1, 2):
        result = device_step(algorithm, first.broadcast(), state, rows, round_, policy, cfg.seed)
        state = result.state
        algorithm.server_step(first, result.sums.arrays, float(result.sums.num_users), round_)
    second = algorithm.init_server("fedadam", 0.05)
    second.load(first.arrays())
    for a, b in ((first.broadcast(), second.broadcast()), (first.model(), second.model())):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    result = device_step(algorithm, first.broadcast(), state, rows, 3, policy, cfg.seed)
    for server in (first, second):
        algorithm.server_step(server, {k: v.clone() for k, v in result.sums.arrays.items()},
                              float(result.sums.num_users), 3)
    assert all(torch.equal(torch.as_tensor(first.model()[k]), torch.as_tensor(second.model()[k]))
               for k in first.model())
