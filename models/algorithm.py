"""The one interface every recommender in fedrec implements (models/registry.py names them).

An algorithm says four things (after pfl-research's FederatedAlgorithm, and Flower's task.py):
- what a device computes for a batch of its users and sends: `train` returns the users' new
  private state and their `Contributions`, per-user statistics by name (`statistics()` declares
  them), not yet clipped, noised or summed;
- how the server turns the sum of those statistics into the next shared state: `server_step`
  on a `ServerState` that also says what is broadcast for training and what is the model;
- how a device scores its own held-out rows and refits itself for recommendations;
- which privacy mechanisms its statistics do not admit, and why (`refuses`).
Privacy is a pipeline over `Contributions` and their sums (fedrec.privacy): it clips each user's
share, adds noise, quantizes and accounts, and never looks inside an algorithm; an algorithm
never adds noise itself. Nothing here imports Flower.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from .defaults import DEFAULT_REG
from .randomness import negatives_key, private_key, private_rng

if TYPE_CHECKING:  # the data layer's type only; models/ imports no other fedrec package at run time
    from fedrec.datasets import CohortData

    from .defaults import Hyper

# Privacy mechanisms an algorithm's statistics may admit (fedrec.privacy applies them):
CLIPPING = "clipping"  # each user's statistics scaled to an L2 norm; the bound DP and robust checks rest on
DP = "dp"  # Gaussian noise on the clipped sum (central, local or distributed), accounted
SECURE_AGGREGATION = "secure-aggregation"  # Flower's SecAgg+: the server sees only the sum over nodes
DECOYS = "decoys"  # padded uploads: rows of unrated items trained like rated ones (`train(decoys=...)`)
PARTIAL = "partial-participation"  # a round may train a sample of the users
LOCAL_DP = "local-dp"  # DP noise added on each device to its own upload, one z for every round
MECHANISMS = (CLIPPING, DP, SECURE_AGGREGATION, DECOYS, PARTIAL, LOCAL_DP)


@dataclass(frozen=True)
class Statistic:
    """A named statistic a device sends: `width` columns per item (per_item) or one global row."""

    width: int
    per_item: bool = True


class Contributions(ABC):
    """A batch of users' statistics before privacy: each user's own, so that fedrec.privacy can bound each
    user's share of what is summed. `pair_user`/`pair_item` list the distinct (user, item) pairs the users
    touched (what a sparse upload lists). RowContributions holds them row by row; an algorithm whose
    statistics have structure (BPMF's g g^T) may compute norms and scaled sums without materialising rows."""

    num_users: int
    pair_user: torch.Tensor
    pair_item: torch.Tensor
    loss_sum: float = 0.0  # diagnostics of a non-private run: training loss over the real rows
    num_rows: int = 0

    @abstractmethod
    def user_norms(self) -> torch.Tensor:
        """[users] float64: the L2 norm of each user's whole contribution (every statistic)."""

    @abstractmethod
    def summed(self, scale: torch.Tensor, statistics: dict[str, Statistic], n_items: int) -> dict[str, torch.Tensor]:
        """The sum over users of each user's statistics times its factor `scale` [users] (float64):
        per-item statistics as [n_items, width], global ones as [width]."""


@dataclass
class RowContributions(Contributions):
    """Contributions held row by row: per (user, item) pair, and per user for the global statistics."""

    num_users: int
    pair_user: torch.Tensor  # [pairs] user position of each row
    pair_item: torch.Tensor  # [pairs] item of each row
    rows: dict[str, torch.Tensor]  # per-item statistics: name -> [pairs, width]
    totals: dict[str, torch.Tensor]  # global statistics: name -> [users, width]
    loss_sum: float = 0.0
    num_rows: int = 0

    def user_norms(self) -> torch.Tensor:
        sq = torch.zeros(self.num_users, dtype=torch.float64)
        for value in self.rows.values():
            sq.index_add_(0, self.pair_user, torch.linalg.vector_norm(value, dim=1, dtype=torch.float64).square())
        for value in self.totals.values():
            sq += torch.linalg.vector_norm(value, dim=1, dtype=torch.float64).square()
        return sq.sqrt()

    def summed(self, scale, statistics, n_items):
        # A user scaled by 0 (clipping failed closed on a non-finite norm) adds exactly nothing: inf x 0 is NaN.
        user_scale = scale.to(torch.float32)[:, None]
        row_scale = user_scale[self.pair_user]
        out = {}
        for name, value in self.rows.items():  # scaled in float32 as they are sent, summed in float64
            out[name] = torch.zeros(n_items, value.shape[1], dtype=torch.float64).index_add_(
                0, self.pair_item, (value * row_scale).masked_fill(row_scale == 0, 0.0).double())
        for name, value in self.totals.items():
            out[name] = (value * user_scale).masked_fill(user_scale == 0, 0.0).double().sum(dim=0)
        return out


@dataclass(frozen=True)
class Decoys:
    """Decoy rows a padded upload asks a device to train (fedrec.privacy.decoys chooses them from private
    randomness): user position, an item the user did not rate, and a uniform draw that picks its target."""

    segment: np.ndarray
    item: np.ndarray
    pick: np.ndarray


@dataclass
class Sums:
    """Statistics summed over users: per-item arrays [items, width] and global rows [width], float64."""

    arrays: dict[str, torch.Tensor]
    num_users: int = 0
    loss_sum: float = 0.0
    num_rows: int = 0
    norms: list[torch.Tensor] = field(default_factory=list)  # per-user norms before clipping, chunk by chunk
    pair_item: list[torch.Tensor] = field(default_factory=list)  # rows each chunk touched (sparse uploads)
    pair_user: list[torch.Tensor] = field(default_factory=list)

    @staticmethod
    def zeros(statistics: dict[str, Statistic], n_items: int) -> Sums:
        return Sums({name: torch.zeros((n_items, s.width) if s.per_item else (s.width,), dtype=torch.float64)
                     for name, s in statistics.items()})

    def add(self, part: Contributions, scale: torch.Tensor, norms: torch.Tensor, statistics: dict[str, Statistic],
            offset: int = 0) -> None:
        """Add a batch whose users are scaled by `scale` (clipping); `offset`: its first user's position."""
        n_items = next((v.shape[0] for v in self.arrays.values() if v.ndim == 2), 0)
        for name, value in part.summed(scale, statistics, n_items).items():
            self.arrays[name] += value
        self.num_users += part.num_users
        self.loss_sum += part.loss_sum
        self.num_rows += part.num_rows
        self.norms.append(norms.float())
        self.pair_item.append(part.pair_item)
        self.pair_user.append(part.pair_user + offset)


class ServerState(ABC):
    """The server's side of an algorithm: the shared state, what it broadcasts, and what it keeps."""

    @abstractmethod
    def broadcast(self) -> dict[str, np.ndarray]:
        """The shared arrays a training round sends the devices."""

    @abstractmethod
    def model(self) -> dict[str, np.ndarray]:
        """The model that is evaluated, saved and released (a sampler's mean, an optimizer's items)."""

    @abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """Everything a checkpoint needs to continue the run (numpy, no pickle)."""

    @abstractmethod
    def load(self, arrays: dict[str, np.ndarray]) -> None:
        """Continue from `arrays()` of an earlier run."""


UserState = dict[str, torch.Tensor]
"""A batch of users' private state: name -> [users, ...] (never leaves the device)."""


class Algorithm(ABC):
    """A federated recommender: see the module docstring. One instance per run and process."""

    name: ClassVar[str]
    title: ClassVar[str]  # what reports call it, e.g. "biased MF"
    refuses: ClassVar[dict[str, str]] = {}  # privacy mechanisms (MECHANISMS) its statistics do not admit, and why
    settings_read: ClassVar[frozenset[str]]  # the model settings it reads (others are moot with it)
    implicit_feedback: ClassVar[bool] = True  # does it model leave-one-out (implicit) data too?
    rating_feedback: ClassVar[bool] = True  # does it model ratings (random, u1..u5 splits) too?
    # Replies of honest users have comparable norms, so a norm far above the round's median is hostile
    # (--robust-aggregation norm-bound). False where a heavy user's honest statistics grow with its ratings.
    comparable_norms: ClassVar[bool] = True
    # Statistics whose norm per user is at most this by construction (0: unbounded): runs clip at it (a smaller
    # C would shrink some users' statistics and bias what the server unscales).
    bounded_norm: ClassVar[float] = 0.0

    def __init__(self, settings: Hyper, n_items: int, rating_scale: tuple[float, float]):
        self.settings, self.n_items, self.rating_scale = settings, n_items, rating_scale

    @classmethod
    def defaults(cls, implicit: bool) -> dict:
        """Its K and regularization where the run leaves them at -1 (chosen on validation splits of ML-100K)."""
        return {"dim": 32, "local_batch": 0, **{k: v[implicit] for k, v in DEFAULT_REG.items()}}

    @classmethod
    def release_weights(cls, epsilon: float) -> tuple[float, ...] | None:
        """Few releases of unequal weight: each round's share of the privacy budget (summing to 1; their
        number is the run's rounds) for a run that targets `epsilon` (0: not private, or z set by hand).
        None: every round is alike, as many as --rounds."""
        return None

    # ------------------------------------------------------------------ device
    @abstractmethod
    def statistics(self) -> dict[str, Statistic]:
        """The statistics a device sends, by name (the upload holds exactly these)."""

    @abstractmethod
    def new_users(self, users: np.ndarray, population: int, rng: np.random.Generator | None) -> UserState:
        """Starting state of `users` (global ids): seeded by user id, or from a private `rng`."""

    @abstractmethod
    def train(self, shared: dict[str, torch.Tensor], state: UserState, rows: CohortData, round_: int,
              keys: DeviceKeys, decoys: Decoys | None = None) -> tuple[UserState, Contributions]:
        """One round for a batch of users: their new state and their contributions (un-clipped).
        `decoys`: for padded uploads (algorithms that admit DECOYS), rows to train like rated ones."""

    # ------------------------------------------------------------------ server
    @abstractmethod
    def init_server(self, strategy: str, server_lr: float) -> ServerState:
        """The shared state before round 1 (public: from the seed and the rating scale only). `strategy`
        and `server_lr` name the server optimizer of algorithms that average updates (others ignore them)."""

    @abstractmethod
    def server_step(self, state: ServerState, sums: dict[str, torch.Tensor], weight: float, round_: int,
                    noise_std: float = 0.0) -> None:
        """Move `state` with the round's summed statistics; `weight`: how many users the sum stands
        for (the count of users, or under DP the expected one; algorithms that average divide by it);
        `noise_std`: the std per coordinate of the DP noise in `sums` (0: none), for regularization that
        knows the noise level (the others ignore it)."""

    def check_sums(self, sums: dict[str, torch.Tensor], users: float) -> str | None:
        """Why `sums` cannot be what `users` honest users send (None: it can); beyond the schema and norm
        checks every algorithm gets."""
        return None

    # ------------------------------------------------------------------ scoring
    @abstractmethod
    def evaluate(self, model: dict[str, torch.Tensor], state: UserState, rows: CohortData, k: int) -> dict[str, float]:
        """Metric sums (fedrec.models.metrics) of the users of `rows` on their own held-out rows."""

    def evaluate_with_validation(self, model: dict[str, torch.Tensor], state: UserState, rows: CohortData, k: int
                                 ) -> tuple[dict[str, float], dict[str, float]]:
        """(test sums, validation sums) of a cohort whose held-out rows include validation items
        (CohortData.test_validation); an algorithm whose scoring has a costly per-user part shares it."""
        return (self.evaluate(model, state, rows.validation_side(False), k),
                self.evaluate(model, state, rows.validation_side(True), k))

    @abstractmethod
    def recommend(self, model: dict[str, torch.Tensor], items: np.ndarray, ratings: np.ndarray, n: int,
                  hide: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A user's top `n` (item indices, scores) from the user's own ratings, refitted on its device."""


@dataclass(frozen=True)
class DeviceKeys:
    """The randomness a device round may draw. `private`: from OS entropy (a run that claims anything
    against the server: what its uploads depend on must not be derivable from the seed the server
    knows); else seeded by (seed, round), so runs repeat and federated equals central."""

    seed: int
    private: bool = False

    def negatives(self, round_: int) -> np.ndarray:
        """[1] uint64 key of a round's training negatives (counter-based per user)."""
        return np.array([private_key("negatives")], np.uint64) if self.private else negatives_key(self.seed, round_)

    def starting_vectors(self) -> np.random.Generator | None:
        """A private stream for new users' vectors, or None for the seeded population matrix."""
        return private_rng("user-init") if self.private else None

