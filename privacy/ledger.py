"""What a DP run releases, and whether its guarantee covers it.

Whoever reads a run directory, a log or the model is an observer the guarantee must hold
against. So a DP run writes only quantities that are either covered (noised and accounted,
or computed from public settings alone) or listed here as not covered with the reason;
everything else a non-private run reports (users sampled, training loss, bytes, seconds,
the per-reply upload log) is not released.
"""

from __future__ import annotations

import logging

from fedrec.run.schema import EVAL_METRIC_PREFIXES

# metrics.csv columns a DP run keeps (evaluation metrics are added by prefix)
DP_ROUND_KEYS = ("round", "epsilon")

COVERED = "covered"
NOT_COVERED = "not covered"


def is_evaluation(key: str) -> bool:
    return key.split("@")[0] in EVAL_METRIC_PREFIXES


class WithheldLogLines(logging.Filter):
    """Drops Flower's log lines that count participants or time a DP run's rounds."""

    WITHHELD = ("Received", "received", "sampled", "finished in", "Strategy execution", "reply of node", "joined",
                "halted")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(marker in message for marker in self.WITHHELD)


def released_row(row: dict, private: bool) -> dict:
    """The part of a round's record that may leave the server (keys starting with _ never do)."""
    row = {k: v for k, v in row.items() if not k.startswith("_")}
    if not private:
        return row
    return {k: v for k, v in row.items() if k in DP_ROUND_KEYS or is_evaluation(k)}


def release_ledger(mode: str, tuned: bool = False) -> dict[str, dict]:
    """Each quantity a DP run releases, with its status, why, and where it appears (`where`: the
    run directory's files, `summary.json:<key>` and `metrics.csv:<column>`; tests/privacy/test_releases.py
    checks that everything a DP run writes is listed here)."""
    model_why = {
        "central": "every round's update is a sum of per-user clipped updates plus Gaussian noise, accounted",
        "local": "post-processing of uploads each noised on the device and accounted per user",
        "distributed": "every round's update is a SecAgg+ sum of per-user clipped updates, each with its share "
                       "of the Gaussian noise, accounted for the least number of users the round accepts",
    }[mode]
    settings = (NOT_COVERED, "chosen by fedrec tune on this data's training rows (the same users), un-noised; no "
                             "epsilon accounts for that choice") if tuned else \
        (COVERED, "public settings, chosen before any data is seen")
    ledger = {
        "model (item embeddings, item biases, global bias)": (COVERED, model_why, ["model.npz"]),
        "epsilon per round (metrics.csv, summary.json)": (
            COVERED, "computed from public settings" + (" and the participation counts, which depend on the "
                                                        "sampling only, never on data" if mode == "local" else ""),
            ["metrics.csv:round", "metrics.csv:epsilon", "summary.json:privacy"]),
        "rounds trained, stopped_early, status": (
            COVERED, "the budget stop depends on epsilon only; the status says whether the run completed",
            ["summary.json:rounds", "summary.json:stopped_early", "summary.json:status"]),
        "config.toml and summary.json settings": (*settings, [
            "config.toml", "summary.json:config", "summary.json:mode", "summary.json:dataset", "summary.json:split",
            "summary.json:model", "summary.json:model_reason", "summary.json:burn_in",
            "summary.json:reproducible_noise", "summary.json:secure_aggregation"]),
        "num_nodes (simulated SuperNodes)": (
            COVERED, "computed from public settings (--users-per-node) and the population size",
            ["summary.json:num_nodes"]),
        "item catalogue in model.npz (item ids, titles)": (
            NOT_COVERED, "treated as public, like num_users: the data set's item list (which items have ratings), "
                         "the same for every user; the model has one row per item anyway", ["model.npz"]),
        "evaluation metrics (RMSE/MAE or HR/NDCG/Recall; metrics.csv, summary.json, plot, Flower log)": (
            NOT_COVERED, "evaluation metric, for the researcher: computed from every user's held-out ratings and "
                         "private vectors without noise",
            ["summary.json:metrics", "metrics.csv:<evaluation metrics>", "<metric>.png"]),
        "num_users (population size)": (
            NOT_COVERED, "treated as public: the accounting's sampling rate is derived from it",
            ["summary.json:num_users"]),
    }
    withheld = {
        "users sampled per round, training loss, bytes up/down, seconds per round (also the progress bar's "
        "elapsed time and ETA, and the run's wall time)": (
            "not released", "they count participants or their rated rows, or depend on who was sampled"),
        "per-reply upload log (audit.jsonl)": ("not released", "it counts replies and, for sparse uploads, rows"),
        "failed, late and rejected replies, users unreachable, skipped rounds (metrics.csv, log lines)": (
            "not released", "they tell which nodes were sampled; a skipped round still counts in epsilon"),
        "checkpoint.npz, progress.npz, and the simulated devices' disks (RUN_DIR.devices/)": (
            "not released", "the server's and the devices' own memory while a run goes, deleted when it completes; "
                            "an interrupted run (or one failed after a checkpoint) keeps them to resume: then they "
                            "reveal who was sampled (local/distributed DP participation counts; snapshot names) and "
                            "the devices' private vectors, so such a directory is not to be shared"),
        "kept checkpoints and forget's exclusion list (RUN_DIR.checkpoints/), kept device state (RUN_DIR.devices/)": (
            "not released", "with --keep-checkpoints the server keeps its checkpoints (round 0, every checkpoint "
                            "round, the last) and the devices their state and upload logs after the run, beside the "
                            "run directory (0700), for `fedrec forget` to replay from; they hold participation "
                            "counts, the users forgotten and the devices' private vectors: never to be shared"),
        "Flower log lines counting replies or sampled nodes, run timings, train metrics": (
            "not released", "filtered out of the flwr logger for the run (WithheldLogLines)"),
        "run seed's use for noise, decoys, sampling, starting vectors and training negatives": (
            "not released", "they come from OS entropy unless --reproducible-noise"),
    }
    if mode == "local":  # here the server itself is an observer the guarantee must hold against
        ledger["what each device sends the server besides its noised upload"] = (
            COVERED, "a count of users trained (1 or 0 per device: whether its participation cap is reached, which "
                     "depends on the sampling only); no loss or row count", [])
    if mode == "distributed":
        ledger["what each device sends the server besides its masked vector"] = (
            COVERED, "nothing: the count of users it trained is inside the masked vector, and its FitRes metrics "
                     "are empty", [])
        ledger["count of users trained per round (a coordinate of the unmasked sum)"] = (
            NOT_COVERED, "not noised: set against the users it sent, it tells the server how many were held back "
                         "each round (opt-outs, erasures, participation caps, in-node dropout), not which", [])
        ledger["SecAgg+ rounds halted (summary.json secure_aggregation.rounds_halted, an unchanged model)"] = (
            NOT_COVERED, "whether enough sampled devices answered for the sum to be unmasked: depends on who was "
                         "sampled and on failures, and is not noised", ["summary.json:secure_aggregation"])
    if mode in ("local", "distributed"):
        ledger["evaluation sums each device returns to the server"] = (
            NOT_COVERED, "squared error, hits and counts of the device's held-out ratings, un-noised: the local-DP "
                         "guarantee covers training uploads only", [])
    out = {name: {"status": status, "why": why, "where": where} for name, (status, why, where) in ledger.items()}
    out.update({name: {"status": status, "why": why} for name, (status, why) in withheld.items()})
    return out


def listed_locations(ledger: dict[str, dict]) -> set[str]:
    """Every file, summary.json key and metrics.csv column the ledger names."""
    return {where for entry in ledger.values() for where in entry.get("where", ())}
