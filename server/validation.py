"""Checks every reply must pass before the server uses it (the server trusts nothing it receives).

SEAM, to be completed: the strategy calls these; each returns None for a reply it may use,
or a one-line reason for dropping it (logged in audit.jsonl, counted in metrics.csv).
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from fedrec.common import schema
from fedrec.common.config import RunConfig


def check_train_reply(content: RecordDict, sent_users: int, n_items: int, dim: int, cfg: RunConfig) -> str | None:
    """Why a train reply (to a message that asked `sent_users` users to train) must not be applied."""
    if schema.ARRAYS not in content or schema.METRICS not in content:
        return "missing arrays or metrics record"
    return None


def check_reply_norm(norm: float, users: float, cfg: RunConfig) -> str | None:
    """Why a train reply whose dense update has L2 norm `norm` and sums `users` users must not be applied."""
    return None


def check_eval_reply(content: RecordDict, hosted_users: int, cfg: RunConfig,
                     rating_scale: tuple[float, float]) -> str | None:
    """Why an evaluate reply from a node hosting `hosted_users` users must not be used."""
    if schema.METRICS not in content:
        return "missing metrics record"
    return None
