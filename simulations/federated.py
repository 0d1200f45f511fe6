"""Run a federated simulation through Flower's simulation engine (Ray backend).

`simulate(cfg)` is the Python entry point for notebooks and tests: it builds the
ServerApp around `cfg` (run_simulation hands the ServerApp an empty run_config, so the
config travels by closure) and returns the outcome object the server produced.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrec.client.app import app as client_app
from fedrec.common.build import load_data, num_nodes
from fedrec.common.config import ConfigError, RunConfig
from fedrec.datasets import load_split
from fedrec.server.app import FederatedOutcome, run_server


def check_population(cfg: RunConfig) -> int:
    """Validate what depends on the data before anything starts; returns the user count."""
    population = load_data(cfg).n_users
    load_split.cache_clear()  # the driver needs the count only; the nodes load their own copy
    if cfg.users_per_round > population:
        raise ConfigError(f"users-per-round={cfg.users_per_round} is larger than the {population} users "
                          f"of {cfg.dataset}; use at most {population} (0 = all)")
    return population


def simulate(cfg: RunConfig, on_round: Callable[[dict], None] | None = None,
             num_cpus: int | None = None) -> FederatedOutcome:
    cfg = cfg.resolved().validate()
    nodes = num_nodes(cfg, check_population(cfg))
    outcome: dict = {}

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            outcome["result"] = run_server(grid, cfg, on_round)
        except BaseException as error:  # run_simulation only logs; hand it to the caller
            outcome["error"] = error
            raise

    from flwr.simulation import run_simulation  # imports Ray: keep it off the CLI's start-up path

    cpus = num_cpus or os.cpu_count() or 2
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "num_gpus": 0, "logging_level": logging.ERROR,
                             "log_to_driver": False, "include_dashboard": False}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=nodes, backend_config=backend)
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:
        raise RuntimeError("the simulation ended without a result; see the Flower log above")
    return outcome["result"]
