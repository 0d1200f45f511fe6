"""A finished run's directory as every command that reads one takes it: a central or federated
run, or a `fedrec compare` directory, whose federated run (<dir>/federated) is the one acted on
(its central/ run is the reference beside it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedrec.models.defaults import MODEL_FILE

from .config import ConfigError

ANY_RUN = "central, federated or compare"


@dataclass(frozen=True)
class RunPaths:
    given: Path  # what was passed to --run
    run: Path  # the run acted on
    central: Path | None  # the central baseline beside it (a compare directory's central/)

    @property
    def note(self) -> str | None:
        """One line for the user when the run acted on is not the directory given."""
        if self.central is None:
            return None
        return f"note: {self.given} is a compare directory; using its federated run, {self.run}"


def is_compare_dir(path: Path) -> bool:
    return (path / "federated").is_dir() and (path / "central").is_dir()


def locate(run: Path, kinds: str = ANY_RUN) -> RunPaths:
    """The run inside `run`, or a one-line ConfigError saying what to pass instead (`kinds`: the
    runs the caller takes, for that line)."""
    run = Path(run).expanduser()
    if not run.is_dir():
        raise ConfigError(f"{run} is not a directory; pass a finished run (the --out of fedrec central, simulate "
                          "or compare)")
    paths = RunPaths(run, run / "federated", run / "central") if is_compare_dir(run) else RunPaths(run, run, None)
    for needed in (MODEL_FILE, "config.toml"):
        if not (paths.run / needed).is_file():
            where = f"{run} (a compare directory) has no federated/{needed}" if paths.central else \
                f"{run} has no {needed}"
            raise ConfigError(f"{where}; pass the directory of a finished {kinds} run")
    return paths
