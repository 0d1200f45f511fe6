"""Beyond one machine on Flower's engines: `fedrec simulate --ray-address` joins a running Ray
cluster (not a private one), and cohort SuperNodes on the Deployment Engine give the RMSE of
the Ray simulation. Every process is started on 127.0.0.1 and stopped by PID."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from fedrec.deploy.loopback import BIN
from fedrec.experiments.scaleout import RAY_LOOPBACK, RayHead, cost_model, deploy_case
from fedrec.run.config import RunConfig
from fedrec.simulations.engine import RAY_JOB_CONFIG, ray_federation, ray_worker_env


def test_ray_federation_joins_a_cluster_without_cpu_counts_and_carries_the_environment():
    env = {"FEDREC_SHARDS": "/data/shards", "OMP_NUM_THREADS": "1"}
    private = ray_federation("", 2, 4)
    assert private["init-args-num-cpus"] == 2 and private["num-supernodes"] == 4
    # a Ray started by the run: its workers inherit the environment; an inherited RAY_ADDRESS is emptied
    assert ray_worker_env("", env) == env | {"RAY_ADDRESS": ""}
    joined = ray_federation("10.0.0.5:6379", 2, 4)
    # ray.init(address=…) raises when num_cpus or num_gpus are given
    assert not {"init-args-num-cpus", "init-args-num-gpus"} & set(joined)
    assert joined["client-resources-num-cpus"] == private["client-resources-num-cpus"] == 1
    joining = ray_worker_env("10.0.0.5:6379", env)
    assert joining["RAY_ADDRESS"] == "10.0.0.5:6379"  # what Flower's ray.init() without an address joins
    assert json.loads(joining[RAY_JOB_CONFIG]) == {"runtime_env": {"env_vars": env}}


def test_cost_model_splits_round_time_into_message_overhead_and_per_user_cost():
    overhead, per_user = cost_model(100, 3.0 + 100 * 1e-4, 1000, 3.0 + 1000 * 1e-4)
    assert overhead == pytest.approx(3.0) and per_user == pytest.approx(1e-4)


def _cluster_jobs(address: str) -> list[dict]:
    """The cluster's job table, read by a separate driver (this process stays Ray-free)."""
    code = ("import json, ray\nray.init(address=%r, logging_level='ERROR', log_to_driver=False)\n"
            "jobs = [{'pid': int(j['DriverPid']), 'dead': bool(j['IsDead']), 'entrypoint': j.get('Entrypoint', '')}\n"
            "        for j in ray._private.state.jobs()]\n"
            "actors = [a['JobID'] for a in ray._private.state.actors().values() "
            "if a.get('ActorClassName', '').endswith('ClientAppActor')]\n"
            "by_job = {j['JobID']: int(j['DriverPid']) for j in ray._private.state.jobs()}\n"
            "print(json.dumps({'jobs': jobs, 'actor_pids': [by_job.get(a) for a in actors]}))\n" % address)
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **RAY_LOOPBACK), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.engine
def test_simulate_joins_a_running_ray_cluster(tmp_path):
    head = RayHead(cpus=2, log=tmp_path / "ray-start.log")
    try:
        head.start()
        out = tmp_path / "run"
        env = dict(os.environ, **RAY_LOOPBACK, FEDREC_SHARD_CACHE=str(tmp_path / "shards"))
        sim = subprocess.Popen([str(BIN / "fedrec"), "simulate", "--dataset", "synthetic", "--synthetic-users", "200",
                                "--synthetic-items", "50", "--dim", "8", "--rounds", "2", "--eval-every", "2",
                                "--ray-address", head.address, "--keep-checkpoints", "--out", str(out)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output, _ = sim.communicate(timeout=240)
        assert sim.returncode == 0, output[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 2 and summary["metrics"]["rmse"] > 0
        # The cluster's workers got the devices' state directory (kept: --keep-checkpoints)
        assert sorted(p.name for p in (tmp_path / "run.devices").iterdir()) == ["node-0", "node-1"]
        # It ran on that cluster: the cluster recorded the run's Flower simulation process (the
        # driver that `fedrec simulate` had Flower start) as a finished driver, and its ClientApp
        # actors as that driver's.
        table = _cluster_jobs(head.address)
        drivers = [j for j in table["jobs"] if "flwr-simulation" in j["entrypoint"]]
        assert len(drivers) == 1 and drivers[0]["dead"], table
        assert table["actor_pids"] and set(table["actor_pids"]) == {drivers[0]["pid"]}, table
    finally:
        head.stop()
    assert not head.pids(), "a process of the test cluster outlived stop()"


@pytest.mark.engine
def test_cohort_supernodes_match_the_ray_simulation_on_ml100k_u1(tmp_path, shared_data, monkeypatch):
    """4 flower-supernode processes, each a contiguous quarter of u1's users from its own
    shard, against one SuperLink, the ServerApp through `flwr run`: the RMSE of the Ray
    simulation with the same 4 shares, seeded, to 1e-5."""
    from fedrec.experiments.scaleout import ray_case

    monkeypatch.setenv("FEDREC_SHARD_CACHE", str(tmp_path / "shard-cache"))  # never beside the shared data
    cfg = RunConfig(dataset="ml-100k", split="u1", data_dir=str(shared_data), rounds=3, eval_every=3, seed=7)
    deployed = deploy_case(cfg, supernodes=4, workdir=tmp_path / "deploy")
    simulated = ray_case(dataclasses.replace(cfg, out=str(tmp_path / "ray")), nodes=4)
    print(f"deployment: RMSE {deployed['rmse']:.7f}, {deployed['seconds_per_round']:.2f} s/round; "
          f"ray: RMSE {simulated['rmse']:.7f}, {simulated['seconds_per_round']:.2f} s/round")
    assert deployed["num_nodes"] == simulated["nodes"] == 4
    assert deployed["node_data"] == "shard"
    assert deployed["rmse"] == pytest.approx(simulated["rmse"], abs=1e-5)
    assert deployed["seconds_per_round"] > 0 and deployed["updates_per_second"] > 0
