"""Poisoning, measured: one client in a hundred sends -1000 x its update.

Every user sits on its own node (the deployment shape), so a hostile node is one user. The
hostile client is the real ClientApp with its train reply tampered afterwards
(`HostileClientApp`): it trains honestly, then scales what it uploads. Runs, on the same
seed, data and sampled users:
- clean: nobody is hostile;
- attacked, no defences: the server's reply checks switched off (as before they existed);
- attacked, defences: the reply checks and --robust-aggregation norm-bound;
and the same three under central DP (clipping on, noise from the seed so the three runs
share it): there the n·C check rejects the hostile reply, and norm-bound does nothing
(fedrec.server.robust: no data-dependent bound under DP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from unittest import mock

from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp import ClientApp

from fedrec.client.app import app as real_client_app
from fedrec.run import schema
from fedrec.run.build import load_data
from fedrec.run.config import RunConfig
from fedrec.run.rundir import make_run_dir, write_json
from fedrec.server import federation as federation_module
from fedrec.server.runner import run_server
from fedrec.simulations.inprocess import InProcessGrid


class HostileClientApp(ClientApp):
    """The real ClientApp; on the hostile partitions, its train replies' arrays times `factor`."""

    def __init__(self, inner: ClientApp, hostile: set[int], factor: float):
        super().__init__()
        self.inner, self.hostile, self.factor = inner, hostile, factor
        self.tampered = 0  # replies changed, to show the attack happened

    def __call__(self, message: Message, context: Context) -> Message:
        reply = self.inner(message, context)
        if (message.metadata.message_type == MessageType.TRAIN and not reply.has_error()
                and int(context.node_config["partition-id"]) in self.hostile and schema.ARRAYS in reply.content):
            arrays = reply.content[schema.ARRAYS]
            values = {k: arrays[k].numpy() for k in arrays.keys()}
            reply.content[schema.ARRAYS] = ArrayRecord({
                k: Array(v if k == schema.ITEM_INDEX else (v * self.factor).astype(v.dtype))
                for k, v in values.items()})
            self.tampered += 1
        return reply


class LeanGrid(InProcessGrid):
    """InProcessGrid without its message log (a 60-round run of 943 nodes would keep every reply),
    whose nodes read the data from `data_dir`, as a SuperNode's node config tells it."""

    def __init__(self, client_app: ClientApp, num_nodes: int, data_dir: str = ""):
        super().__init__(client_app, num_nodes)
        if data_dir:
            for context in self.contexts.values():
                context.node_config["data-dir"] = data_dir

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        self.sent.clear()
        self.replies.clear()
        return replies


@contextlib.contextmanager
def checks_off():
    """The federation without its reply checks: every well-formed reply is applied, as before they existed."""
    with mock.patch.object(federation_module, "check_train_reply", lambda *a, **k: None), \
         mock.patch.object(federation_module, "check_reply_norm", lambda *a, **k: None):
        yield


def _run(name: str, cfg: RunConfig, hostile: set[int], factor: float, defended: bool, nodes: int, log) -> dict:
    app = HostileClientApp(real_client_app, hostile, factor)
    start = time.perf_counter()
    with contextlib.nullcontext() if defended else checks_off():
        outcome = run_server(LeanGrid(app, nodes, cfg.data_dir), cfg)
    dropped = [line for line in outcome.audit if line.get("dropped") == "rejected"]
    row = {"run": name, "dp": cfg.dp, "robust_aggregation": cfg.robust_aggregation, "checks": defended,
           "hostile_replies": app.tampered, "rejected": len(dropped),
           "scaled": int(sum(r.get("replies_scaled", 0) for r in outcome.history)),  # not released under DP
           **outcome.summary["metrics"], "seconds": round(time.perf_counter() - start, 1)}
    log(f"{name:28s} rmse {row.get('rmse', float('nan')):.4f}  hostile replies {row['hostile_replies']:3d}  "
        f"rejected {row['rejected']:3d}  scaled {row['scaled']:3d}  ({row['seconds']} s)")
    return row


def run_poisoning(cfg: RunConfig, log=print, hostile_every: int = 100, factor: float = -1000.0,
                  clipping_norm: float = 0.05, noise_multiplier: float = 1.0) -> dict:
    """Clean, attacked and defended RMSE with and without central DP; writes poisoning.json.

    cfg: the data set, split, rounds and users per round (0 is taken as 100). Users whose
    index is a multiple of `hostile_every` are hostile. Central DP runs use cfg's clipping
    norm and noise multiplier when set, else `clipping_norm` and `noise_multiplier`.
    """
    cfg = cfg.resolved().validate()
    base = dataclasses.replace(cfg, users_per_round=cfg.users_per_round or 100, dp="none", noise_multiplier=0.0,
                               clipping_norm=0.0, robust_aggregation="none")
    central = dataclasses.replace(base, dp="central", clipping_norm=cfg.clipping_norm or clipping_norm,
                                  noise_multiplier=cfg.noise_multiplier or noise_multiplier, reproducible_noise=True)
    for checked in (base, central):  # a model that refuses DP or partial participation fails here, before any run
        checked.validate()
    run_dir = make_run_dir(cfg, "poisoning")
    population = load_data(cfg).n_users
    hostile = set(range(0, population, hostile_every))
    log(f"{cfg.dataset} {cfg.split}: {population} one-user nodes, {len(hostile)} hostile (x{factor:g}), "
        f"{base.users_per_round} users per round, {cfg.rounds} rounds")
    plan = [  # name, config, hostile users, checks on
        ("clean", base, set(), True),
        ("clean, norm-bound", dataclasses.replace(base, robust_aggregation="norm-bound"), set(), True),
        ("attacked, no defences", base, hostile, False),
        ("attacked, defences", dataclasses.replace(base, robust_aggregation="norm-bound"), hostile, True),
        ("central DP clean", central, set(), True),
        ("central DP attacked, no checks", central, hostile, False),
        ("central DP attacked, checks", dataclasses.replace(central, robust_aggregation="norm-bound"), hostile, True),
    ]
    rows = []
    for name, run_cfg, bad, defended in plan:
        run_cfg = dataclasses.replace(run_cfg, out=str(run_dir / name.replace(", ", "-").replace(" ", "-")))
        rows.append(_run(name, run_cfg, bad, factor, defended, population, log))
    metric = "rmse" if not cfg.implicit else f"hr@{cfg.top_k}"
    by_name = {r["run"]: r.get(metric) for r in rows}
    report = {"dataset": cfg.dataset, "split": cfg.split, "metric": metric, "population": population,
              "hostile_users": sorted(hostile), "factor": factor, "users_per_round": base.users_per_round,
              "rounds": cfg.rounds, "central_dp": {"clipping_norm": central.clipping_norm,
                                                   "noise_multiplier": central.noise_multiplier},
              "results": rows,
              "defended_vs_clean": by_name["attacked, defences"] / by_name["clean"] - 1,
              "central_defended_vs_clean": by_name["central DP attacked, checks"] / by_name["central DP clean"] - 1,
              "config": cfg.to_dict()}
    write_json(run_dir / "poisoning.json", report)
    report["run_dir"] = str(run_dir)
    return report
