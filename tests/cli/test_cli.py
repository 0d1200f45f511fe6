"""The `fedrec` CLI: results on disk, one-line errors with exit code 2."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedrec.cli.main import cli
from fedrec.run.config import ConfigError

SMALL = ["--synthetic-users", "80", "--synthetic-items", "50", "--synthetic-density", "0.2", "--dim", "8"]


def test_central_writes_summary_and_metrics(tmp_path):
    out = tmp_path / "central"
    result = CliRunner().invoke(cli, ["central", "--dataset", "synthetic", *SMALL, "--epochs", "12",
                                      "--eval-every", "4", "--seed", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "central" and summary["dataset"] == "synthetic" and summary["split"] == "random"
    assert summary["epochs"] == 12 and summary["config"]["seed"] == 3 and summary["wall_seconds"] > 0
    assert {"rmse", "mae"} <= set(summary["metrics"])
    frame = pd.read_csv(out / "metrics.csv")
    assert list(frame["epoch"]) == [4, 8, 12] and frame["rmse"].notna().all()
    assert "rmse" in result.output


def test_partition_cuts_one_shard_per_node_and_prints_where(tmp_path):
    out = tmp_path / "shards"
    result = CliRunner().invoke(cli, ["partition", *SMALL[:-2], "--nodes", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out.resolve()) in result.output
    assert sorted(p.name for p in out.iterdir()) == ["items.json", "node-00000", "node-00001", "node-00002"]
    metas = [json.loads((out / f"node-0000{i}" / "meta.json").read_text()) for i in range(3)]
    assert [m["num_users"] for m in metas] == [27, 26, 27] and sum(m["num_users"] for m in metas) == 80


def test_config_file_then_flags(tmp_path):
    (tmp_path / "c.toml").write_text("[tool.flwr.app.config]\nepochs = 3\ndim = 4\neval-every = 3\n")
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["central", "--config", str(tmp_path / "c.toml"), *SMALL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["config"]["dim"] == 8  # the flag wins over the file


def _error(args):
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output.strip()


def test_bad_settings_give_one_line_and_exit_2(tmp_path):
    cases = {
        ("simulate", "--strategy", "fedfoo"): "'--strategy': 'fedfoo' is not one of 'fedadam'",
        ("simulate", "--rounds", "0"): "rounds must be > 0",
        ("central", "--model", "mf", "--lr", "-0.1"): "lr must be > 0",
        ("central", "--lr", "0.1"): "--lr does not apply with --model bpmf (what --model auto runs here)",
        ("simulate", "--users-per-round", "5000", *SMALL): "users-per-round=5000 is larger than the 80 users",
        ("central", "--dataset", "ml-100k", "--split", "u1", "--data-dir", str(tmp_path / "none")): "ml-100k is not at",
        ("central", "--split", "u3"): "exists only for ml-100k",
        ("central", "--config", str(tmp_path / "missing.toml")): "cannot read config file",
    }
    for args, expected in cases.items():
        code, output = _error(list(args))
        assert code == 2, (args, output)
        assert expected in output and "Traceback" not in output
        assert len(output.splitlines()) <= 3  # one message (progress line may precede it)
    assert not list(tmp_path.glob("**/summary.json"))


def test_every_command_builds_and_documents_its_flags_with_defaults():
    for command in ("central", "simulate", "compare", "tune", "accuracy", "bench", "audit", "privacy-sweep"):
        result = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0, (command, result.output)
        assert "--seed" in result.output and "[default: 0]" in result.output and "[default: synthetic]" in result.output
        # central trains on pooled data: federated and privacy flags are not offered; tune runs federated
        # trials too, but without privacy (its trials would spend privacy no epsilon covers)
        assert ("--users-per-round" in result.output) == (command != "central")
        assert ("--dp " in result.output) == (command not in ("central", "tune"))


def test_privacy_flags_are_checked_before_any_work(tmp_path):
    code, output = _error(["simulate", "--model", "mf", "--dp", "central", "--clipping-norm", "0",
                           "--noise-multiplier", "1", "--out", str(tmp_path / "x")])
    assert code == 2 and "needs --clipping-norm > 0" in output
    code, output = _error(["privacy-sweep", "--epsilons", "1,a", "--clipping-norm", "0.1"])
    assert code == 2 and "comma-separated list" in output
    assert not (tmp_path / "x").exists()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the CLI from an empty directory, so that anything it writes (runs/...) shows."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _one_line_exit_2(args, expected):
    code, output = _error(args)
    assert code == 2, (args, output)
    assert expected in output and "Traceback" not in output, (args, output)
    assert len(output.splitlines()) == 1, output


@pytest.mark.parametrize("args,expected", [
    (["central", "--server-lr", "nan"], "server-lr must be a finite number"),
    (["central", "--lr", "nan"], "lr must be a finite number"),
    (["central", "--init-std", "inf"], "init-std must be a finite number"),
    (["simulate", "--clipping-norm", "nan"], "clipping-norm must be a finite number"),
    (["simulate", "--dp", "central", "--clipping-norm", "0.1", "--target-epsilon", "nan"],
     "target-epsilon must be a finite number"),
    (["central", "--seed", "-1"], "seed must be between 0 and 2**63 - 1"),
    (["central", "--seed", str(2**63)], "seed must be between 0 and 2**63 - 1"),
    (["central", "--dim", "1e9"], "'--dim'"),
    (["central", "--dim", "1000000000"], "dim must be at most 8,192"),
    (["simulate", "--synthetic-users", "1e10"], "'--synthetic-users'"),
    (["simulate", "--synthetic-users", "10000000000"], "synthetic-users must be at most"),
    (["simulate", "--synthetic-users", "50000000", "--synthetic-items", "5000000"],
     "GB of memory and this machine has"),
    (["simulate", "--split", "loo", "--negatives", "1000000"], "negatives must be at most"),
    (["simulate", "--round-timeout", "-1"], "round-timeout must be >= 0"),
    (["simulate", "--min-reply-fraction", "1.5"], "min-reply-fraction must be in [0, 1]"),
    (["simulate", "--dropout", "1"], "dropout must be in [0, 1)"),
    (["simulate", "--robust-aggregation", "norm-bound", "--robust-bound", "0"], "robust-bound must be > 0"),
    (["simulate", "--checkpoint-every", "-1"], "checkpoint-every must be >= 0"),
    (["simulate", "--target-epsilon", "8"], "--target-epsilon does not apply with --dp none"),
    (["simulate", "--target-delta", "1e-6"], "--target-delta does not apply with --dp none"),
    (["simulate", "--secagg-min-fraction", "0.9"],
     "--secagg-min-fraction does not apply with --secure-aggregation none"),
    (["simulate", "--dataset", "ml-100k", "--synthetic-users", "80"],
     "--synthetic-users does not apply with --dataset ml-100k"),
    (["simulate", "--epochs", "5"], "--epochs does not apply to simulate"),
    (["central", "--dp", "central"], "--dp does not apply to central: central trains one model on pooled data"),
    (["central", "--rounds", "5", "--noise-multiplier", "1"], "--noise-multiplier, --rounds do not apply to central"),
    (["tune", "--dim", "16"], "--dim does not apply to tune"),
    (["central", "--resume", "runs/x"], "--resume does not apply to central"),
    (["simulate", "--resume", "runs/x", "--dim", "8"],
     "--resume continues runs/x with its own saved settings; drop --dim"),
    (["simulate", "--resume", "runs/x"], "--resume runs/x: no such run directory"),
    (["central", "--no-such-flag", "3"], "No such option"),
    (["bench", "--cases", "synthetic-1m,nope"], "--cases: unknown case(s) nope"),
    (["partition", "--epochs", "5"], "--epochs does not apply to partition"),
    (["partition", "--nodes", "500", *SMALL[:-2]], "cannot cut 80 users into 500 shards"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(in_tmp, args, expected):
    _one_line_exit_2(args, expected)
    assert list(in_tmp.iterdir()) == []


def test_bad_out_is_found_before_training(in_tmp, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr("fedrec.simulations.central.train_central", no_training)
    (in_tmp / "file").write_text("x")
    _one_line_exit_2(["central", "--out", str(in_tmp / "file" / "run")], "cannot be written (Not a directory)")
    _one_line_exit_2(["central", "--out", str(in_tmp / "file")], "cannot be written (File exists)")
    finished = in_tmp / "old"
    finished.mkdir()
    (finished / "summary.json").write_text("{}")
    _one_line_exit_2(["central", "--out", str(finished)], "already holds a run (summary.json)")
    _one_line_exit_2(["simulate", "--out", str(finished)], "or continue it with fedrec simulate --resume")
    assert (sorted(p.name for p in in_tmp.iterdir()) == ["file", "old"]
            and [p.name for p in finished.iterdir()] == ["summary.json"])


def test_a_run_that_fails_leaves_no_directory(in_tmp):
    code, output = _error(["central", "--dataset", "ml-100k", "--data-dir", "data/none", "--out", "out/run"])
    tried, error = output.splitlines()  # the download it tried (said before it starts), then why it failed
    assert code == 2 and tried.startswith("ml-100k is not at data/none/ml-100k: downloading file://")
    assert error.startswith("error: ml-100k is not at data/none/ml-100k/u.data and the download failed")
    _one_line_exit_2(["simulate", "--users-per-round", "5000", *SMALL], "is larger than the 80 users")
    assert list(in_tmp.iterdir()) == []  # neither the run directories nor the data directory


@pytest.mark.parametrize("error,expected", [
    (MemoryError(), "out of memory while running central; lower --dim"),
    (OSError(28, "No space left on device", "/full/disk/metrics.csv"),
     "/full/disk/metrics.csv: No space left on device"),
])
def test_memory_and_disk_errors_are_one_line(in_tmp, monkeypatch, error, expected):
    def fail(cfg):
        raise error

    monkeypatch.setattr("fedrec.cli.main.run_central_cli", fail)
    _one_line_exit_2(["central"], expected)
    assert list(in_tmp.iterdir()) == []


def test_config_file_settings_a_command_does_not_use_are_reset_with_a_note(in_tmp, monkeypatch):
    seen = {}

    def capture(cfg):
        seen["cfg"] = cfg
        raise ConfigError("stop here")

    monkeypatch.setattr("fedrec.cli.main.run_central_cli", capture)
    (in_tmp / "c.toml").write_text('dp = "central"\nclipping-norm = 0.1\ntarget-epsilon = 4.0\nrounds = 5\ndim = 4\n')
    code, output = _error(["central", "--config", "c.toml"])
    assert code == 2 and "note: central does not use --dp, --clipping-norm, --target-epsilon, --rounds" in output
    cfg = seen["cfg"]
    assert (cfg.dp, cfg.clipping_norm, cfg.target_epsilon, cfg.rounds, cfg.dim) == ("none", 0.0, 0.0, 60, 4)
    (in_tmp / "c.toml").write_text("rounds = true\n")
    _one_line_exit_2(["simulate", "--config", "c.toml"], "rounds=True is not a valid int")
    (in_tmp / "c.toml").write_text('resume = "runs/x"\n')
    _one_line_exit_2(["simulate", "--config", "c.toml"], "sets resume; pass --resume RUN_DIR")


def test_saved_config_repeats_the_run_into_a_new_directory(tmp_path, monkeypatch):
    out = tmp_path / "first"
    args = ["central", *SMALL, "--epochs", "2", "--eval-every", "2", "--seed", "5"]
    assert CliRunner().invoke(cli, [*args, "--out", str(out)]).exit_code == 0
    saved = (out / "config.toml").read_text()
    assert "\nout =" not in saved and "\nresume =" not in saved
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(cli, ["central", "--config", str(out / "config.toml")])
    assert result.exit_code == 0, result.output
    (rerun,) = (elsewhere / "runs").iterdir()
    assert (rerun / "config.toml").read_text() == saved  # the same experiment
    rerun_metrics = json.loads((rerun / "summary.json").read_text())["metrics"]
    assert rerun_metrics == json.loads((out / "summary.json").read_text())["metrics"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # the first run is untouched


def test_recommend_prints_a_users_top_n_unrated_items_refitted_on_the_device(tmp_path):
    from fedrec.datasets import cohort
    from fedrec.run.build import load_data
    from fedrec.run.config import RunConfig

    run = tmp_path / "central"
    trained = CliRunner().invoke(cli, ["central", *SMALL, "--epochs", "6", "--eval-every", "6", "--out", str(run)])
    assert trained.exit_code == 0, trained.output
    result = CliRunner().invoke(cli, ["recommend", "--run", str(run), "--user", "7", "--n", "5", "--json"])
    assert result.exit_code == 0, result.output
    picks = json.loads(result.output)
    assert [sorted(p) for p in picks] == [["item", "score", "title"]] * 5
    assert [p["score"] for p in picks] == sorted((p["score"] for p in picks), reverse=True)
    cfg = RunConfig.from_toml(run / "config.toml")
    rated = set(cohort(load_data(cfg), [7]).train_item.tolist())
    assert rated and not rated & {p["item"] for p in picks}  # nothing the user already rated
    lines = CliRunner().invoke(cli, ["recommend", "--run", str(run), "--user", "7", "--n", "5"]).output.splitlines()
    assert len(lines) == 5 and lines[0].split()[0] == f"{picks[0]['score']:.2f}"


@pytest.mark.parametrize("args, expected", [
    (["--user", "100000"], "unknown user '100000'"),
    (["--user", "1", "--run", "nowhere"], "nowhere is not a directory"),
])
def test_recommend_bad_input_is_one_line_exit_2(tmp_path, args, expected):
    run = tmp_path / "central"
    assert CliRunner().invoke(cli, ["central", *SMALL, "--epochs", "2", "--eval-every", "2",
                                    "--out", str(run)]).exit_code == 0
    full = ["recommend", "--run", str(run), *args] if "--run" not in args else ["recommend", *args]
    code, output = _error(full)
    assert code == 2 and expected in output and "Traceback" not in output and len(output.splitlines()) <= 2


def _in_process_simulate(monkeypatch):
    """`fedrec simulate` with the server and ClientApp in this process (no engine): what the CLI prints
    around a run does not depend on the engine."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.client.app import app as client_app
    from fedrec.server.runner import run_server
    from fedrec.simulations.inprocess import InProcessGrid

    def simulate(cfg, on_round=None, say=print, **_):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        return run_server(InProcessGrid(client_app, 2), cfg.resolved().validate(), on_round)

    monkeypatch.setattr("fedrec.simulations.federated.simulate", simulate)


