"""The server part of a run's config: rounds, who takes part, the server optimizer, evaluation, and what
keeps a run going (timeouts, robust aggregation, checkpoints). Owned here, validated on its own
(`check_server`). Plain Python: importing it loads no Flower."""

from __future__ import annotations

from dataclasses import dataclass

from fedrec.models.defaults import DEFAULT_SERVER_LR, DEFAULT_SERVER_OPTIMIZER, DEFAULT_TOP_K, SERVER_OPTIMIZERS
from fedrec.run.setting import ConfigError, check_limits, check_signs, setting

SAMPLING_CHOICES = ("fixed", "poisson")
ROBUST_CHOICES = ("none", "norm-bound")
LIMITS = {"top_k": 100_000}


def _training(default, help, choices=None):
    return setting("Training", default, help, choices)


def _reliability(default, help, choices=None):
    return setting("Reliability", default, help, choices)


@dataclass(frozen=True)
class ServerConfig:
    """The rounds the server runs, who takes part, its optimizer, evaluation, and what keeps a run going."""

    server_lr: float = _training(DEFAULT_SERVER_LR, "Server learning rate of the strategy's optimizer (1.0 with "
                                 "fedavg is plain FedAvg).")
    strategy: str = _training(DEFAULT_SERVER_OPTIMIZER, "Server optimizer on the averaged update (algorithms that "
                              "average: mf, svdpp).", SERVER_OPTIMIZERS)
    rounds: int = _training(60, "Federated rounds.")
    users_per_round: int = _training(0, "Users sampled per round (expected number under poisson); 0: all users.")
    sampling: str = _training("fixed", "fixed: that many users without replacement; poisson: each user independently.",
                              SAMPLING_CHOICES)
    eval_every: int = _training(10, "Evaluate every this many rounds (and after the last).")
    top_k: int = _training(DEFAULT_TOP_K, "K of HR@K, NDCG@K and Recall@K.")
    round_timeout: float = _reliability(0.0, "Seconds the server waits for a round's replies; later replies count as "
                                        "failed (0: until every node answered or failed, at most an hour).")
    min_reply_fraction: float = _reliability(0.5, "Least share of a round's sampled users whose updates must arrive "
                                             "and pass the checks for the round to be applied; otherwise the round is "
                                             "skipped.")
    robust_aggregation: str = _reliability("norm-bound", "none, or norm-bound: a reply whose norm exceeds "
                                           "--robust-bound times the round's median per-user update norm per user it "
                                           "sums is dropped (not under DP, where replies above users x C are rejected "
                                           "instead).", ROBUST_CHOICES)
    robust_bound: float = _reliability(10.0, "norm-bound: allowed multiple of the round's median per-user update norm.")
    checkpoint_every: int = _reliability(10, "Write a checkpoint to the run directory every this many rounds (and on "
                                             "Ctrl-C/SIGTERM); 0: only on an interrupt.")
    keep_checkpoints: bool = _reliability(False, "Keep the server's checkpoint of round 0, of every "
                                          "--checkpoint-every round and of the last round in RUN_DIR.checkpoints/, "
                                          "and the devices' state at those rounds in RUN_DIR.devices/ (both beside "
                                          "the run directory, never released): what `fedrec forget` replays from.")
    resume: str = _reliability("", "Run directory of an interrupted run to continue from its last checkpoint, with "
                               "the run's own saved settings (so nothing else may be passed with it).")

    @property
    def partial(self) -> bool:
        """Does a round train a sample of the users (not every user)?"""
        return self.users_per_round != 0 or self.sampling != "fixed"

    def check_server(self) -> None:
        check_signs(self, positive=("server_lr", "rounds", "eval_every", "top_k", "robust_bound"),
                    non_negative=("users_per_round", "round_timeout", "checkpoint_every"))
        check_limits(self, LIMITS)
        if not 0 <= self.min_reply_fraction <= 1:
            raise ConfigError(f"min-reply-fraction must be in [0, 1] (got {self.min_reply_fraction})")
