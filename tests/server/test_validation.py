"""The server trusts nothing it receives: every rejection reason, honest replies of every mode,
and a fuzz test that throws malformed replies at the strategy."""

from __future__ import annotations

import dataclasses
import math
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrec.client.app import app as client_app
from fedrec.datasets import SyntheticSpec, cohort, generate
from fedrec.datasets.splits import random_holdout
from fedrec.models.defaults import Hyper
from fedrec.models.mf import MF
from fedrec.privacy.device import device_step, new_users
from fedrec.privacy.policy import DevicePolicy
from fedrec.privacy.upload import scatter
from fedrec.run import schema
from fedrec.run.config import RunConfig
from fedrec.server.directory import NodeDirectory
from fedrec.server.federation import Federation
from fedrec.server.robust import reply_scales
from fedrec.server.runner import run_server
from fedrec.server.secagg import secagg_setup
from fedrec.server.validation import check_eval_reply, check_reply_norm, check_train_reply, reply_norm_bound
from fedrec.simulations.inprocess import InProcessGrid

N_ITEMS, DIM, C = 6, 2, 0.5
COORDS = N_ITEMS * (DIM + 1) + 1
W, EMB, BIAS, MU, INDEX = schema.WEIGHT, "item-emb", "item-bias", "global-bias", schema.ITEM_INDEX
STATISTICS = MF(Hyper(dim=DIM), N_ITEMS, (1.0, 5.0)).statistics()  # what an MF device sends


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _arrays(mode="dense", rows=(1, 4), value=0.01) -> dict[str, np.ndarray]:
    n = N_ITEMS if mode == "dense" else len(rows)
    out = {EMB: np.full((n, DIM), value, np.float32), BIAS: np.full((n, 1), value, np.float32),
           MU: np.full(1, value, np.float32)}
    return out if mode == "dense" else {INDEX: np.array(rows, np.int64), **out}


def _content(arrays=None, metrics=None, mode="dense", **records) -> RecordDict:
    arrays = _arrays(mode) if arrays is None else arrays
    metrics = {W: 2, "loss-sum": 1.0, "num-rows": 10} if metrics is None else metrics
    wrapped = {k: v if isinstance(v, Array) else Array(v) for k, v in arrays.items()}
    return RecordDict({schema.ARRAYS: ArrayRecord(wrapped), schema.METRICS: MetricRecord(metrics), **records})


def _replace(mode="dense", metrics=None, **arrays) -> RecordDict:
    base = _arrays(mode)
    base.update(arrays)
    return _content({k: v for k, v in base.items() if v is not None}, metrics)


def _bad_bytes(stype="numpy.ndarray", size=64) -> Array:
    return Array(dtype="float32", shape=(N_ITEMS, DIM), stype=stype, data=b"\x93NUMPY garbage".ljust(size, b"x"))


