"""End-to-end runs through the real engines: Flower's Ray simulation, `flwr run .` on a
SuperLink, and SuperLink + SuperNodes on loopback (one user per node, the deployment
shape). Each test starts what it needs on 127.0.0.1 and stops it by PID."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrec.client.app import app as client_app
from fedrec.deploy.loopback import Processes, flower_env, flwr_run, free_port, start_federation, wait_for_port
from fedrec.run import schema
from fedrec.run.build import load_data
from fedrec.run.config import RunConfig
from fedrec.server.runner import run_server

pytestmark = pytest.mark.engine


class RecordingGrid:
    """Passes everything through to the real grid and keeps every reply a client sent."""

    def __init__(self, grid: Grid):
        self.grid, self.replies = grid, []

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


def test_ray_simulation_respects_the_privacy_boundary(tmp_path):
    """Every message any client sends in a real simulation holds item-side arrays and sums only."""
    from flwr.simulation import run_simulation

    cfg = RunConfig(dataset="synthetic", synthetic_users=48, synthetic_items=30, synthetic_density=0.3, dim=6,
                    rounds=3, eval_every=3, users_per_round=20, out=str(tmp_path / "run")).resolved()
    split = load_data(cfg)
    seen: dict = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        recorder = RecordingGrid(grid)
        seen["outcome"] = run_server(recorder, cfg)
        seen["replies"] = recorder.replies

    run_simulation(server_app=server, client_app=client_app, num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "num_gpus": 0, "logging_level": logging.ERROR,
                                                 "log_to_driver": False, "include_dashboard": False}})
    assert "outcome" in seen, "the ServerApp did not finish"
    replies = seen["replies"]
    assert len(replies) == 1 + 4 + 4 * 3 + 4  # discovery (one node, then all), train, evaluate
    item_shapes = {"item-emb": (split.n_items, cfg.dim), "item-bias": (split.n_items, 1), "global-bias": (1,),
                   }  # what MF devices send: its statistics
    allowed_metrics = set(schema.TRAIN_METRICS) | set(schema.EVAL_SUMS) | set(schema.HELLO_METRICS)
    private_rows = {split.n_users, 12}  # population, users per node
    for reply in replies:
        assert not reply.has_error()
        content = reply.content
        assert not content.config_records, "a client sent a ConfigRecord"
        for record in content.array_records.values():
            for name, array in record.items():
                assert name in item_shapes, f"unexpected array {name!r} left a client"
                assert tuple(array.shape) == item_shapes[name]
                assert array.shape[0] not in private_rows or name == "global-bias"
                assert array.dtype == "float32"
        for record in content.metric_records.values():
            assert set(record.keys()) <= allowed_metrics
            assert all(not isinstance(v, list) for v in record.values()), "a list (ids? ratings?) left a client"
    train_keys = {tuple(sorted(r.content[schema.ARRAYS].keys())) for r in replies if schema.ARRAYS in r.content}
    assert train_keys == {("global-bias", "item-bias", "item-emb")}
    assert seen["outcome"].summary["metrics"]["rmse"] > 0
    assert (Path(cfg.out) / "audit.jsonl").read_text().count("\n") == 4 * 3


@pytest.fixture
def processes(tmp_path):
    procs = Processes(flower_env(tmp_path / "flwr-home"))
    yield procs
    procs.stop()


def _flwr_run(tmp_path, env, connection: str, port: int, run_config: str, extra: list[str]) -> dict:
    run, output = flwr_run(env, connection, port, run_config, extra)
    assert run.get("status") == "finished:completed", output
    return run


def test_flwr_run_on_a_simulation_superlink(tmp_path, processes):
    port = free_port()
    log = tmp_path / "superlink.log"
    link = processes.start("flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
                           "--disable-runtime-dependency-installation", log=log)
    wait_for_port(port, link, log)
    out = tmp_path / "run"
    _flwr_run(tmp_path, processes.env, "sim", port, f"rounds=2 eval-every=2 synthetic-users=200 out='{out}'",
              ["--federation-config", "num-supernodes=2 client-resources-num-cpus=1"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["num_users"] == 200 and summary["metrics"]["rmse"] > 0


def test_deployment_one_user_per_supernode_on_loopback(tmp_path, processes):
    users = 3
    port = start_federation(processes, tmp_path, users)
    out = tmp_path / "run"
    _flwr_run(tmp_path, processes.env, "dep", port,
              f"rounds=2 eval-every=2 synthetic-users={users} synthetic-items=40 synthetic-density=0.5 out='{out}'", [])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_nodes"] == users and summary["num_users"] == users
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert len(audit) == 2 * users and {a["node"] for a in audit}.__len__() == users
    assert all(set(a["arrays"]) == {"item-emb", "item-bias", "global-bias"} for a in audit)
    assert np.isfinite(summary["metrics"]["rmse"])


def test_ray_simulation_with_secagg_and_distributed_dp(tmp_path):
    """SecAgg+ through Flower's engine: each cohort node is one protocol participant."""
    from fedrec.simulations.federated import simulate

    cfg = RunConfig(dataset="synthetic", synthetic_users=48, synthetic_items=30, synthetic_density=0.3, dim=6,
                    rounds=2, eval_every=2, users_per_round=24, users_per_node=12, secure_aggregation="secagg+",
                    dp="distributed", clipping_norm=0.5, noise_multiplier=0.5, sampling="poisson",
                    secagg_min_fraction=0.5, out=str(tmp_path / "run"))
    summary = simulate(cfg, num_cpus=2).summary
    assert summary["num_nodes"] == 4 and summary["secure_aggregation"]["rounds_halted"] == 0
    assert summary["privacy"]["mode"] == "distributed" and summary["privacy"]["epsilon"] > 0
    assert summary["privacy"]["clipping_norm"] > 0.5  # the quantization slack is in the accounted sensitivity
    assert np.isfinite(summary["metrics"]["rmse"])


def test_deployment_secagg_with_eight_supernodes_one_user_each(tmp_path, processes):
    users = 8
    port = start_federation(processes, tmp_path, users)
    out = tmp_path / "run"
    _flwr_run(tmp_path, processes.env, "dep", port,
              f"rounds=1 eval-every=1 synthetic-users={users} synthetic-items=40 synthetic-density=0.5 "
              f"secure-aggregation='secagg+' clipping-norm=0.5 out='{out}'", [])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_nodes"] == users and summary["secure_aggregation"]["rounds_halted"] == 0
    assert np.isfinite(summary["metrics"]["rmse"])
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert len(audit) == 1  # the server received one sum for the round, never a node's update