def test_every_run_says_what_it_protects_when_it_starts_and_beside_its_results(tmp_path, monkeypatch):
    _in_process_simulate(monkeypatch)
    result = CliRunner().invoke(cli, ["simulate", *SMALL, "--rounds", "2", "--eval-every", "2",
                                      "--out", str(tmp_path / "plain")])
    assert result.exit_code == 0, result.output
    line = "privacy: against the server: none: the server can compute each user's vector and ratings from its upload"
    assert result.output.count(line) == 2  # at the start and beside the results
    assert "model: bpmf, what --model auto runs" in result.output
    summary = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert summary["privacy"]["against_server"].startswith("none: the server can compute")
    assert summary["model"] == "bpmf" and "--model auto" in summary["model_reason"]


def test_a_dp_run_prints_no_timing_and_names_its_epsilon(tmp_path, monkeypatch):
    """Seconds per round depend on who was sampled: the ledger does not release them, so neither may the
    progress bar (elapsed time, ETA) nor the results table."""
    _in_process_simulate(monkeypatch)
    args = ["simulate", *SMALL, "--rounds", "3", "--eval-every", "3", "--dp", "central", "--clipping-norm", "0.3",
            "--target-epsilon", "8", "--users-per-round", "40", "--sampling", "poisson"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "dp")])
    assert result.exit_code == 0, result.output
    assert "0:00:" not in result.output and "eta" not in result.output and " s)" not in result.output
    assert "ε=" in result.output and "δ=1e-05" in result.output and "z=" in result.output
    assert "against readers of the release: user-level DP with epsilon at most 8" in result.output  # the plan
    saved = (tmp_path / "dp" / "config.toml").read_text()
    assert "noise-multiplier = 0.0" in saved  # calibrated: a run repeated from it is calibrated again
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert summary["privacy"]["noise_multiplier"] > 0 and "calibrated" in summary["privacy"]["noise_multiplier_source"]
    # the same settings with fewer rounds: calibrated again, for 2 rounds, to the same target
    again = CliRunner().invoke(cli, ["simulate", "--config", str(tmp_path / "dp" / "config.toml"), "--rounds", "2",
                                     "--eval-every", "2", "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    repeated = json.loads((tmp_path / "again" / "summary.json").read_text())["privacy"]
    assert repeated["epsilon"] == pytest.approx(8.0, rel=0.01)
    assert repeated["noise_multiplier"] < summary["privacy"]["noise_multiplier"]


def test_recommend_leaves_out_items_no_one_rated_in_training_unless_asked(tmp_path, shared_data):
    """u1 has items rated only in its test file: the model never learned them. One such item given the
    largest bias would top every list; recommend leaves it out unless --include-unrated-items."""
    import numpy as np

    from fedrec.models.saved import load_model, save_model
    from fedrec.run.build import load_data
    from fedrec.run.config import RunConfig

    run = tmp_path / "u1"
    trained = CliRunner().invoke(cli, ["central", "--dataset", "ml-100k", "--data-dir", str(shared_data), "--split",
                                       "u1", "--model", "mf", "--epochs", "3", "--eval-every", "3", "--out", str(run)])
    assert trained.exit_code == 0, trained.output
    split = load_data(RunConfig.from_toml(run / "config.toml"))
    unrated = np.flatnonzero(np.bincount(split.train.item, minlength=split.n_items) == 0)
    assert len(unrated)
    model = load_model(run)
    model["item-bias"][int(unrated[0])] = 100.0
    with np.load(run / "model.npz") as data:
        save_model(run, model, data["item-ids"], data["titles"])
    picked = int(split.item_ids[unrated[0]])
    args = ["recommend", "--run", str(run), "--user", "1", "--n", "3", "--json"]
    assert picked not in [p["item"] for p in json.loads(CliRunner().invoke(cli, args).output)]
    shown = json.loads(CliRunner().invoke(cli, [*args, "--include-unrated-items"]).output)
    assert shown[0]["item"] == picked


def test_a_bpmf_run_shorter_than_its_burn_in_averages_its_later_half(tmp_path):
    """With the default burn-in of 20 a 10-epoch run would serve its last, unaveraged draw."""
    out = tmp_path / "short"
    result = CliRunner().invoke(cli, ["central", *SMALL[:-2], "--epochs", "10", "--eval-every", "10",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "note: --burn-in 20 is more than half of the 10 epochs; the model averages the draws after 5" in \
        " ".join(result.output.split())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "bpmf" and summary["burn_in"] == 5


def test_recommend_takes_a_compare_directory_and_says_it_uses_its_federated_run(tmp_path):
    import shutil

    run = tmp_path / "central"
    assert CliRunner().invoke(cli, ["central", *SMALL, "--epochs", "2", "--eval-every", "2",
                                    "--out", str(run)]).exit_code == 0
    compare = tmp_path / "compare"
    for side in ("central", "federated"):  # the shape of a compare directory (its sides: any finished runs)
        shutil.copytree(run, compare / side)
    direct = CliRunner().invoke(cli, ["recommend", "--run", str(run), "--user", "7", "--json"])
    via = CliRunner().invoke(cli, ["recommend", "--run", str(compare), "--user", "7", "--json"])
    assert via.exit_code == 0, via.output
    assert json.loads(via.stdout) == json.loads(direct.stdout)
    assert via.stderr.splitlines() == [f"note: {compare} is a compare directory; using its federated run, "
                                       f"{compare / 'federated'}"]
    (compare / "federated" / "model.npz").unlink()  # an interrupted federated side: said, not a traceback
    _one_line_exit_2(["recommend", "--run", str(compare), "--user", "7"],
                     f"{compare} (a compare directory) has no federated/model.npz")


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("2", "2")])
def test_the_command_runs_torch_on_one_thread_unless_told(monkeypatch, preset, expected):
    import fedrec.cli.main as main_module

    monkeypatch.setenv("OMP_NUM_THREADS", preset or "")  # so that what main() sets is undone after the test
    if preset is None:
        monkeypatch.delenv("OMP_NUM_THREADS")
    seen = {}
    monkeypatch.setattr(main_module, "cli", lambda: seen.update(threads=os.environ.get("OMP_NUM_THREADS")))
    main_module.main()
    assert seen == {"threads": expected}
