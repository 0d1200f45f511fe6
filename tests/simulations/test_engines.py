"""End-to-end runs through the real engines: Flower's simulation runtime (a SuperLink in
simulation mode, `flwr run`, flwr-simulation with Ray), and SuperLink + SuperNodes on loopback
(one user per node, the deployment shape). Each test starts what it needs on 127.0.0.1 and
stops it by PID."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedrec.deploy.loopback import (
    REPO,
    Processes,
    flower_env,
    flwr_run,
    free_port,
    start_federation,
    wait_for_port,
)
from fedrec.run import schema
from fedrec.run.build import load_data
from fedrec.run.config import ConfigError, RunConfig
from fedrec.run.rundir import write_config
from fedrec.simulations.engine import Engine, RunFailed, marked, ray_federation, toml_lines, write_app

pytestmark = pytest.mark.engine


# A ServerApp shipped in the app directory (the FAB carries it to flwr-simulation): fedrec's server
# on a grid that writes down every reply a client sent, for the test to read.
RECORDER = """
import json
from pathlib import Path

from flwr.serverapp import ServerApp

from fedrec.run.config import RunConfig
from fedrec.server.runner import run_server

app = ServerApp()


class RecordingGrid:
    def __init__(self, grid):
        self.grid, self.replies = grid, []

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            content = reply.content
            self.replies.append({
                "error": reply.has_error(), "config_records": len(content.config_records),
                "arrays": {name: [list(a.shape), str(a.dtype)] for record in content.array_records.values()
                           for name, a in record.items()},
                "array_records": [sorted(record.keys()) for record in content.array_records.values()],
                "metrics": {key: isinstance(value, list) for record in content.metric_records.values()
                            for key, value in record.items()}})
        return replies


@app.main()
def main(grid, context):
    settings = dict(context.run_config)
    record_to = settings.pop("record-to")
    recorder = RecordingGrid(grid)
    run_server(recorder, RunConfig.from_mapping(settings))
    Path(record_to).write_text(json.dumps(recorder.replies))
"""


def test_every_reply_of_a_real_simulation_respects_the_privacy_boundary(tmp_path):
    """Every message any client sends on Flower's runtime holds item-side arrays and sums only."""
    cfg = RunConfig(dataset="synthetic", synthetic_users=48, synthetic_items=30, synthetic_density=0.3, dim=6,
                    rounds=3, eval_every=3, users_per_round=20, out=str(tmp_path / "run")).resolved()
    split = load_data(cfg)
    app = write_app(tmp_path / "app", "recorder:app", "fedrec.client.app:app",
                    RunConfig().to_dict() | {"record-to": ""})
    (app / "recorder.py").write_text(RECORDER)
    (tmp_path / "run.toml").write_text(toml_lines(cfg.to_dict() | {"record-to": str(tmp_path / "replies.json")}))
    with Engine(tmp_path / "engine") as engine:
        engine.start()
        engine.run(app, tmp_path / "run.toml", ray_federation("", 2, 4))
        assert engine.status().get("status") == "finished:completed", engine.tail()
    replies = json.loads((tmp_path / "replies.json").read_text())
    assert len(replies) == 1 + 4 + 4 * 3 + 4  # discovery (one node, then all), train, evaluate
    item_shapes = {"item-emb": [split.n_items, cfg.dim], "item-bias": [split.n_items, 1],
                   "global-bias": [1]}  # what MF devices send: its statistics
    allowed_metrics = set(schema.TRAIN_METRICS) | set(schema.EVAL_SUMS) | set(schema.HELLO_METRICS)
    private_rows = {split.n_users, 12}  # population, users per node
    for reply in replies:
        assert not reply["error"]
        assert not reply["config_records"], "a client sent a ConfigRecord"
        for name, (shape, dtype) in reply["arrays"].items():
            assert name in item_shapes, f"unexpected array {name!r} left a client"
            assert shape == item_shapes[name]
            assert shape[0] not in private_rows or name == "global-bias"
            assert dtype == "float32"
        assert set(reply["metrics"]) <= allowed_metrics
        assert not any(reply["metrics"].values()), "a list (ids? ratings?) left a client"
    train_keys = {tuple(keys) for r in replies for keys in r["array_records"]}
    assert train_keys == {("global-bias", "item-bias", "item-emb")}
    assert json.loads((Path(cfg.out) / "summary.json").read_text())["metrics"]["rmse"] > 0
    assert (Path(cfg.out) / "audit.jsonl").read_text().count("\n") == 4 * 3
    assert not marked(str(engine.workdir)), "a process of the engine outlived stop()"


def test_flwr_run_accepts_a_run_directorys_config_toml(tmp_path, monkeypatch):
    """The saved config.toml is a file `flwr run . CONNECTION --run-config FILE` takes as it is."""
    monkeypatch.chdir(tmp_path)  # the saved file names no run directory: the run goes to runs/ here
    write_config(tmp_path, RunConfig(dataset="synthetic", synthetic_users=120, synthetic_items=40, dim=6, rounds=2,
                                     eval_every=2, seed=4))
    with Engine(tmp_path / "engine") as engine:
        engine.start()
        engine.run(REPO, tmp_path / "config.toml", ray_federation("", 2, 2))
        assert engine.status().get("status") == "finished:completed", engine.tail()
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["seed"] == 4 and summary["rounds"] == 2 and summary["num_users"] == 120
    assert (run / "config.toml").read_text() == (tmp_path / "config.toml").read_text()  # the same experiment


def test_a_server_error_reaches_the_caller_as_itself_and_the_engine_is_gone(tmp_path):
    from fedrec.simulations.federated import engine_dir, simulate

    cfg = RunConfig(dataset="synthetic", synthetic_users=40, synthetic_items=30, dim=6, rounds=2, eval_every=2,
                    users_per_node=40, secure_aggregation="secagg+", clipping_norm=0.5, out=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"^SecAgg\+ needs at least 2 SuperNodes"):  # raised by run_server
        simulate(cfg, num_cpus=2, say=lambda line: None)
    assert list((tmp_path / "run").iterdir()) == []  # found before the server wrote anything
    assert not engine_dir(tmp_path / "run").exists() and not (tmp_path / "run.devices").exists()
    assert not marked(str(engine_dir(tmp_path / "run").resolve()))


def test_a_run_flower_itself_fails_says_so_with_the_end_of_flowers_log(tmp_path, monkeypatch):
    """`flwr run --stream` exits 0 for a failed run: the failure is found from `flwr ls`."""
    import fedrec.simulations.federated as federated

    monkeypatch.setattr(federated, "SERVERAPP", "fedrec.client.app:app")  # not a ServerApp: Flower fails
    said = []
    cfg = RunConfig(dataset="synthetic", synthetic_users=40, synthetic_items=30, dim=6, rounds=2, eval_every=2,
                    out=str(tmp_path / "run"))
    with pytest.raises(RunFailed, match="the simulation ended without a result .Flower: finished:failed"):
        federated.simulate(cfg, num_cpus=2, say=said.append)
    assert "is not of type" in "\n".join(said)  # the end of Flower's log, kept beside the run
    assert [p.name for p in federated.engine_dir(tmp_path / "run").iterdir()] == ["flower.log"]


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
              f"rounds=2 eval-every=2 synthetic-users={users} synthetic-items=40 synthetic-density=0.5 model='mf' "
              f"out='{out}'", [])  # MF: the audit below names MF's statistics (auto would train BPMF here)
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
