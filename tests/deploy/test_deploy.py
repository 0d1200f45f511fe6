"""Secure deployment: certificates, a TLS + SuperNode-auth federation on loopback that
refuses strangers and survives a SuperLink restart, and `fedrec deploy`'s exit code."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from fedrec.cli.main import cli
from fedrec.deploy import deploy as deploy_module
from fedrec.deploy.certs import make_certs, make_node_key
from fedrec.deploy.deploy import Federation, deploy
from fedrec.deploy.loopback import BIN, start_supernode, write_connection

FAST = "synthetic-users=40 synthetic-items=30 synthetic-density=0.3 dim=4"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certificates_are_valid_for_loopback_and_private_keys_are_private(tmp_path):
    certs = make_certs(tmp_path / "certs", ["superlink.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert ip_address("10.0.0.5") in names.get_values_for_type(x509.IPAddress)
    assert {"localhost", "superlink.example.org"} <= set(names.get_values_for_type(x509.DNSName))
    for key in (certs.key, tmp_path / "certs" / "ca.key"):
        assert _mode(key) == 0o600
        load_pem_private_key(key.read_bytes(), None)
    assert load_pem_private_key(certs.key.read_bytes(), None).public_key() == cert.public_key()
    with pytest.raises(FileExistsError):  # a second CA would lock out nodes that trust the first
        make_certs(tmp_path / "certs")

    pub = make_node_key(tmp_path / "keys" / "node-0")
    private = load_ssh_private_key((tmp_path / "keys" / "node-0").read_bytes(), None)
    assert _mode(tmp_path / "keys" / "node-0") == 0o600
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert load_ssh_public_key(pub.read_bytes()) == private.public_key()


class FakeFederation:
    """Stands in for the processes: records what deploy() asked for."""

    status = "finished:completed"
    instances: list = []

    def __init__(self, root, nodes, insecure, data_dir):
        self.root, self.stopped, self.run_config = root, False, None
        self.env, self.database = {"FLWR_HOME": str(root / "flwr-home")}, root / "superlink.db"
        self.port = 1
        FakeFederation.instances.append(self)

    def start(self):
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def wait_online(self):
        if self.status == "never online":
            raise TimeoutError("no nodes")

    def run(self, run_config):
        self.run_config = run_config
        return {"run-id": "7", "status": self.status}, "output"

    def stop(self):
        self.stopped = True

    def stop_command(self):
        return "kill ..."


@pytest.mark.parametrize("status, code", [("finished:completed", 0), ("finished:failed", 1), ("running", 1)])
def test_deploy_exit_code_follows_the_run_status(tmp_path, monkeypatch, status, code):
    monkeypatch.setattr(deploy_module, "Federation", FakeFederation)
    monkeypatch.setattr(FakeFederation, "status", status)
    lines = []
    assert deploy(2, tmp_path / "d", "rounds=2", log=lines.append) == code
    fed = FakeFederation.instances[-1]
    assert fed.stopped
    assert fed.run_config == f"rounds=2 out='{(tmp_path / 'd').resolve() / 'run'}'"  # the run lands in --dir
    assert not any("WARNING" in line for line in lines)


def test_deploy_stops_on_failure_and_warns_when_insecure(tmp_path, monkeypatch):
    monkeypatch.setattr(deploy_module, "Federation", FakeFederation)
    monkeypatch.setattr(FakeFederation, "status", "never online")
    lines = []
    with pytest.raises(TimeoutError):
        deploy(2, tmp_path / "d", "out='x'", insecure=True, log=lines.append)
    assert FakeFederation.instances[-1].stopped
    assert "--insecure" in lines[0] and "WARNING" in lines[0]
    monkeypatch.setattr(FakeFederation, "status", "finished:completed")
    assert deploy(2, tmp_path / "e", "out='x'", keep_running=True, log=lines.append) == 0
    assert not FakeFederation.instances[-1].stopped and "kill" in lines[-1]


def _processes_using(home: Path) -> list[int]:
    """PIDs whose environment points at this FLWR_HOME: everything a federation spawned."""
    marker = f"FLWR_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                if (entry / "stat").read_text().split(") ")[1][0] != "Z":  # zombies hold no resources
                    found.append(int(entry.name))
        except OSError:
            pass
    return found


def _no_processes_left(home: Path, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while _processes_using(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    return not _processes_using(home)


def _flwr_as_stranger(tmp_path: Path, name: str, port: int, ca: Path | None) -> dict:
    """`flwr ls` from another FLWR_HOME; its JSON answer (it exits 0 even when it cannot connect)."""
    env = dict(os.environ, FLWR_HOME=str(tmp_path / name))
    write_connection(env, "link", port, ca)
    return json.loads(subprocess.run([str(BIN / "flwr"), "ls", "link", "--format", "json"], env=env,
                                     capture_output=True, text=True, timeout=120).stdout)


@pytest.mark.engine
def test_secure_deployment_refuses_strangers_and_survives_a_superlink_restart(tmp_path):
    fed = Federation(tmp_path / "dep", nodes=2, data_dir=tmp_path / "data")
    try:
        fed.start()
        registered = fed.wait_online()
        assert len(registered) == 2 and set(registered.values()) == {"online"}
        # Strangers: a key the SuperLink never registered, no key, and plain text (no TLS).
        make_node_key(tmp_path / "stranger")
        logs = {name: tmp_path / f"{name}.log" for name in ("unregistered", "keyless", "plaintext")}
        strangers = {
            "unregistered": start_supernode(fed.procs, fed.port, 0, 2, logs["unregistered"], fed.secure,
                                            key=tmp_path / "stranger"),
            "keyless": start_supernode(fed.procs, fed.port, 1, 2, logs["keyless"], fed.secure),
            "plaintext": start_supernode(fed.procs, fed.port, 0, 2, logs["plaintext"], None,
                                         extra=("--max-retries", "2")),  # it would retry forever
        }
        for name, proc in strangers.items():
            assert proc.wait(timeout=90) != 0, f"{name} SuperNode kept running"
            assert "Failed to initialize the connection to the SuperLink" in logs[name].read_text(), name
        assert "Failed to activate SuperNode" in logs["unregistered"].read_text()
        assert "All SuperNodes must be registered" in logs["keyless"].read_text()
        link_log = (fed.root / "superlink.log").read_text()
        assert "[ApiError:2004]" in link_log and "No SuperNode found with the given public key" in link_log
        assert "[ApiError:2001]" in link_log  # self-registration refused
        assert fed.node_status() == registered  # nobody joined
        # The CLI: plain text and a TLS client trusting another CA get nowhere.
        plain = _flwr_as_stranger(tmp_path, "plain", fed.port, None)
        other = make_certs(tmp_path / "other-ca")
        mitm = _flwr_as_stranger(tmp_path, "mitm", fed.port, other.ca)
        assert not plain["success"] and not mitm["success"], (plain, mitm)
        assert "Connection to the SuperLink is unavailable" in plain["error-message"] + mitm["error-message"]

        # Restart the SuperLink on the same database: registrations and node ids survive, the
        # SuperNodes reconnect on their own, and a run over TLS completes on the registered
        # nodes only. (One run, after the restart, keeps the test short: each ClientApp call
        # starts a process that imports torch.)
        fed.restart_superlink()
        assert set(fed.node_status()) == set(registered)
        out = tmp_path / "run"
        run, output = fed.run(f"rounds=2 eval-every=2 {FAST} out='{out}'")
        assert run.get("status") == "finished:completed", output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["num_nodes"] == 2 and summary["rounds"] == 2
        audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
        # Only the registered nodes trained, through the restarted SuperLink (the only one running).
        assert {str(a["node"]) for a in audit} == set(registered)
    finally:
        fed.stop()
    assert _no_processes_left(fed.root / "flwr-home")


@pytest.mark.engine
def test_fedrec_deploy_exits_nonzero_when_the_run_fails_and_stops_everything(tmp_path):
    root = tmp_path / "dep"
    result = CliRunner().invoke(cli, ["deploy", "--nodes", "1", "--dir", str(root), "--data-dir", str(tmp_path),
                                      "--run-config", f"{FAST} strategy='no-such-strategy'"])
    assert result.exit_code == 1, result.output
    assert "finished:failed" in result.output
    assert (root / "superlink.db").is_file() and _mode(root / "keys" / "node-0") == 0o600
    assert _no_processes_left(root / "flwr-home")