LOCAL = {"dp": "local", "clipping_norm": C, "noise_multiplier": 1.0}
WEIGHT_ONLY = {W: 2}
TRAIN_CASES = [  # (id, settings, reply, part of the reason)
    ("no metrics record", {},
     lambda: RecordDict({schema.ARRAYS: ArrayRecord({k: Array(v) for k, v in _arrays().items()})}), "records"),
    ("extra record", {}, lambda: _content(extra=ConfigRecord({"x": 1})), "records"),
    ("arrays under the metrics key", {},
     lambda: RecordDict({schema.ARRAYS: ArrayRecord({k: Array(v) for k, v in _arrays().items()}),
                         schema.METRICS: ArrayRecord({W: Array(np.ones(1))})}), "is a ArrayRecord"),
    ("missing array", {}, lambda: _replace(**{BIAS: None}), "arrays ["),
    ("index in a dense reply", {}, lambda: _replace(**{INDEX: np.arange(N_ITEMS)}), "arrays ["),
    ("sparse reply without index", {"update_mode": "sparse"}, lambda: _content(), "arrays ["),
    ("loss under local DP", LOCAL, lambda: _content(metrics={W: 1, "loss-sum": 1.0, "num-rows": 3}), "metrics ["),
    ("loss with decoys", {"update_mode": "padded"}, lambda: _content(mode="sparse"), "metrics ["),
    ("no user count", {}, lambda: _content(metrics={"loss-sum": 1.0, "num-rows": 3}), "metrics ["),
    ("unreadable bytes", {}, lambda: _replace(**{EMB: _bad_bytes()}), "cannot be read"),
    ("another serialization", {}, lambda: _replace(**{EMB: _bad_bytes(stype="torch")}), "cannot be read"),
    ("larger than a dense update", {}, lambda: _replace(**{EMB: np.zeros(10_000, np.float32)}), "bytes"),
    ("integer values", {}, lambda: _replace(**{EMB: np.ones((N_ITEMS, DIM), np.int32)}), "dtype"),
    ("half precision", {}, lambda: _replace(**{BIAS: np.zeros((N_ITEMS, 1), np.float16)}), "dtype"),
    ("one row too many", {}, lambda: _replace(**{EMB: np.zeros((N_ITEMS + 1, DIM), np.float32)}), "shape"),
    ("flattened", {}, lambda: _replace(**{EMB: np.zeros(N_ITEMS * DIM, np.float32)}), "shape"),
    ("two global biases", {}, lambda: _replace(**{MU: np.zeros(2, np.float32)}), "shape"),
    ("nan", {}, lambda: _replace(**{EMB: np.full((N_ITEMS, DIM), np.nan, np.float32)}), "non-finite"),
    ("inf", {}, lambda: _replace(**{MU: np.array([np.inf], np.float32)}), "non-finite"),
    ("float index", {"update_mode": "sparse"}, lambda: _replace("sparse", **{INDEX: np.array([1.0, 4.0])}), "integer"),
    ("2-D index", {"update_mode": "sparse"}, lambda: _replace("sparse", **{INDEX: np.array([[1, 4]])}), "1-D"),
    ("index -1", {"update_mode": "sparse"}, lambda: _replace("sparse", **{INDEX: np.array([-1, 4])}), "outside"),
    ("index N + 5", {"update_mode": "sparse"},
     lambda: _replace("sparse", **{INDEX: np.array([1, N_ITEMS + 5])}), "outside"),
    ("duplicate index", {"update_mode": "sparse"},
     lambda: _replace("sparse", **{INDEX: np.array([4, 4])}), "more than once"),
    ("rows unlike the index", {"update_mode": "sparse"},
     lambda: _replace("sparse", **{INDEX: np.array([1, 2, 4])}), "shape"),
    ("more users than asked", {}, lambda: _content(metrics={W: 3, "loss-sum": 1.0, "num-rows": 3}), "exceeds"),
    ("a billion users", {}, lambda: _content(metrics={W: 1e9, "loss-sum": 1.0, "num-rows": 3}), "exceeds"),
    ("negative users", {}, lambda: _content(metrics={W: -1, "loss-sum": 1.0, "num-rows": 3}), "whole number"),
    ("half a user", {}, lambda: _content(metrics={W: 1.5, "loss-sum": 1.0, "num-rows": 3}), "whole number"),
    ("nan users", {}, lambda: _content(metrics={W: math.nan, "loss-sum": 1.0, "num-rows": 3}), "whole number"),
    ("users as a list", {}, lambda: _content(metrics={W: [1, 1], "loss-sum": 1.0, "num-rows": 3}), "whole number"),
    ("users beyond float", {}, lambda: _content(metrics={W: 10**400, "loss-sum": 1.0, "num-rows": 3}), "whole number"),
    ("local DP device counting 2", LOCAL, lambda: _content(metrics={W: 2}), "exceeds"),
    ("negative loss", {}, lambda: _content(metrics={W: 2, "loss-sum": -1.0, "num-rows": 3}), "loss-sum"),
    ("infinite loss", {}, lambda: _content(metrics={W: 2, "loss-sum": math.inf, "num-rows": 3}), "loss-sum"),
    ("half a row", {}, lambda: _content(metrics={W: 2, "loss-sum": 1.0, "num-rows": 2.5}), "num-rows"),
    ("more rows than items", {},
     lambda: _content(metrics={W: 2, "loss-sum": 1.0, "num-rows": 2 * N_ITEMS * 2 + 1}), "num-rows"),
    ("no users, an update", {}, lambda: _content(metrics={W: 0, "loss-sum": 0.0, "num-rows": 0}), "0 users"),
]


