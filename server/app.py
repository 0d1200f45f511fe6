"""ServerApp: Flower's entry point, thin glue over fedrec.server.runner.run_server."""

from __future__ import annotations

import threading
from logging import WARNING

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedrec.run.config import RunConfig

from .rounds import stop_on_signals
from .runner import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run .`: every setting comes from the run config. SIGTERM (e.g. `flwr stop`)
    ends the run after the current round with a checkpoint; the run then counts as failed for Flower,
    and `resume=<run dir>` continues it."""
    stop = threading.Event()
    with stop_on_signals(stop, say=lambda line: log(WARNING, line)):
        outcome = run_server(grid, RunConfig.from_mapping(dict(context.run_config)), stop=stop)
    if outcome.status != "completed":
        raise RuntimeError(f"run {outcome.status}; continue it with --run-config 'resume=\"{outcome.run_dir}\"'")
