"""The ruff configuration in pyproject.toml holds for the whole repository: line length,
import order, unused imports, and the rule that keeps Flower out of models/ and datasets/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.is_file():
        return [str(exe)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.fail("ruff is not installed: pip install -e '.[dev]' installs the pinned version")


def test_repository_passes_ruff():
    result = subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise", str(REPO)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_flower_import_in_models_and_datasets_is_refused():
    """The banned-import rule is live: a models/ or datasets/ file importing flwr fails the check."""
    for folder in ("models", "datasets"):
        result = subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise",
                                 "--stdin-filename", f"{folder}/probe.py", "-"],
                                input="from flwr.app import Context\n\nprint(Context)\n",
                                capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 1 and "TID251" in result.stdout, result.stdout
