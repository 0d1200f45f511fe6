"""The privacy part of a run's config: clipping, DP and its accountant, the upload's shape, SecAgg+, and
whether noise may be derived from the seed. Owned here, validated on its own (`check_privacy`); the
device's share of it is `device_policy`. Plain Python: the command line reads it without torch."""

from __future__ import annotations

from dataclasses import dataclass

from fedrec.run.setting import ConfigError, check_limits, check_signs, setting

from .policy import UPDATE_MODES, DevicePolicy

DP_CHOICES = ("none", "central", "local", "distributed")
SECURE_AGGREGATION = ("none", "secagg+")
ACCOUNTANTS = ("rdp", "pld")
LIMITS = {"pad_ratio": 1000.0}
_DEVICE = DevicePolicy()


def _privacy(default, help, choices=None):
    return setting("Privacy", default, help, choices)


@dataclass(frozen=True)
class PrivacyConfig:
    """What protects a user's statistics: clipping, DP noise and its accounting, the upload's shape, SecAgg+."""

    dp: str = _privacy("none", "none; central (per-user clipping, server noise); local (noise added on the device); "
                               "distributed (each device adds a share of the noise; needs secagg+).", DP_CHOICES)
    noise_multiplier: float = _privacy(0.0, "z: noise std is z times the clipping norm (per release); 0 with "
                                            "--target-epsilon: calibrated.")
    clipping_norm: float = _privacy(_DEVICE.clipping_norm, "C: each user's whole contribution (every statistic it "
                                    "sends) is clipped to this L2 norm on its device (0: no clipping).")
    target_epsilon: float = _privacy(0.0, "Privacy budget: calibrates z for the rounds given, or stops before a round "
                                          "would exceed it.")
    target_delta: float = _privacy(1e-5, "delta at which epsilon is reported.")
    accountant: str = _privacy("rdp", "rdp or pld (both dp-accounting; PLD is usually tighter).", ACCOUNTANTS)
    update_mode: str = _privacy(_DEVICE.update_mode, "What a client uploads: dense (all rows), sparse (rated rows), "
                                                     "padded (rated + decoy rows).", UPDATE_MODES)
    pad_ratio: float = _privacy(_DEVICE.pad_ratio, "padded mode: decoy rows per rated row.")
    max_rounds_per_user: int = _privacy(_DEVICE.max_rounds, "Local and distributed DP: rounds a user may take part in "
                                        "(its device enforces it; epsilon against the server is for this many); 0: "
                                        "auto, a cap that about 1 in 100 runs would reach.")
    secure_aggregation: str = _privacy("none", "secagg+: the server learns only the sum of the nodes' updates "
                                       "(Flower's SecAgg+); uploads are dense.", SECURE_AGGREGATION)
    secagg_shares: float = _privacy(0.0, "SecAgg+: neighbours each node shares its keys with; 0: auto, 2 log2(nodes) "
                                    "+ 1 (Bell et al.'s logarithmic degree); below 1 a share of the round's nodes; "
                                    "from 3 a count (odd).")
    secagg_threshold: float = _privacy(0.67, "SecAgg+: shares needed to rebuild a key; up to 1 a share of "
                                       "--secagg-shares, from 2 a count. Colluding neighbours below it learn nothing.")
    secagg_min_fraction: float = _privacy(0.8, "SecAgg+: least share of a round's sampled users that must arrive for "
                                          "the sum to be unmasked; distributed DP sizes each device's noise share for "
                                          "it.")
    secagg_timeout: float = _privacy(0.0, "SecAgg+: seconds to wait for each stage's replies (0: no limit); late nodes "
                                          "count as dropped and their masks are recovered.")
    reproducible_noise: bool = _privacy(False, "Derive DP noise, decoys, DP sampling and the devices' starting "
                                        "vectors and training negatives from --seed: repeatable, and NOT private "
                                        "(anyone with the seed can regenerate them).")

    @property
    def guards_uploads(self) -> bool:
        """Does the run claim anything against the server (DP, SecAgg+ or decoys)?"""
        return self.dp != "none" or self.secure_aggregation != "none" or self.update_mode == "padded"

    @property
    def private_device_randomness(self) -> bool:
        """Starting vectors and training negatives from OS entropy on the device: wherever the run claims
        anything against the server, unless the user asked for reproducible (non-private) noise."""
        return self.guards_uploads and not self.reproducible_noise

    def mechanisms(self) -> dict[str, str]:
        """The privacy mechanisms (fedrec.models.algorithm.MECHANISMS) the run asks for, each with its flag."""
        asked = {"dp": f"--dp {self.dp}" if self.dp != "none" else "",
                 "secure-aggregation": "--secure-aggregation" if self.secure_aggregation != "none" else "",
                 "decoys": "--update-mode padded" if self.update_mode == "padded" else "",
                 "clipping": "--clipping-norm" if self.clipping_norm != 0 else "",
                 "local-dp": "--dp local" if self.dp == "local" else ""}
        return {mechanism: flag for mechanism, flag in asked.items() if flag}

    def device_policy(self, seed: int, noise_share: float = 0.0) -> DevicePolicy:
        """What each device applies to its users' statistics: the clipping norm, its noise (local DP: z C per
        user; distributed DP: the share the server sized for the round's least accepted survivors), the
        upload's shape, the participation cap (`max_rounds_per_user` as the server resolved it)."""
        noise = {"local": self.noise_multiplier * self.clipping_norm, "distributed": noise_share}.get(self.dp, 0.0)
        return DevicePolicy(dp=self.dp, update_mode=self.update_mode, pad_ratio=self.pad_ratio,
                            clipping_norm=self.clipping_norm, noise_std=noise,
                            max_rounds=self.max_rounds_per_user if self.dp in ("local", "distributed") else 0,
                            reproducible_seed=seed if self.reproducible_noise else None,
                            private_randomness=self.private_device_randomness)

    def check_privacy(self) -> None:
        check_signs(self, non_negative=("noise_multiplier", "clipping_norm", "target_epsilon", "pad_ratio",
                                        "max_rounds_per_user", "secagg_timeout"))
        check_limits(self, LIMITS)
        if self.dp == "none" and self.noise_multiplier > 0:
            raise ConfigError("noise-multiplier is set but dp is 'none'; pass --dp central or --dp local")
        if not 0 < self.target_delta < 1:
            raise ConfigError(f"target-delta must be in (0, 1) (got {self.target_delta})")
        if self.dp != "none":
            if self.clipping_norm <= 0:
                raise ConfigError(f"--dp {self.dp} needs --clipping-norm > 0 (got {self.clipping_norm})")
            if self.noise_multiplier <= 0 and self.target_epsilon <= 0:
                raise ConfigError(f"--dp {self.dp} needs --noise-multiplier > 0 or --target-epsilon > 0; "
                                  "use --dp none for a non-private run")
        if self.dp == "local" and self.update_mode != "dense":
            raise ConfigError(f"--dp local with --update-mode {self.update_mode} would claim a guarantee it does not "
                              "give (the row indices are not noised); use --update-mode dense")
        if self.dp == "distributed" and self.secure_aggregation == "none":
            raise ConfigError("--dp distributed needs --secure-aggregation secagg+ (otherwise the server sees each "
                              "device's small noise share); use --dp central or --dp local without it")
        if self.secure_aggregation != "none":
            self._check_secure_aggregation()

    def _check_secure_aggregation(self) -> None:
        if self.update_mode != "dense":
            raise ConfigError(f"--secure-aggregation {self.secure_aggregation} sums dense uploads "
                              f"(a sparse row set would itself leak); use --update-mode dense")
        if self.clipping_norm <= 0:
            raise ConfigError("--secure-aggregation needs --clipping-norm > 0: SecAgg+ quantizes within a range that "
                              "the clipping bound sets")
        if not (0 <= self.secagg_shares < 1 or (self.secagg_shares >= 3 and self.secagg_shares.is_integer())):
            raise ConfigError(f"secagg-shares must be 0 (auto), in (0, 1) or a whole number >= 3 "
                              f"(got {self.secagg_shares})")
        if not (0 < self.secagg_threshold <= 1 or (self.secagg_threshold >= 2 and self.secagg_threshold.is_integer())):
            raise ConfigError(f"secagg-threshold must be in (0, 1] or a whole number >= 2 "
                              f"(got {self.secagg_threshold})")
        if not 0 < self.secagg_min_fraction <= 1:
            raise ConfigError(f"secagg-min-fraction must be in (0, 1] (got {self.secagg_min_fraction})")
