"""The command line's start: help grouped by the config's field groups with every choice listed,
no heavy import before a command runs, --version, and optional features that name their extra."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from importlib.metadata import version

import click
import pytest
import typer.main
from typer.testing import CliRunner

from fedrec.cli import extras
from fedrec.cli.main import cli
from fedrec.run.config import RunConfig

HEAVY = ("torch", "flwr", "ray", "pandas", "matplotlib", "numpy", "optuna", "flask")


def _loaded_after(code: str) -> set[str]:
    """The heavy modules a fresh interpreter holds after running `code`."""
    probe = f"{code}\nimport sys\nprint('loaded:', *(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.splitlines()[-1].split()[1:])


def test_the_cli_module_and_its_help_import_nothing_heavy():
    assert _loaded_after("import fedrec.cli.main") == set()
    for args in ([], ["simulate"], ["compare"], ["serve"]):
        shown = f"from fedrec.cli.main import cli\ncli({[*args, '--help']!r}, standalone_mode=False)"
        assert _loaded_after(shown) == set(), args
    assert {"torch", "numpy"} <= _loaded_after("import fedrec.models.mf")  # the probe sees what is imported


def test_help_groups_every_setting_by_its_field_group_and_lists_choices():
    result = CliRunner().invoke(cli, ["simulate", "--help"], env={"COLUMNS": "200"})  # one line per option
    assert result.exit_code == 0, result.output
    text = result.output
    panels = [text.index(f"─ {group} ─") for group in ("Data", "Synthetic data", "Model", "Training", "Privacy",
                                                        "Reliability", "Engine", "Output")]
    assert panels == sorted(panels)  # in the config's order
    flowing = " ".join(text.replace("│", " ").split())  # a long help wraps even at 200 columns
    assert "One of: auto, mf, svdpp, bpmf, dpstats, pfedrec, fedrecon, fcf." in flowing
    assert "[dense|sparse|padded]" in text
    assert "[fixed|poisson]" in text
    assert "One of: none, central, local, distributed." in text  # long lists are spelled out in the help
    assert "One of: fedadam, fedavg, fedavgm, fedadagrad." in text and "ml-latest-small" in text
    assert "--tuned" not in text  # internal: set by tune in the settings it writes


def test_every_config_field_becomes_an_option_with_its_group_choices_and_visibility():
    command = typer.main.get_command(cli).commands["simulate"]
    options = {p.name: p for p in command.params}
    for f in fields(RunConfig):
        if f.name == "epochs":  # simulate trains for --rounds: the central baseline's epochs are hidden
            continue
        option, meta = options[f.name], f.metadata
        assert option.rich_help_panel == meta["group"], f.name
        assert option.hidden == meta["internal"], f.name
        if meta["choices"]:
            assert isinstance(option.type, click.Choice) and tuple(option.type.choices) == meta["choices"], f.name
        else:
            assert not isinstance(option.type, click.Choice), f.name


def test_a_value_outside_the_choices_is_one_line_and_exit_2():
    result = CliRunner().invoke(cli, ["simulate", "--dp", "centrl"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "'centrl' is not one of 'none', 'central', 'local', 'distributed'" in result.output


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"fedrec {version('fedrec')}"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("module, extra, args", [
    ("optuna", "tune", ["tune"]),
    ("optuna", "tune", ["compare", "--tune"]),
    ("optuna", "tune", ["accuracy", "--tune-trials", "3"]),
    ("flask", "serve", ["serve", "--run", "runs/x"]),
    ("flask", "serve", ["serve-bench", "--run", "runs/x"]),
])
def test_a_command_whose_extra_is_missing_names_it_in_one_line_and_exits_2(in_tmp, monkeypatch, module, extra, args):
    assert extras.installed(extra)  # here (the dev extra pulls every one)
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: `import module` raises ImportError
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert f"fedrec's {extra} extra" in line and f'[{extra}]"' in line and "pip install" in line
    assert list(in_tmp.iterdir()) == []  # no run directory left behind


def test_the_install_command_installs_into_this_environment_from_where_fedrec_came_from():
    command = extras.install_command("serve")
    assert command.startswith(f"{sys.executable} -m pip install ")
    # this checkout is an editable install (make install): the extra comes from it, never from an index
    assert command.endswith('[serve]"') and ("-e " in command) == ('"fedrec[serve]"' not in command)
