"""Beyond one machine, on Flower's own engines.

(a) The Ray backend joining a running Ray cluster: `ray_federation()` and `ray_worker_env()`
    are what `fedrec simulate --ray-address` hands Flower, `RayHead` a `ray start --head` on
    127.0.0.1 for tests.
(b) The Deployment Engine with cohort SuperNodes: `deploy_case()` starts one SuperLink and N
    `flower-supernode` processes on 127.0.0.1, each hosting a contiguous share of the users,
    runs fedrec through `flwr run` and reports RMSE, seconds per round and updates/s.

`python -m fedrec.experiments.scaleout --data-dir ../shared/data` measures 1 vs 2 SuperNode
processes on ML-100K u1 and writes scaleout.json to its run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.datasets.shards import node_name
from fedrec.deploy.loopback import BIN, Processes, flower_env, flwr_run, free_port, start_superlink, start_supernode
from fedrec.run.build import ensure_shards
from fedrec.run.config import RunConfig
from fedrec.run.device_config import round_config
from fedrec.run.rundir import make_run_dir, write_json

# Ray refuses a loopback node IP on Linux ("127.0.0.1" becomes the address of the default
# route's interface) unless told it is a single-machine setup; this keeps every Ray
# socket of a test cluster on 127.0.0.1.
RAY_LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


# ---------------------------------------------------------------- (a) Ray cluster
class RayHead:
    """`ray start --head --block` on 127.0.0.1 with its own temp dir and ports; stop() ends its
    process group and every process still naming its temp dir (never `ray stop`, which would
    stop every Ray instance of this user on the machine)."""

    def __init__(self, cpus: int = 2, log: Path | None = None):
        self.cpus = cpus
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-"))  # short: Ray's socket paths must fit 107 bytes
        self.log = log or self.temp_dir / "ray-start.log"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ, **RAY_LOOPBACK, RAY_USAGE_STATS_ENABLED="0")
        self.proc: subprocess.Popen | None = None

    def start(self, seconds: float = 90) -> RayHead:
        ports = {"--port": self.port, "--ray-client-server-port": free_port(), "--node-manager-port": free_port(),
                 "--object-manager-port": free_port(), "--dashboard-port": free_port(),
                 "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
                 "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port()}
        args = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                "--num-cpus", str(self.cpus), "--num-gpus", "0", "--temp-dir", str(self.temp_dir),
                "--include-dashboard", "false", "--disable-usage-stats",
                *(a for flag, port in ports.items() for a in (flag, str(port)))]
        self.proc = subprocess.Popen(args, env=self.env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + seconds
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray start failed: {self.log.read_text()[-2000:]}")
            time.sleep(0.5)
        return self

    def pids(self) -> list[int]:
        """Live processes whose command line names this cluster's temp dir or address."""
        marks = (str(self.temp_dir).encode(), self.address.encode())
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and any(m in (entry / "cmdline").read_bytes() for m in marks):
                    if (entry / "stat").read_text().split(") ")[1][0] != "Z":
                        found.append(int(entry.name))
            except OSError:
                pass
        return found

    def stop(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        deadline = time.monotonic() + 15
        while (left := [p for p in self.pids() if p != os.getpid()]) and time.monotonic() < deadline:
            for pid in left:  # workers the raylet started outside its group
                try:
                    os.kill(pid, signal.SIGTERM if time.monotonic() < deadline - 5 else signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- (b) cohort SuperNodes
def node_configs(cfg: RunConfig, supernodes: int, out: Path) -> list[str]:
    """Each SuperNode's --node-config: its own shard of a set cut into `out` (what `fedrec
    partition` writes; on N hosts, shard I is copied to host I). TOML values: paths quoted."""
    shards = Path(ensure_shards(cfg, supernodes, out=out)).resolve()
    return [f"shard={json.dumps(str(shards / node_name(i)))}" for i in range(supernodes)]


def run_config_file(cfg: RunConfig, path: Path) -> Path:
    """cfg as a flat TOML file for `flwr run --run-config FILE` (no quoting on a command line).
    The server gets no data path: the nodes read only what their own config names."""
    values = dataclasses.replace(cfg, data_dir="", ray_address="", resume="").to_dict()
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def round_timing(history: pd.DataFrame) -> tuple[float, float, int]:
    """Mean seconds and users per training round, leaving out the first (ClientApp processes
    warm up, discovery) and rounds that also evaluated; and how many rounds that left."""
    rows = history.iloc[1:]
    rows = rows[rows["rmse"].isna()] if "rmse" in rows else rows
    if rows.empty:
        rows = history
    return float(rows["seconds"].mean()), float(rows["users_sampled"].mean()), len(rows)


def deploy_case(cfg: RunConfig, supernodes: int, workdir: Path | None = None, keep: bool = False) -> dict:
    """One fedrec run on the Deployment Engine on loopback: a SuperLink (plain text, 127.0.0.1)
    and `supernodes` cohort SuperNode processes, node I hosting the I-th contiguous share of the
    users; the ServerApp runs through `flwr run`. Returns RMSE, seconds per training round
    (excluding start-up and the first round), updates/s and the start-up cost. Everything lives
    in `workdir` (default: a temporary directory, removed unless `keep` or the run failed)."""
    cfg = cfg.resolved().validate()
    own = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="fedrec-scaleout-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    procs = Processes(flower_env(root / "flwr-home"))
    started = time.perf_counter()
    ok = False
    try:
        configs = node_configs(cfg, supernodes, root / "shards")
        prepared = time.perf_counter()
        port = free_port()
        start_superlink(procs, root, port)
        for i, node_config in enumerate(configs):
            start_supernode(procs, port, i, supernodes, root / f"node{i}.log", node_config=node_config)
        out = root / "run"
        run_started = time.perf_counter()
        run, output = flwr_run(procs.env, "scaleout", port, str(run_config_file(dataclasses.replace(cfg, out=str(out)),
                                                                                root / "run-config.toml")))
        finished = time.perf_counter()
        (root / "flwr-run.log").write_text(output)
        if run.get("status") != "finished:completed":
            raise RuntimeError(f"run {run.get('status', 'unknown')}: {run.get('status-details', '')}; logs in {root}"
                               f"\n{output[-1500:]}")
        summary = json.loads((out / "summary.json").read_text())
        history = pd.read_csv(out / "metrics.csv")
        seconds, users, measured = round_timing(history)
        ok = True
        return {"supernodes": supernodes, "num_nodes": summary["num_nodes"], "node_data": "shard",
                "rmse": summary["metrics"].get("rmse"), "metrics": summary["metrics"],
                "seconds_per_round": seconds, "updates_per_second": users / seconds, "users_per_round": users,
                "measured_rounds": measured, "rounds": summary["rounds"],
                "round_seconds": [float(s) for s in history["seconds"]],
                "prepare_seconds": prepared - started, "run_seconds": finished - run_started,
                "startup_seconds": finished - run_started - float(history["seconds"].sum()),
                "end_to_end_seconds": finished - started, "bytes_up": summary.get("bytes_up"),
                "bytes_down": summary.get("bytes_down"), "workdir": str(root) if keep or not own else None}
    finally:
        procs.stop()
        if own and ok and not keep:
            shutil.rmtree(root, ignore_errors=True)


def ray_case(cfg: RunConfig, nodes: int) -> dict:
    """The same run through Flower's simulation engine with `nodes` cohort nodes (the same
    contiguous shares as deploy_case's SuperNodes), for comparison."""
    from fedrec.simulations.federated import simulate

    start = time.perf_counter()
    outcome = simulate(dataclasses.replace(cfg, users_per_node=_users_per_node(cfg, nodes)), say=lambda _: None)
    history = pd.DataFrame(outcome.history)
    seconds, users, measured = round_timing(history)
    return {"nodes": outcome.summary["num_nodes"], "rmse": outcome.summary["metrics"].get("rmse"),
            "seconds_per_round": seconds, "updates_per_second": users / seconds, "measured_rounds": measured,
            "end_to_end_seconds": time.perf_counter() - start, "run_dir": str(outcome.run_dir)}


def _users_per_node(cfg: RunConfig, nodes: int) -> int:
    """users-per-node that makes the simulation split the population into exactly `nodes` shares."""
    from fedrec.simulations.federated import check_population

    population = check_population(cfg)
    per_node = -(-population // nodes)
    if -(-population // per_node) != nodes:
        raise ValueError(f"{population} users cannot be split into {nodes} simulation nodes of equal size")
    return per_node


# ---------------------------------------------------------------- 1 vs 2 SuperNode processes
def clientapp_seconds(cfg: RunConfig, users: int, repeats: int = 5) -> float:
    """Seconds fedrec's ClientApp takes for one train message of `users` users of a one-node
    shard, called in this (warm) process: the per-message work of a node apart from Flower's
    process start and polling. The median of `repeats` calls after a warm-up call."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.client.app import app
    from fedrec.run import schema
    from fedrec.run.build import load_data, make_algorithm

    cfg = cfg.resolved()
    shards = ensure_shards(cfg, 1, out=Path(tempfile.mkdtemp(prefix="fedrec-shard-")) / "set")
    split = load_data(cfg)
    shared = make_algorithm(cfg, split.n_items, split.rating_scale).init_server(cfg.strategy, cfg.server_lr).broadcast()
    arrays = ArrayRecord({k: Array(v) for k, v in shared.items()})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1  # as a flwr-clientapp process has
    context = Context(run_id=1, node_id=7, node_config={"shard": str(shards / node_name(0))}, state=RecordDict(),
                      run_config={})
    chosen = np.sort(np.random.default_rng(cfg.seed).choice(split.n_users, size=users, replace=False))
    times = []
    try:
        for rnd in range(1, repeats + 2):
            config = ConfigRecord(round_config(cfg, rnd, chosen))
            meta = Metadata(run_id=1, message_id=f"m{rnd}", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                            group_id="", created_at=time.time(), ttl=3600, message_type=MessageType.TRAIN)
            start = time.perf_counter()
            app(Message(RecordDict({schema.ARRAYS: arrays, schema.CONFIG: config}), metadata=meta), context)
            times.append(time.perf_counter() - start)
    finally:
        shutil.rmtree(shards.parent, ignore_errors=True)
    return float(np.median(times[1:]))


def process_start_seconds(repeats: int = 3) -> float:
    """Wall seconds for a fresh Python to import what a flwr-clientapp process imports to run
    fedrec's ClientApp (Flower starts one such process per message); the median of `repeats`."""
    code = "import flwr.supernode.runtime.run_clientapp, fedrec.client.app"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([str(BIN / "python"), "-c", code], check=True, timeout=300)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def throughput(base: RunConfig, counts: tuple[int, ...] = (1, 2), small_round: int = 94, hosts: int = 10,
               log=print) -> dict:
    """deploy_case for each SuperNode count on `base` (its users-per-round, 0 = all), plus one
    SuperNode with `small_round` users per round to separate the per-message overhead from the
    per-user cost; from those, an estimate for `hosts` machines. JSON in base's run directory."""
    run_dir = make_run_dir(base, "scaleout")
    report: dict = {"settings": dataclasses.replace(base, out="").to_dict(), "cpus": os.cpu_count(), "cases": {}}
    runs = [(f"{n}-supernodes", n, base.users_per_round) for n in counts]
    if small_round:
        runs.append((f"1-supernode-{small_round}-users", 1, small_round))
    for name, n, users in runs:
        cfg = dataclasses.replace(base, users_per_round=users, out="")
        report["cases"][name] = result = deploy_case(cfg, n, workdir=run_dir / name, keep=True)
        log(f"{name}: {result['seconds_per_round']:.3f} s/round, {result['updates_per_second']:.0f} updates/s, "
            f"RMSE {result['rmse']:.6f}, start-up {result['startup_seconds']:.1f} s, round times "
            f"{[round(s, 2) for s in result['round_seconds']]}")
        write_json(run_dir / "scaleout.json", report)
    cases = report["cases"]
    if len(counts) >= 2:
        a, b = cases[f"{counts[0]}-supernodes"], cases[f"{counts[1]}-supernodes"]
        report["speedup"] = b["updates_per_second"] / a["updates_per_second"]
        log(f"{counts[1]} vs {counts[0]} SuperNode processes: x{report['speedup']:.2f} updates/s")
    if small_round and 1 in counts:
        # Per-user cost: the ClientApp's own work, timed in a warm process for both round sizes
        # (in deployment rounds it drowns in seconds of polling); per-round overhead: the rest
        # of a one-SuperNode round of the small size.
        full, small = cases["1-supernodes"], cases[f"1-supernode-{small_round}-users"]
        population = int(full["users_per_round"])
        work = {n: clientapp_seconds(base, n) for n in (small_round, population)}
        fixed, per_user = cost_model(small_round, work[small_round], population, work[population])
        overhead = small["seconds_per_round"] - small_round * per_user
        per_host = -(-population // hosts)
        report["model"] = {"clientapp_seconds": {str(k): v for k, v in work.items()}, "clientapp_fixed_seconds": fixed,
                           "seconds_per_user": per_user, "process_start_seconds": process_start_seconds(),
                           "overhead_seconds_per_round": overhead, "estimate_hosts": hosts,
                           "estimate_users_per_host": per_host,
                           "estimate_seconds_per_round": overhead + per_host * per_user}
        log(f"model: ClientApp work {work[small_round]:.3f} s ({small_round} users), {work[population]:.3f} s "
            f"({population}) -> {per_user * 1e3:.3f} ms per user; a process start "
            f"{report['model']['process_start_seconds']:.2f} s; "
            f"overhead {overhead:.2f} s per round; {hosts} hosts x {per_host} users: "
            f"~{report['model']['estimate_seconds_per_round']:.2f} s/round (estimate)")
    write_json(run_dir / "scaleout.json", report)
    report["run_dir"] = str(run_dir)
    return report


def cost_model(users_a: float, seconds_a: float, users_b: float, seconds_b: float) -> tuple[float, float]:
    """Fit seconds = fixed + users x per-user cost to two round sizes of one node (what does not
    grow with the users a node trains, and what does)."""
    per_user = (seconds_b - seconds_a) / (users_b - users_a)
    return seconds_a - users_a * per_user, per_user


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedrec.experiments.scaleout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="", help="data root holding ml-100k/ (default: $FEDREC_DATA_DIR)")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--split", default="u1")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--users-per-round", type=int, default=0, help="0: all users")
    parser.add_argument("--supernodes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--small-round", type=int, default=94,
                        help="users per round of the extra 1-SuperNode run that separates overhead from per-user cost")
    parser.add_argument("--hosts", type=int, default=10, help="machines of the estimate")
    parser.add_argument("--out", default="", help="run directory (default runs/scaleout-<time>)")
    args = parser.parse_args(argv)
    base = RunConfig(dataset=args.dataset, split=args.split, data_dir=args.data_dir, rounds=args.rounds,
                     eval_every=args.rounds, users_per_round=args.users_per_round, out=args.out)
    report = throughput(base.validate(), tuple(args.supernodes), args.small_round, args.hosts)
    print(f"written: {report['run_dir']}/scaleout.json")


if __name__ == "__main__":
    _main()
