"""The driver side of simulate() on Flower's runtime, without starting it: the app directory it
hands `flwr run`, the progress it reads from metrics.csv, the stop request it makes, the
processes it would end (the engine itself runs in test_engines.py)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import zipfile

import pytest

from fedrec.run.config import RunConfig
from fedrec.server.rounds import StopRequest
from fedrec.simulations.engine import MARK, marked, stop_marked, write_app
from fedrec.simulations.federated import CLIENTAPP, SERVERAPP, MetricsFollower, read_rows


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec")  # in Flower's FAB build
def test_the_app_directory_carries_no_code_so_flower_imports_the_installed_fedrec(tmp_path):
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    app = write_app(tmp_path / "app", SERVERAPP, CLIENTAPP, RunConfig().to_dict())
    config, _ = load_and_validate(app / "pyproject.toml")  # what `flwr run` checks (components importable)
    assert config["tool"]["flwr"]["app"]["components"] == {"serverapp": SERVERAPP, "clientapp": CLIENTAPP}
    assert RunConfig.from_mapping(config["tool"]["flwr"]["app"]["config"]) == RunConfig()
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    assert not [n for n in names if n.endswith(".py")], names  # nothing that could shadow the installed package


def test_progress_follows_metrics_csv_row_by_row_and_a_resumed_file_only_once_rewritten(tmp_path):
    path, seen = tmp_path / "metrics.csv", []
    follow = MetricsFollower(path, seen.append)
    follow()  # no file yet
    path.write_text("round,train_loss,rmse\r\n1,0.5,\r\n2,0.4,0.9\r\n3,0.3")  # round 3 half written
    follow()
    assert seen == [{"round": 1, "train_loss": 0.5}, {"round": 2, "train_loss": 0.4, "rmse": 0.9}]
    with open(path, "a") as handle:
        handle.write(",\r\n")
    follow()
    assert [r["round"] for r in seen] == [1, 2, 3]

    # A resumed run (checkpoint after round 2): the file still holds the cut-off round 3 until the
    # server writes it anew with the checkpoint's two rows.
    resumed = []
    follow = MetricsFollower(path, resumed.append, skip=2)
    follow()
    assert resumed == []
    time.sleep(0.01)
    path.write_text("round,train_loss,rmse\r\n1,0.5,\r\n2,0.4,0.9\r\n3,0.35,\r\n")
    follow()
    assert resumed == [{"round": 3, "train_loss": 0.35}]
    assert read_rows(path)[-1] == {"round": 3, "train_loss": 0.35}


def test_a_stop_request_reaches_another_process_through_its_file(tmp_path):
    asked = StopRequest(tmp_path / "control" / "stop")
    asked.set()  # before the directory exists: remembered here, the file is made later
    assert asked.is_set() and not (tmp_path / "control").exists()
    (tmp_path / "control").mkdir()
    asked.set()
    assert StopRequest(tmp_path / "control" / "stop").is_set()  # what the ServerApp's process sees
    assert not StopRequest(tmp_path / "elsewhere").is_set()


def test_stop_ends_the_processes_carrying_the_marker_and_no_others(tmp_path):
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    ours = [subprocess.Popen(sleep, env=dict(os.environ, **{MARK: str(tmp_path)}), start_new_session=True)
            for _ in range(2)]
    other = subprocess.Popen(sleep, env=dict(os.environ, **{MARK: str(tmp_path / "other")}))
    try:
        deadline = time.monotonic() + 10
        while len(marked(str(tmp_path))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(marked(str(tmp_path))) == sorted(p.pid for p in ours)
        stop_marked(str(tmp_path), grace=5)
        assert [p.wait(timeout=5) for p in ours] == [-15, -15] and other.poll() is None
    finally:
        other.kill()
        other.wait()