@pytest.mark.parametrize("settings_, reply, reason", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_each_malformed_train_reply_is_rejected_for_its_reason(settings_, reply, reason):
    cfg = RunConfig(**settings_)
    sent = 1 if cfg.dp == "local" else 2  # a local-DP device here hosts one user
    problem = check_train_reply(reply(), sent, STATISTICS, N_ITEMS, cfg)
    assert problem is not None and reason in problem, problem


@pytest.mark.parametrize("settings_, content", [
    ({}, lambda: _content()),
    ({"update_mode": "sparse"}, lambda: _content(mode="sparse")),
    ({"update_mode": "sparse"}, lambda: _content(_arrays("sparse", rows=()))),  # a user who rated nothing here
    ({"update_mode": "padded"}, lambda: _content(mode="sparse", metrics=WEIGHT_ONLY)),
    (LOCAL, lambda: _content(metrics={W: 1})),
    (LOCAL, lambda: _content(_arrays(value=0.0), metrics={W: 0})),  # a device at its participation cap
    ({"dp": "central", "clipping_norm": C, "noise_multiplier": 1.0}, lambda: _content()),
    ({"secure_aggregation": "secagg+", "clipping_norm": C}, lambda: _content(metrics=WEIGHT_ONLY)),
    ({}, lambda: _content({k: v.astype(np.float64) for k, v in _arrays().items()})),
])
def test_the_base_replies_of_those_cases_are_accepted(settings_, content):
    """Each rejection above changes one thing in a reply like these, which pass."""
    cfg = RunConfig(**settings_)
    assert check_train_reply(content(), 1 if cfg.dp == "local" else 2, STATISTICS, N_ITEMS, cfg) is None


# ------------------------------------------------------------------ the norm bound
def test_a_reply_above_n_times_c_is_rejected_and_one_at_it_passes():
    cfg = RunConfig(dp="central", clipping_norm=C, noise_multiplier=1.0)
    assert check_reply_norm(3 * C * (1 - 1e-6), 3, cfg, COORDS) is None
    assert "exceeds" in check_reply_norm(3 * C * 1.001, 3, cfg, COORDS)
    assert "exceeds" in check_reply_norm(1e4 * C, 1, cfg, COORDS)  # accepted under central DP before
    assert "exceeds" in check_reply_norm(1e-3, 0, cfg, COORDS)  # no users, yet an update
    assert "not finite" in check_reply_norm(math.nan, 1, cfg, COORDS)
    unclipped = RunConfig()
    assert check_reply_norm(1e30, 1, unclipped, COORDS) is None  # nothing promised: robust aggregation's job
    assert "not finite" in check_reply_norm(math.inf, 1, unclipped, COORDS)


SPLIT = random_holdout(generate(SyntheticSpec(users=40, items=30, density=0.3, seed=5))[0], 0.2, 5)


def _local_dp_upload(users: list[int], z: float, mf: MF, round_: int):
    policy = DevicePolicy(clipping_norm=C, noise_std=z * C)  # noise from OS entropy, as on a device
    state = new_users(mf, np.asarray(users), SPLIT.n_users, policy)
    return device_step(mf, mf.init_server().broadcast(), state, cohort(SPLIT, np.asarray(users)), round_, policy,
                       0).upload


def test_honest_local_dp_uploads_pass_the_noise_aware_bound_and_scaled_ones_do_not():
    mf = MF(Hyper(dim=4, lr=0.5), SPLIT.n_items, SPLIT.rating_scale)
    cfg = RunConfig(dp="local", clipping_norm=C, noise_multiplier=2.0, dim=4)
    coords = SPLIT.n_items * 5 + 1
    ratios = []
    for trial in range(200):
        users = [trial % SPLIT.n_users] if trial % 2 else [trial % 40, (trial + 7) % 40, (trial + 19) % 40]
        upload = _local_dp_upload(sorted(set(users)), cfg.noise_multiplier, mf, trial + 1)
        content = _content(upload, {W: len(set(users))})
        assert check_train_reply(content, len(set(users)), mf.statistics(), SPLIT.n_items, cfg) is None
        norm = float(np.sqrt(sum((v**2).sum() for v in scatter(upload, mf.statistics(), SPLIT.n_items).values())))
        assert norm > len(set(users)) * C  # the noise is real: n·C alone would reject honest devices
        assert check_reply_norm(norm, len(set(users)), cfg, coords) is None
        ratios.append(norm / reply_norm_bound(len(set(users)), cfg, coords))
        assert "exceeds" in check_reply_norm(3 * norm, len(set(users)), cfg, coords)  # 3x: no honest device
        assert "exceeds" in check_reply_norm(1000 * norm, len(set(users)), cfg, coords)
    assert 0.4 < np.mean(ratios) < 0.8  # the tail allowance is a margin, not a blank cheque


def test_a_secagg_sum_is_checked_against_every_user_sent_and_its_rounding():
    directory = NodeDirectory(np.array([11, 22, 33], dtype=np.uint64), np.array([0, 4, 8]), np.array([4, 4, 2]),
                              population=10, num_items=N_ITEMS, rating_scale=(1.0, 5.0))
    cfg = RunConfig(secure_aggregation="secagg+", clipping_norm=C, dim=DIM, strategy="fedavg", server_lr=1.0)
    mf = MF(Hyper(dim=DIM), N_ITEMS, (1.0, 5.0))
    strategy = Federation(cfg, mf, mf.init_server("fedavg", 1.0), directory)
    strategy._sent = {11: 3, 22: 2, 33: 2}  # 7 users on 3 nodes; SecAgg+ hands back one sum, "from" node 11
    setup = secagg_setup(cfg, 3, 4, COORDS, 0.0, 10, 10)
    rounding = 3 * setup.step * math.sqrt(COORDS)
    assert reply_norm_bound(7, cfg, COORDS, setup, 3) == pytest.approx(7 * C * (1 + 1e-5) + rounding, rel=1e-9)
    value = 7 * C / math.sqrt(COORDS)  # the largest honest sum, every user pointing the same way
    before = strategy.state.params[EMB].clone()
    strategy.begin_round(1)
    strategy.aggregate_train(1, [_reply(11, _content(_arrays(value=value), {W: 7}))])
    assert "nodes_rejected" not in strategy._row
    assert np.allclose(strategy.state.params[EMB] - before, value / 7, rtol=1e-5)
    strategy.begin_round(2)
    strategy.aggregate_train(2, [_reply(11, _content(_arrays(value=value * 1.001), {W: 7}))])
    assert strategy._row["nodes_rejected"] == 1
    # distributed DP: every user's noise share rides on the sum too
    noisy = dataclasses.replace(cfg, dp="distributed", noise_multiplier=1.0)
    setup = secagg_setup(noisy, 3, 4, COORDS, 1.0, 10, 10)
    noise = setup.noise_share_std * math.sqrt(7) * (math.sqrt(COORDS) + 8)
    assert setup.noise_share_std > 0 and reply_norm_bound(7, noisy, COORDS, setup, 3) == pytest.approx(
        7 * C * (1 + 1e-5) + 3 * setup.step * math.sqrt(COORDS) + noise, rel=1e-9)


def test_norm_bound_drops_outliers_only_and_never_under_dp():
    cfg = RunConfig(robust_aggregation="norm-bound", robust_bound=10.0)
    norms, users = np.array([1.0, 2.0, 1.5, 3000.0, 0.5]), np.array([1, 2, 1, 1, 0])
    # per-user norms 1, 1, 1.5, 3000: median 1.25, so at most 12.5 per user; 0 users allow nothing
    np.testing.assert_array_equal(reply_scales(norms, users, cfg, private=False), [1, 1, 1, 0, 0])
    # the bound grows with the users a reply sums: 20 is within 2 users' bound, not 1 user's
    np.testing.assert_array_equal(reply_scales(np.array([1.0, 1, 1, 20]), np.array([1, 1, 1, 2]), cfg, False), [1] * 4)
    np.testing.assert_array_equal(reply_scales(np.array([1.0, 1, 1, 20]), np.array([1, 1, 1, 1]), cfg, False),
                                  [1, 1, 1, 0])
    np.testing.assert_array_equal(reply_scales(norms, users, cfg, private=True), np.ones(5))
    np.testing.assert_array_equal(reply_scales(norms, users, RunConfig(robust_aggregation="none"), False), np.ones(5))


# ------------------------------------------------------------------ evaluation
NO_VALIDATION = {"val-hits": 0.0, "val-ndcg": 0.0, "val-num-ranked": 0.0}  # sums of --validation-item runs
EXPLICIT = {W: 4, "sse": 8.0, "sae": 8.0, "num-ratings": 10.0, "hits": 0.0, "ndcg": 0.0, "num-ranked": 0.0,
            "recall-full": 0.0, "ndcg-full": 0.0, "num-full": 0.0, **NO_VALIDATION}
IMPLICIT = {W: 4, "sse": 0.0, "sae": 0.0, "num-ratings": 0.0, "hits": 2.0, "ndcg": 2 / math.log2(3),
            "num-ranked": 4.0, "recall-full": 1.0, "ndcg-full": 0.5, "num-full": 4.0, **NO_VALIDATION}
LOO = {"split": "loo"}
EVAL_CASES = [  # (id, settings, sums changed (None: dropped), extra records, part of the reason)
    ("an arrays record", {}, {}, {schema.ARRAYS: ArrayRecord()}, "records"),
    ("missing sum", {}, {"sse": None}, {}, "metrics ["),
    ("unknown sum", {}, {"rmse": 0.1}, {}, "metrics ["),
    ("negative sum", {}, {"sae": -1.0}, {}, ">= 0"),
    ("nan sum", {}, {"sse": math.nan}, {}, ">= 0"),
    ("list sum", {}, {"sse": [1.0, 2.0]}, {}, ">= 0"),
    ("more users than hosted", {}, {W: 5}, {}, "exceeds"),
    ("fractional count", {}, {"num-ratings": 10.5}, {}, "whole number"),
    ("fake sums: a million perfect ratings", {}, {"num-ratings": 1e6, "sse": 0.04, "sae": 0.2}, {}, "exceeds"),
    ("more ratings than 4 users hold out", {}, {"num-ratings": 4 * 20 + 1.0}, {}, "exceeds"),
    ("squared error beyond the scale", {}, {"sse": 10 * 16 + 1.0, "sae": 40.0}, {}, "sse"),
    ("sae above Cauchy-Schwarz", {}, {"sae": 10.0, "sse": 1.0}, {}, "sae"),
    ("sae below sse / range", {}, {"sse": 32.0, "sae": 4.0}, {}, "sae"),
    ("ranking sums with ratings", {}, {"hits": 1.0}, {}, "hits"),
    ("ranked count with ratings", {}, {"num-ranked": 1.0}, {}, "num-ranked"),
    ("ratings under leave-one-out", LOO, {"num-ratings": 1.0}, {}, "num-ratings"),
    ("squared error under leave-one-out", LOO, {"sse": 1.0}, {}, "sse"),
    ("two positives a user", LOO, {"num-ranked": 5.0}, {}, "num-ranked"),
    ("more hits than positives", LOO, {"hits": 5.0, "num-ranked": 4.0}, {}, "hits"),
    ("ndcg above hits", LOO, {"ndcg": 2.5}, {}, "ndcg"),
    ("ndcg below hits at rank k", LOO, {"ndcg": 2 / math.log2(11) - 0.01}, {}, "ndcg"),
    ("more full-ranking users than hosted", LOO, {"num-full": 5.0}, {}, "num-full"),
    ("validation items the run does not hold out", LOO, {"val-num-ranked": 1.0}, {}, "val-num-ranked"),
    ("two validation items a user", LOO | {"validation_item": True}, {"val-num-ranked": 5.0}, {}, "val-num-ranked"),
    ("more validation hits than items", LOO | {"validation_item": True}, {"val-num-ranked": 2.0, "val-hits": 3.0}, {},
     "val-hits"),
    ("recall above its users", LOO, {"recall-full": 4.5}, {}, "recall-full"),
    ("full ndcg above its users", LOO, {"ndcg-full": 4.5}, {}, "ndcg-full"),
]


def _eval_content(sums: dict, **records) -> RecordDict:
    return RecordDict({schema.METRICS: MetricRecord({k: v for k, v in sums.items() if v is not None}), **records})


@pytest.mark.parametrize("settings_, change, records, reason", [c[1:] for c in EVAL_CASES],
                         ids=[c[0] for c in EVAL_CASES])
def test_each_impossible_evaluation_reply_is_rejected_for_its_reason(settings_, change, records, reason):
    cfg = RunConfig(**settings_)
    base = IMPLICIT if cfg.implicit else EXPLICIT
    assert check_eval_reply(_eval_content(base), 4, cfg, (1.0, 5.0), n_items=100) is None
    problem = check_eval_reply(_eval_content(base | change, **records), 4, cfg, (1.0, 5.0), n_items=100)
    assert problem is not None and reason in problem, problem


def test_an_evaluation_reply_needs_its_metrics_record():
    assert "records" in check_eval_reply(RecordDict(), 4, RunConfig(), (1.0, 5.0), n_items=100)


# ------------------------------------------------------------------ honest replies, end to end
HONEST_MODES = {  # settings, nodes (60: one user per node, as a deployment)
    "dense": ({}, 60), "sparse": ({"update_mode": "sparse"}, 3), "padded": ({"update_mode": "padded"}, 3),
    "central DP": ({"dp": "central", "clipping_norm": 0.05, "noise_multiplier": 1.0}, 3),
    "local DP": ({"dp": "local", "clipping_norm": 0.05, "noise_multiplier": 1.0}, 60),
    "local DP cohorts": ({"dp": "local", "clipping_norm": 0.05, "noise_multiplier": 1.0}, 3),
    "SecAgg+": ({"secure_aggregation": "secagg+", "clipping_norm": 0.05}, 3),
    "distributed DP": ({"secure_aggregation": "secagg+", "dp": "distributed", "clipping_norm": 0.05,
                        "noise_multiplier": 1.0}, 3),
    "leave-one-out": ({"split": "loo", "negatives": 20}, 3),
}


@pytest.mark.parametrize("mode", list(HONEST_MODES))
def test_honest_replies_of_every_mode_pass(small_cfg, mode):
    settings_, nodes = HONEST_MODES[mode]
    cfg = dataclasses.replace(small_cfg, rounds=2, eval_every=1, users_per_round=30, **settings_)
    outcome = run_server(InProcessGrid(client_app, nodes), cfg)
    assert [line for line in outcome.audit if "dropped" in line] == []
    assert any(k in outcome.summary["metrics"] for k in ("rmse", "hr@10"))


# ------------------------------------------------------------------ fuzz
def _reply(node: int, content: RecordDict) -> Mock:
    reply = Mock(spec=Message)
    reply.has_error.return_value = False
    reply.content = content
    reply.metadata.src_node_id = node
    return reply


NODES = list(range(100, 140))


def _strategy(mode: str) -> Federation:
    directory = NodeDirectory(np.array(NODES, dtype=np.uint64), np.arange(len(NODES)) * 4, np.full(len(NODES), 4),
                              population=4 * len(NODES), num_items=N_ITEMS, rating_scale=(1.0, 5.0))
    cfg = RunConfig(clipping_norm=C, update_mode=mode, dim=DIM, robust_aggregation="norm-bound")
    mf = MF(Hyper(dim=DIM, seed=3), N_ITEMS, (1.0, 5.0))
    strategy = Federation(cfg, mf, mf.init_server(cfg.strategy, cfg.server_lr), directory)
    strategy.begin_round(1)
    strategy._sent = {n: 4 for n in NODES}
    return strategy


@st.composite
def honest_train(draw, mode: str) -> RecordDict:
    users = draw(st.integers(1, 4))
    rows = sorted(draw(st.sets(st.integers(0, N_ITEMS - 1), min_size=1))) if mode == "sparse" else range(N_ITEMS)
    values = np.array(draw(st.lists(st.floats(-1, 1), min_size=len(rows) * (DIM + 1) + 1,
                                    max_size=len(rows) * (DIM + 1) + 1)))
    values *= users * C * 0.99 / max(np.linalg.norm(values), 1.0)  # within n·C
    arrays = {EMB: values[:len(rows) * DIM].reshape(-1, DIM).astype(np.float32),
              BIAS: values[len(rows) * DIM:-1].astype(np.float32)[:, None], MU: values[-1:].astype(np.float32)}
    if mode == "sparse":
        arrays[INDEX] = np.array(rows, np.int64)
    return _content(arrays, {W: users, "loss-sum": 1.0, "num-rows": users})


BAD_VALUES = [np.nan, np.inf, -np.inf, 1e30, -1e38]


@st.composite
def malformed_train(draw, mode: str) -> RecordDict:
    """An honest reply with one definite defect (each breaks a promise the protocol makes)."""
    content = draw(honest_train(mode))
    arrays = {k: content[schema.ARRAYS][k].numpy() for k in content[schema.ARRAYS].keys()}
    metrics = dict(content[schema.METRICS])
    defect = draw(st.sampled_from(["drop", "extra", "dtype", "shape", "value", "scale", "count", "loss", "index",
                                   "record", "bytes"]))
    name = draw(st.sampled_from(sorted(arrays)))
    if defect == "drop":
        if draw(st.booleans()):
            del arrays[name]
        else:
            del metrics[draw(st.sampled_from(sorted(metrics)))]
    elif defect == "extra":
        arrays["item-emb-2" if draw(st.booleans()) else (INDEX if mode == "dense" else "extra")] = np.zeros(2)
    elif defect == "dtype":
        arrays[name] = arrays[name].astype(draw(st.sampled_from([np.int64, np.float16, np.complex64, np.bool_]))
                                           if name != INDEX else np.float64)
    elif defect == "shape":
        shape = draw(st.lists(st.integers(0, 9), max_size=3).filter(lambda s: tuple(s) != arrays[name].shape))
        arrays[name] = np.zeros(shape, arrays[name].dtype)
    elif defect == "value" and name != INDEX:
        flat = arrays[name].reshape(-1).copy()
        flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from(BAD_VALUES))
        arrays[name] = flat.reshape(arrays[name].shape)
    elif defect in ("value", "scale"):  # -1000 x: the poisoning reply; the global bias pushed past n·C for sure
        for k in (EMB, BIAS, MU):
            arrays[k] = arrays[k] * np.float32(-1000)
        arrays[MU] = arrays[MU] + np.float32(np.sign(arrays[MU][0] or 1.0) * 10 * metrics[W] * C)
    elif defect == "count":
        metrics[W] = draw(st.sampled_from([-1, 5, 1e9, 2.5, math.nan, math.inf, [1, 2], 10**400]))
    elif defect == "loss":
        key = draw(st.sampled_from(["loss-sum", "num-rows"]))
        bad_values = [-1.0, math.nan, math.inf, 1e300] if key == "num-rows" else [-1.0, math.nan, math.inf]
        metrics[key] = draw(st.sampled_from(bad_values))
    elif defect == "index":
        if mode == "dense":
            arrays[INDEX] = np.arange(N_ITEMS)
        else:
            index = arrays[INDEX].copy()
            index[draw(st.integers(0, len(index) - 1))] = draw(st.sampled_from([-1, N_ITEMS, N_ITEMS + 5, 2**40]))
            if len(index) > 1 and draw(st.booleans()):
                index[-1] = index[0]  # duplicate
            arrays[INDEX] = index
    elif defect == "record":
        return RecordDict({schema.METRICS: MetricRecord(metrics)}) if draw(st.booleans()) else \
            _content(arrays, metrics, config=ConfigRecord({"x": 1}))
    else:
        arrays[name] = _bad_bytes()
    return _content(arrays, metrics)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), mode=st.sampled_from(["dense", "sparse"]))
