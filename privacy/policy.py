"""What a device applies to its users' statistics before anything leaves it: the device's part of the
privacy pipeline's settings. Plain Python, so the run config (and the command line) load without torch."""

from __future__ import annotations

from dataclasses import dataclass

UPDATE_MODES = ("dense", "sparse", "padded")  # the upload's shape (fedrec.privacy.upload)


@dataclass(frozen=True)
class DevicePolicy:
    """What a device applies to its users' statistics before anything leaves it."""

    dp: str = "none"  # none, central (the server's noise), local (each user's own), distributed (a share each)
    update_mode: str = "dense"  # dense, sparse or padded (fedrec.privacy.upload)
    pad_ratio: float = 1.0  # padded: decoy rows per rated row
    clipping_norm: float = 0.0  # C: each user's whole contribution is clipped to this L2 norm (0: off)
    noise_std: float = 0.0  # local DP: each user's noise std per coordinate; distributed DP: its share
    max_rounds: int = 0  # local and distributed DP: a user takes part in at most this many rounds (0: no cap)
    reproducible_seed: int | None = None  # None: decoys and noise from OS entropy (the private default)
    # Starting vectors and training negatives from OS entropy: where the run claims anything against the
    # server (DP, SecAgg+, decoys). Seeded, the server regenerates every starting vector and reads each
    # user's rated items and ratings out of a SecAgg+ sum (fedrec.audit.sum_recovery).
    private_randomness: bool = False

    @property
    def sends_diagnostics(self) -> bool:
        """May a reply carry its loss and row counts? Not under local DP (the server is the adversary and
        they are not noised), not with decoys (the real row count)."""
        return self.dp != "local" and self.update_mode != "padded"

    @property
    def caps_rounds(self) -> bool:
        """Does the device enforce the participation cap (local and distributed DP)?"""
        return self.dp in ("local", "distributed")
