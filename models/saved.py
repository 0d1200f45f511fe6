"""The saved global model, `model.npz`: item-side parameters only, no pickle.

Every run (federated and central) writes it to its run directory. Users' vectors and
biases are not in it: in a federated run they never left the devices.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .mf import ItemParams

MODEL_FILE = "model.npz"
MODEL_FORMAT = 1


def save_model(run_dir: Path, items: ItemParams) -> Path:
    path = Path(run_dir) / MODEL_FILE
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, format=np.array(MODEL_FORMAT), **items.numpy())
    os.replace(tmp, path)  # readers see the old model or the new one
    return path


def load_model(run_dir: Path) -> ItemParams:
    with np.load(Path(run_dir) / MODEL_FILE, allow_pickle=False) as data:
        if int(data["format"]) != MODEL_FORMAT:
            raise ValueError(f"{run_dir}/{MODEL_FILE} has format {int(data['format'])}; "
                             f"this fedrec reads {MODEL_FORMAT}")
        return ItemParams.from_arrays({k: data[k] for k in data.files if k != "format"})
