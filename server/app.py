"""ServerApp: Flower's entry point, thin glue over fedrec.server.runner.run_server."""

from __future__ import annotations

import json
import os
import pickle
from logging import WARNING
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedrec.run.config import RunConfig

from .rounds import StopRequest, stop_on_signals
from .runner import run_server

app = ServerApp()

CONTROL_ENV = "FEDREC_RUN_CONTROL"
"""A private directory fedrec's driver (simulations/engine.py) shares with this ServerApp, which
Flower runs in its own flwr-simulation process: `inputs.json` from the driver (`exclude`: users to
draw and drop; `shards`: the operator's shard set, whose public item catalogue goes into
model.npz), `stop` (created on the driver's first Ctrl-C) and, from here, `error.pickle` (what
ended a failed run, raised again in the driver)."""

GRID_PULL_SECONDS = 0.02
"""How often the ServerApp asks the simulation engine for replies. Flower's in-memory grid asks
every 0.1 s; a round whose nodes answer in 50 ms then waits a whole extra tick."""


def pull_often(grid: Grid) -> None:
    """Flower's InMemoryGrid (simulation) takes its pull interval as a constructor argument that
    flwr-simulation leaves at 0.1 s; other grids (the Deployment Engine's) are left alone."""
    if hasattr(grid, "pull_interval"):
        grid.pull_interval = GRID_PULL_SECONDS


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run`: every setting comes from the run config ([tool.flwr.app.config]
    and --run-config). A stop request (SIGTERM where the ServerApp runs in the main thread, as
    with `flwr stop` in deployment; the control directory's `stop` file in simulation, where it
    runs in a thread) ends the run after the current round with a checkpoint; the run then counts
    as failed for Flower, and `resume=<run dir>` continues it."""
    from fedrec.datasets.shards import read_items

    pull_often(grid)
    control = Path(os.environ[CONTROL_ENV]) if os.environ.get(CONTROL_ENV) else None
    inputs = json.loads((control / "inputs.json").read_text()) if control else {}
    stop = StopRequest(control / "stop" if control else None)
    try:
        with stop_on_signals(stop, say=lambda line: log(WARNING, line)):
            outcome = run_server(grid, RunConfig.from_mapping(dict(context.run_config)), stop=stop,
                                 catalogue=read_items(inputs["shards"]) if inputs.get("shards") else None,
                                 exclude=inputs.get("exclude", ()))
    except BaseException as error:
        if control:
            try:
                saved = pickle.dumps(error)
            except Exception:  # an exception holding something unpicklable: its message will do
                saved = pickle.dumps(RuntimeError(str(error).splitlines()[0] if str(error) else type(error).__name__))
            (control / "error.pickle").write_bytes(saved)
        raise
    if outcome.status != "completed":
        raise RuntimeError(f"run {outcome.status}; continue it with --run-config 'resume=\"{outcome.run_dir}\"'")