def test_malformed_replies_change_nothing_the_honest_ones_would_not(data, mode):
    honest = data.draw(st.lists(honest_train(mode), min_size=1, max_size=4))
    bad = data.draw(st.lists(malformed_train(mode), min_size=1, max_size=6))
    order = data.draw(st.permutations(["h"] * len(honest) + ["b"] * len(bad)))
    mixed, hi, bi = [], iter(honest), iter(bad)
    for kind in order:
        mixed.append(next(hi) if kind == "h" else next(bi))
    attacked, clean = _strategy(mode), _strategy(mode)
    attacked.aggregate_train(1, [_reply(n, c) for n, c in zip(NODES, mixed)])
    honest_nodes = [n for n, kind in zip(NODES, order) if kind == "h"]
    clean.aggregate_train(1, [_reply(n, c) for n, c in zip(honest_nodes, honest)])
    assert attacked._row["nodes_rejected"] == len(bad) and "skipped" not in attacked._row
    for key, value in attacked.state.model().items():
        assert np.isfinite(value).all()
        np.testing.assert_array_equal(value, clean.state.model()[key], err_msg=key)

    sums = EXPLICIT | {"sse": 3.0, "sae": 3.0, "num-ratings": 4.0}  # what 4 users can hold out of 6 items
    good = [_eval_content(sums) for _ in honest]
    evil = [_eval_content(sums | {data.draw(st.sampled_from(sorted(sums))):
                                      data.draw(st.sampled_from([-1.0, math.nan, math.inf, 1e12, 10**400, [1.0]]))})
            for _ in bad]
    metrics = attacked.aggregate_evaluate(1, [_reply(n, c) for n, c in zip(NODES, good + evil)])
    expected = clean.aggregate_evaluate(1, [_reply(n, c) for n, c in zip(NODES, good)])
    assert dict(metrics) == dict(expected)


