"""The engine and output part of a run's config: how a simulation is hosted (nodes, Ray), the central
baseline's length, and where results go. Owned here, validated on its own (`check_engine`)."""

from __future__ import annotations

from dataclasses import dataclass

from fedrec.run.setting import ConfigError, check_signs, setting


@dataclass(frozen=True)
class EngineConfig:
    """How a simulation is hosted, the central baseline's length, and where results go."""

    epochs: int = setting("Training", 60, "Central baseline: full-batch epochs.")
    users_per_node: int = setting("Training", 0, "Simulation: users hosted by one SuperNode (1 = deployment shape); "
                                                 "0: auto.")
    dropout: float = setting("Reliability", 0.0, "Simulation: probability that each sampled device fails in a round, "
                                                 "to measure robustness.")
    ray_address: str = setting("Engine", "", "Simulation: a running Ray cluster to join (the address `ray start "
                                             "--head` prints, e.g. 10.0.0.5:6379) instead of starting Ray on this "
                                             "machine; each ClientApp actor takes one of the cluster's CPUs.")
    out: str = setting("Output", "", "Run directory for results; empty: runs/<mode>-<time>.")

    def check_engine(self) -> None:
        check_signs(self, positive=("epochs",), non_negative=("users_per_node",))
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1) (got {self.dropout}); at 1 no device would ever reply")
