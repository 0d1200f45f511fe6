"""Per-user clipping: each user's whole contribution (every statistic it sends) scaled to an L2 norm
of at most C before anything is summed. The bound DP, SecAgg+'s range and the server's reply checks
rest on; tests/test_clipping.py checks it on what is actually summed, for every algorithm and mode."""

from __future__ import annotations

import torch

from fedrec.models.algorithm import Contributions

MARGIN = 1e-6
"""Users are scaled to C (1 - MARGIN): float32 rounding of the scaled values cannot pass C."""


def clip(contributions: Contributions, clipping_norm: float) -> tuple[Contributions, torch.Tensor]:
    """The contributions with each user's scaled to norm at most `clipping_norm` (0: unchanged), and
    each user's norm before. Fails closed: a user whose norm is not finite, or so large that the factor
    would be subnormal in float32 (rounding could then pass C), contributes nothing."""
    norms = contributions.user_norms()  # float64: the bound must not rest on float32 sums
    if clipping_norm <= 0:
        return contributions, norms.float()
    scale = torch.clamp(clipping_norm * (1 - MARGIN) / norms.clamp(min=1e-300), max=1.0)
    scale = torch.where(torch.isfinite(norms) & (scale >= 1e-30), scale, torch.zeros_like(scale))
    clipped = contributions.scaled(scale.float())
    if not bool(torch.all(scale > 0)):  # 0 * inf is nan: zero such users' values outright
        dropped = scale == 0
        rows = dropped[contributions.pair_user][:, None]
        clipped.rows = {k: torch.where(rows, torch.zeros_like(v), v) for k, v in clipped.rows.items()}
        clipped.totals = {k: torch.where(dropped[:, None], torch.zeros_like(v), v) for k, v in clipped.totals.items()}
    return clipped, norms.float()
