"""Per-user clipping: each user's whole contribution (every statistic it sends) scaled to an L2 norm of
at most C before anything is summed. The bound DP, SecAgg+'s range and the server's reply checks rest
on; tests check it on what is actually summed, for every algorithm and upload mode."""

from __future__ import annotations

import torch

from fedrec.models.algorithm import Contributions

MARGIN = 1e-6
"""Users are scaled to C (1 - MARGIN): float32 rounding of the scaled values cannot pass C."""


def clip_scales(norms: torch.Tensor, clipping_norm: float) -> torch.Tensor:
    """[users] float64 factors that bring each user's norm to at most `clipping_norm` (0: ones). Fails
    closed: a user whose norm is not finite, or so large that the factor would be subnormal in float32
    (rounding could then pass C), gets 0 and contributes nothing."""
    if clipping_norm <= 0:
        return torch.ones_like(norms, dtype=torch.float64)
    scale = torch.clamp(clipping_norm * (1 - MARGIN) / norms.double().clamp(min=1e-300), max=1.0)
    return torch.where(torch.isfinite(norms) & (scale >= 1e-30), scale, torch.zeros_like(scale))


def clip(contributions: Contributions, clipping_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's clipping factor and its norm before (float64: the bound must not rest on float32 sums)."""
    norms = contributions.user_norms()
    return clip_scales(norms, clipping_norm), norms
