"""The saved global model, `model.npz`: item-side parameters only, no pickle.

Every run (federated and central) writes it to its run directory. Users' vectors and
biases are not in it: in a federated run they never left the devices. Where the writer
knows the public item catalogue, it is in the file too: `item-ids` (the data set's own item
ids, by model row) and `titles` (unicode strings).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .defaults import MODEL_FILE

MODEL_FORMAT = 1


CATALOGUE = ("item-ids", "titles")


def save_model(run_dir: Path, model: dict[str, np.ndarray], item_ids=None, titles=None) -> Path:
    """`model`: the algorithm's released arrays (ServerState.model())."""
    path = Path(run_dir) / MODEL_FILE
    tmp = path.with_name(path.name + ".tmp")
    catalogue = {} if item_ids is None else {"item-ids": np.asarray(item_ids, dtype=np.int64)}
    if titles is not None:
        catalogue["titles"] = np.asarray([str(t) for t in titles], dtype=np.str_)  # no object arrays: no pickle
    with open(tmp, "wb") as handle:
        np.savez(handle, format=np.array(MODEL_FORMAT), **model, **catalogue)
    os.replace(tmp, path)  # readers see the old model or the new one
    return path


def load_model(run_dir: Path) -> dict[str, np.ndarray]:
    """The released arrays of a run's model (pass them to its algorithm to score or recommend)."""
    with np.load(Path(run_dir) / MODEL_FILE, allow_pickle=False) as data:
        if int(data["format"]) != MODEL_FORMAT:
            raise ValueError(f"{run_dir}/{MODEL_FILE} has format {int(data['format'])}; "
                             f"this fedrec reads {MODEL_FORMAT}")
        return {k: data[k] for k in data.files if k not in ("format", *CATALOGUE)}


def load_catalogue(run_dir: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(item ids, titles) saved with the model; None where the writer did not know them."""
    with np.load(Path(run_dir) / MODEL_FILE, allow_pickle=False) as data:
        return tuple(data[k] if k in data.files else None for k in CATALOGUE)
