"""An experiment grid file (`fedrec experiment FILE.toml`) and the cells it stands for.

    name = "privacy-utility"          # optional; default: the file's name
    algorithms = ["mf"]               # --model of each cell
    repeats = 3                       # seeds seed, seed+1, ... (ML-100K u1..u5: the next folds too)
    references = ["central", "non-private"]   # per algorithm and repeat (the default: both)

    [settings]                        # the base: the names of the flags and config.toml
    dataset = "ml-100k"
    dp = "central"

    [grid]                            # axes: every combination is a cell
    target-epsilon = [1, 2, 4, 8, 16]

A cell is one run: an algorithm, one value per axis, one repeat. The references run without privacy
(no DP, clipping or SecAgg+): "central" the central baseline, on each value of the axes it reads
(not the privacy or federated-only ones: its runs would be the same); "non-private" the federated
run, on each value of the axes other than the privacy ones. Every cell is checked before any runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from fedrec.privacy.config import PrivacyConfig
from fedrec.run.config import CENTRAL_SETTINGS, ConfigError, RunConfig

from .repeats import Repeat, repeats

REFERENCES = ("central", "non-private")
KEYS = {"name", "algorithms", "repeats", "references", "settings", "grid"}
# What the references leave out: the privacy mechanisms (their cost is what the grid measures).
NON_PRIVATE = {"dp": "none", "noise_multiplier": 0.0, "target_epsilon": 0.0, "clipping_norm": 0.0,
               "secure_aggregation": "none"}


@dataclass(frozen=True)
class Cell:
    kind: str  # "federated", or a reference: "central", "non-private"
    algorithm: str
    axes: dict  # the grid's values of this cell (kebab-case names); {} for a reference
    repeat: Repeat

    @property
    def key(self) -> str:
        """A name for the cell's files, unique in its grid."""
        values = "".join(f"-{name}={value}" for name, value in self.axes.items())
        return f"{self.kind}-{self.algorithm}{values}-r{self.repeat.index}".replace("/", "_")

    @property
    def cfg(self) -> RunConfig:
        return self.repeat.cfg


@dataclass(frozen=True)
class Grid:
    name: str
    digest: str  # of the file's contents as parsed: a changed grid refuses to resume
    axes: dict[str, list]
    cells: list[Cell]
    base: RunConfig


def read_grid(path: Path, data_dir: str = "") -> Grid:
    """The grid in `path` (one-line ConfigError for anything wrong), every cell checked; `data_dir`
    overrides the file's data-dir (where this machine keeps the data: not part of the experiment)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot read grid file {path}: {error}") from None
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; a grid file has {', '.join(sorted(KEYS))}")
    algorithms, count = data.get("algorithms"), data.get("repeats", 1)
    references = data.get("references", list(REFERENCES))
    settings, axes = data.get("settings", {}), data.get("grid", {})
    if not (isinstance(algorithms, list) and algorithms and all(isinstance(a, str) for a in algorithms)):
        raise ConfigError(f"{path}: algorithms must be a non-empty list of model names, e.g. algorithms = [\"mf\"]")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigError(f"{path}: repeats must be a whole number >= 1 (got {count!r})")
    if not isinstance(references, list) or set(references) - set(REFERENCES):
        raise ConfigError(f"{path}: references must be a list of {', '.join(REFERENCES)}")
    if not isinstance(settings, dict) or not isinstance(axes, dict):
        raise ConfigError(f"{path}: [settings] and [grid] must be tables")
    for name, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid axis {name} must be a non-empty list of values")
    for name in ("model", "out", "resume"):
        if name in settings or name in axes:
            raise ConfigError(f"{path}: {name} is not set in a grid file"
                              + ("; list the models in algorithms" if name == "model" else ""))
    try:
        base = RunConfig.from_mapping(settings | ({"data-dir": data_dir} if data_dir else {}))
        for algorithm in algorithms:
            dataclasses.replace(base, model=algorithm).check_values()  # a name --model knows
        for name, values in axes.items():
            for value in values:
                RunConfig.from_mapping({name: value}, base)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    cells = _cells(base, algorithms, axes, count, references)
    for cell in cells:
        _check(cell, path)
    return Grid(str(data.get("name") or Path(path).stem), digest, axes, cells, base)


def reference_axes(kind: str, axes: dict) -> dict:
    """The axes a reference follows: central, the settings central training reads; the non-private
    federated run, every setting but the privacy ones."""
    reads = CENTRAL_SETTINGS if kind == "central" else {f.name for f in fields(RunConfig)}
    private = {f.name for f in fields(PrivacyConfig)}
    return {k: v for k, v in axes.items() if k.replace("-", "_") in reads - private}


def _cells(base: RunConfig, algorithms: list[str], axes: dict, count: int, references: list[str]) -> list[Cell]:
    cells, seen = [], set()
    for algorithm in algorithms:
        model = dataclasses.replace(base, model=algorithm)
        for values in itertools.product(*axes.values()):
            chosen = dict(zip(axes, values))
            cfg = RunConfig.from_mapping(chosen, model)
            cells += [Cell("federated", algorithm, chosen, rep) for rep in repeats(cfg, count)]
            for kind in references:
                follows = reference_axes(kind, chosen)
                if (kind, algorithm, tuple(follows.items())) in seen:
                    continue
                seen.add((kind, algorithm, tuple(follows.items())))
                plain = dataclasses.replace(RunConfig.from_mapping(follows, model), **NON_PRIVATE)
                cells += [Cell(kind, algorithm, follows, rep) for rep in repeats(plain, count)]
    return cells


def _check(cell: Cell, path: Path) -> None:
    """What a run would refuse, refused now: before any cell has run, nothing is written."""
    from fedrec.simulations.federated import check_population

    where = f"{path}: cell {cell.key}"
    try:
        cfg = cell.cfg.resolved().validate()
        if cell.kind != "central":
            check_population(cfg)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
