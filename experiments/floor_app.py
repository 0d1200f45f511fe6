"""The Flower app of `fedrec bench`'s engine floor: a ClientApp that does nothing and a FedAvg
ServerApp over two nodes, so that what is left of a round is the engine's own cost. Run by
bench.engine_floor through simulations/engine.py (Flower imports it in flwr-simulation)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedrec.server.app import pull_often

CONFIG = {"rounds": 10, "out": ""}  # the run config: rounds to time, the JSON file to write the result to

client = ClientApp()


@client.train()
def _empty_train(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}),
                   reply_to=msg)


server = ServerApp()


@server.main()
def _main(grid: Grid, context: Context) -> None:
    pull_often(grid)  # the same engine settings as fedrec's own runs
    rounds = int(context.run_config["rounds"])
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
    strategy.start(grid=grid, initial_arrays=ArrayRecord({"x": Array(np.zeros(1, np.float32))}), num_rounds=1)
    start = time.perf_counter()  # after one warm-up round (actors started)
    strategy.start(grid=grid, initial_arrays=ArrayRecord({"x": Array(np.zeros(1, np.float32))}), num_rounds=rounds)
    seconds = (time.perf_counter() - start) / rounds
    Path(str(context.run_config["out"])).write_text(json.dumps({"seconds_per_round": seconds}))
