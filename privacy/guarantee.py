"""What a run protects, and against whom, in words a user can act on.

Every run says it, plain ones too: `summary.json` carries it under `privacy`, and the command
line prints its one line when the run starts and beside the results. Two observers:
- the server: it runs fedrec's code and sees everything the devices send it;
- readers of the release: whoever reads the run directory, the logs or the model.
A sentence here is a claim; each is backed by an attack test (tests/audit/test_sum_recovery.py,
tests/audit/test_audit.py, tests/privacy/test_privacy.py, tests/privacy/test_releases.py) that fails if it is false.
"""

from __future__ import annotations

from fedrec.run.config import RunConfig

NO_NOISE = "none: the model and metrics are computed from the users' data without noise"
PLAIN_UPLOAD = "none: the server can compute each user's vector and ratings from its upload"


def _dp(epsilon: float | None, delta: float, target: float = 0.0) -> str:
    if epsilon is None:  # before the run: its plan
        return f"user-level DP with epsilon at most {target:g} at delta {delta:g}" if target else \
            f"user-level DP at delta {delta:g} (epsilon reported when the run ends)"
    return f"({epsilon:.4g}, {delta:g})-DP at user level"


def describe(cfg: RunConfig, epsilon: float | None = None, server_epsilon: float | None = None,
             central: bool = False) -> dict[str, str]:
    """`against_server`, `against_readers` and the one-line `guarantee` of a run with `cfg`.
    `epsilon`/`server_epsilon`: the accountant's figures once known (None: the plan is described)."""
    if central:
        server = "none: central training, one trainer holds every user's ratings (the baseline, not a deployment)"
        readers = NO_NOISE
    elif cfg.reproducible_noise:
        server = readers = "none: noise, decoys, sampling and starting vectors derive from the seed " \
                           "(--reproducible-noise), so whoever has the seed can regenerate them"
    else:
        readers = NO_NOISE if cfg.dp == "none" else _dp(epsilon, cfg.target_delta, cfg.target_epsilon)
        server = _against_server(cfg, readers, server_epsilon)
    return {"against_server": server, "against_readers": readers,
            "guarantee": f"against the server: {server}; against readers of the release: {readers}"}


def _against_server(cfg: RunConfig, readers: str, server_epsilon: float | None) -> str:
    if cfg.dp == "central":
        return ("none: it sees each upload before it adds the noise" if cfg.secure_aggregation == "none" else
                "no formal guarantee: it adds the noise itself to a SecAgg+ sum it sees un-noised")
    if cfg.dp == "local":
        return readers + " for training uploads (each device noises its own; evaluation sums are not covered)"
    if cfg.dp == "distributed":
        bound = f"({server_epsilon:.4g}, {cfg.target_delta:g})-DP at user level" if server_epsilon is not None \
            else "user-level DP composed over each user's rounds (reported when the run ends)"
        if not cfg.partial:  # nobody is sampled: the zero-out relation holds against the server as against readers
            return (bound + ": it sees only the SecAgg+ sum of every user's noised statistics (every user takes part "
                    "in every round, so it chooses nobody); from training it learns that each device is enrolled, "
                    "not its ratings or their count; each device's evaluation sums reach it un-noised (not covered)")
        return (bound + ": it sees only the SecAgg+ sum of noised updates, but knows who was sampled, so no "
                "amplification by sampling (evaluation sums are not covered)")
    if cfg.secure_aggregation != "none":
        return ("no formal guarantee: it sees only the SecAgg+ sum over each round's nodes, and the devices' "
                "starting vectors are private, but no noise bounds what a sum of few users reveals")
    if cfg.update_mode == "padded":
        return ("no formal guarantee: it reads the user's vector and a rating for every uploaded row; decoy rows "
                "make the rated ones harder to pick out, with no bound on how well it can")
    return PLAIN_UPLOAD


def line(privacy: dict) -> str:
    """The one line the command line prints."""
    return f"privacy: {privacy['guarantee']}"