def test_values_beyond_float32_are_rejected_not_applied_as_inf():
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from fedrec.run import schema as s
    from fedrec.server.validation import check_train_reply

    n_items, dim = 4, 2
    arrays = {EMB: np.full((n_items, dim), 1e39), BIAS: np.zeros((n_items, 1)), MU: np.zeros(1)}
    content = RecordDict({s.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          s.METRICS: MetricRecord({s.WEIGHT: 1, "loss-sum": 0.0, "num-rows": 1})})
    statistics = MF(Hyper(dim=dim), n_items, (1.0, 5.0)).statistics()
    assert "float32" in check_train_reply(content, 1, statistics, n_items, RunConfig(dim=dim))


def test_under_local_dp_a_noise_free_poison_on_one_coordinate_is_rejected():
    from fedrec.server.validation import check_reply_norm, check_reply_peak

    cfg = RunConfig(dp="local", clipping_norm=0.05, noise_multiplier=1.0)
    coords = 1682 * 33 + 1
    spike = 12.0  # inside the norm bound (which leaves room for the noise), far above any honest coordinate
    assert check_reply_norm(spike, 1, cfg, coords) is None
    assert "coordinate" in check_reply_peak(spike, 1, cfg, coords)
    honest = np.abs(np.random.default_rng(0).normal(0, 0.05, coords)).max() + 0.05
    assert check_reply_peak(honest, 1, cfg, coords) is None
