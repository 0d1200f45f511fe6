"""`fedrec deploy`: a SuperLink and N SuperNodes on this machine with TLS, SuperNode
authentication and the SuperLink's state in a database file, then one fedrec run through
`flwr run`. Exits non-zero unless the run completed, and stops what it started.

`python -m fedrec.deploy.deploy certs DIR HOST...` and `... node-key FILE` make the
files of a multi-host deployment (scripts/make-certs.sh, scripts/make-node-key.sh)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from .certs import make_certs, make_node_key
from .loopback import Processes, Secure, flower_env, flwr, flwr_run, start_federation, start_superlink, write_connection

CONNECTION = "fedrec-deploy"
INSECURE_WARNING = ("WARNING: --insecure: no TLS and no SuperNode authentication. Anyone on the network can read "
                    "and alter what nodes and server exchange, and any process can join as a SuperNode. "
                    "Use it for loopback tests only.")


def default_data_dir() -> Path:
    return Path(os.environ.get("FEDREC_DATA_DIR") or Path.home() / ".cache" / "fedrec").expanduser().resolve()


class Federation:
    """A SuperLink and `nodes` SuperNodes on 127.0.0.1, everything under `root`: certs/,
    keys/, superlink.db, flwr-home/, state/node-I/, logs. A context manager: leaving it
    stops every process it started."""

    def __init__(self, root: Path, nodes: int, insecure: bool = False, data_dir: Path | None = None):
        self.root, self.nodes, self.insecure = root.resolve(), nodes, insecure
        self.data_dir = (data_dir or default_data_dir()).resolve()
        self.procs = Processes(flower_env(self.root / "flwr-home"))
        self.secure: Secure | None = None
        self.port = 0
        self.restarts = 0

    def node_config(self, index: int) -> str:
        """Where node `index` reads its data and keeps its private state (read by the ClientApp)."""
        state = self.root / "state" / f"node-{index}"
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        return f"data-dir='{self.data_dir}' state-dir='{state}'"  # TOML literal strings: no escapes

    def start(self) -> Federation:
        if "'" in str(self.data_dir) + str(self.root):
            raise ValueError("paths with a single quote cannot go into a node config")
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.insecure:
            keys = self.root / "keys"
            keys.mkdir(mode=0o700, exist_ok=True)
            for i in range(self.nodes):
                make_node_key(keys / f"node-{i}")
            self.secure = Secure(make_certs(self.root / "certs"), tuple(keys / f"node-{i}" for i in range(self.nodes)))
        try:
            self.port = start_federation(self.procs, self.root, self.nodes, self.secure, self.database,
                                         self.node_config, CONNECTION)
            write_connection(self.env, CONNECTION, self.port, self.ca)
        except BaseException:
            self.procs.stop()
            raise
        return self

    def stop(self) -> None:
        self.procs.stop()

    def __enter__(self) -> Federation:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def env(self) -> dict:
        return self.procs.env

    @property
    def ca(self) -> Path | None:
        return self.secure.certs.ca if self.secure else None

    @property
    def database(self) -> Path:
        return self.root / "superlink.db"

    def node_status(self) -> dict[str, str]:
        """Node id -> status ("online", "offline", "registered"), as the SuperLink reports it."""
        answer = json.loads(flwr(self.env, "supernode", "list", CONNECTION, "--format", "json"))
        if not answer.get("success"):  # the CLI exits 0 with --format json even when it cannot connect
            raise RuntimeError(f"flwr supernode list: {answer.get('error-message')}")
        return {n["node-id"]: n["status"] for n in answer["nodes"]}

    def wait_online(self, seconds: float = 120) -> dict[str, str]:
        deadline = time.monotonic() + seconds
        while True:
            status = self.node_status()
            if sum(s == "online" for s in status.values()) >= self.nodes:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.nodes} SuperNodes expected online, the SuperLink reports {status}; "
                                   f"see {self.root}/node*.log")
            time.sleep(2)  # each look starts a `flwr` process (~1.3 s of CPU)

    def run(self, run_config: str) -> tuple[dict, str]:
        """One `flwr run`; its listing (status etc.) and the CLI's output."""
        return flwr_run(self.env, CONNECTION, self.port, run_config, ca=self.ca)

    def restart_superlink(self) -> None:
        """Stop the SuperLink (and what it spawned) and start it again on the same port and database."""
        link = next(p for p in self.procs.procs if Path(p.args[0]).name == "flower-superlink" and p.poll() is None)
        self.procs.end(link)
        self.restarts += 1
        start_superlink(self.procs, self.root, self.port, self.secure, self.database,
                        log_name=f"superlink-restart{self.restarts}.log")

    def stop_command(self) -> str:
        return "kill -TERM -- " + " ".join(f"-{p.pid}" for p in self.procs.procs if p.poll() is None)


def deploy(nodes: int, root: Path, run_config: str = "", insecure: bool = False, keep_running: bool = False,
           data_dir: Path | None = None, log=print) -> int:
    """The `fedrec deploy` command; returns the exit code (0 only when the run completed)."""
    if insecure:
        log(INSECURE_WARNING)
    if not re.search(r"(^|\s)out=", run_config):  # the run directory goes next to the certificates and logs
        run_config = f"{run_config} out='{root.resolve() / 'run'}'".strip()
    fed = Federation(root, nodes, insecure, data_dir).start()
    try:
        log(f"SuperLink on 127.0.0.1:{fed.port} ({'plain text' if insecure else 'TLS, SuperNode authentication'}, "
            f"state in {fed.database}); waiting for {nodes} SuperNodes")
        fed.wait_online()
        run, output = fed.run(run_config)
        (fed.root / "flwr-run.log").write_text(output)
        status = run.get("status", "unknown")
        details = "" if status == "finished:completed" else f": {run.get('status-details', output[-500:])}"
        log(f"run {run.get('run-id', '?')}: {status}{details} (logs in {fed.root})")
        return 0 if status == "finished:completed" else 1
    finally:
        if keep_running:
            log(f"federation left running. Another run:\n  FLWR_HOME={fed.env['FLWR_HOME']} flwr run . {CONNECTION} "
                f"--stream --run-config '...'\nStop it:\n  {fed.stop_command()}")
        else:
            fed.stop()


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedrec.deploy.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    certs = sub.add_parser("certs", help="CA + SuperLink certificate (on the SuperLink host)")
    certs.add_argument("dir", type=Path)
    certs.add_argument("hosts", nargs="*", help="names/IPs SuperNodes dial, besides 127.0.0.1 and localhost")
    certs.add_argument("--days", type=int, default=365)
    key = sub.add_parser("node-key", help="a SuperNode's key pair (on the SuperNode host): FILE and FILE.pub")
    key.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "certs":
            made = make_certs(args.dir, args.hosts, args.days)
            print(f"{made.ca} (copy to every SuperNode host), {made.cert}, {made.key} and {args.dir}/ca.key (secret)")
        else:
            print(f"{make_node_key(args.file)} (register it on the SuperLink); {args.file} stays on this host")
    except FileExistsError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    _main()
