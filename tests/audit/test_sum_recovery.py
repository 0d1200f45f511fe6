"""The SecAgg+ sum of a run without DP hides who rated what only if the server cannot
regenerate the devices' starting vectors: the sparse-recovery attack on one round's sum
(simulations/sum_recovery.py) fails with private starting vectors and wins without them."""

from __future__ import annotations

import pytest
from flwr.supercore.task_identity import TaskIdentity

from fedrec.audit.sum_recovery import attack_precision, secagg_only, secure_first_round
from fedrec.run.config import RunConfig


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _u1(shared_data, **changes) -> RunConfig:
    return secagg_only(RunConfig(dataset="ml-100k", data_dir=str(shared_data), split="u1", users_per_round=100,
                                 clipping_norm=0.05, users_per_node=100, rounds=1), **changes)


def test_sum_recovery_fails_against_private_starting_vectors(shared_data):
    cfg = _u1(shared_data)
    precision, claimed = attack_precision(secure_first_round(cfg), cfg)
    assert precision <= 0.1, f"{claimed} pairs claimed at precision {precision:.2f}"


def test_sum_recovery_wins_with_seeded_starting_vectors(shared_data):
    """Positive control: with --reproducible-noise the devices start from the seeded population
    matrix, and the same attack reads thousands of (user, item) pairs out of the sum."""
    cfg = _u1(shared_data, reproducible_noise=True)
    precision, claimed = attack_precision(secure_first_round(cfg), cfg)
    assert precision >= 0.8 and claimed >= 1000, f"{claimed} pairs claimed at precision {precision:.2f}"
