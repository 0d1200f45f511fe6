"""examples/central_vs_federated.ipynb runs top to bottom (nbclient): a failing cell fails the test."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "central_vs_federated.ipynb"


def _run(notebook, tmp_path) -> None:
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                   ).execute()


def test_the_example_notebook_runs_and_shows_intervals(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    _run(notebook, tmp_path)
    shown = "".join(str(o.get("data", {}).get("text/plain", "")) for c in notebook.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
    assert "central - federated" in shown and "low" in shown
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("name") == "stderr"]
    assert not errors, errors  # nothing from Flower in a researcher's notebook


def test_a_failing_cell_fails_the_run(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.insert(2, nbformat.v4.new_code_cell("raise RuntimeError('cell failed')"))
    with pytest.raises(CellExecutionError, match="cell failed"):
        _run(notebook, tmp_path)
