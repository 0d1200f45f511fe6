"""User-level privacy accounting with Google's dp-accounting.

Central DP: each round releases sum(clipped user updates) + N(0, (z C)^2). Under Poisson
sampling with rate q the neighbouring relation is add/remove one user (sensitivity C), so
the event is PoissonSampled(q, Gaussian(z)). Under fixed-size sampling without replacement
the relation is replace-one user, whose sum changes by up to 2C: Gaussian(z / 2).

Local DP: each device adds N(0, (z C)^2) to its own clipped update before it leaves. The
server sees who takes part, so there is no amplification: per round Gaussian(z / 2)
(replace-one), composed over the rounds a user takes part in.

RDP and PLD both come from dp-accounting, the library Flower's own RdpAccountant wraps.
We call it directly because every round here is the same event, so epsilon after r rounds
is one composition of r copies (constant time), whereas Flower's ledger replays each
round's composition on every query (quadratic over a run; minutes at 60 rounds). It also
gives PLD, usually tighter, and calibrate_dp_mechanism to find z for a target epsilon.

Releases of unequal weight: an algorithm with few rounds that carry unequal shares of the budget
declares each round's weight w_r (summing to 1). One z is calibrated for the target on their
composition, round r is noised with z_r = z / sqrt(w_r), and the accountant composes the rounds'
events exactly (for Gaussians, z^-2 = sum_r z_r^-2: the same epsilon as one release in noise z).

Full participation (every user in every round, central or distributed DP): nobody is sampled, so the
neighbouring relation is zero-out (dp-accounting's REPLACE_SPECIAL): a user's data replaced by
nothing, its device still answering with zeros (plus its noise share), so who answers does not depend
on the data; the sum moves by at most C, each round is Gaussian(z_r), and since the server learns no
more than readers do (it knows the participants: everyone), epsilon against the server is epsilon.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

# dp-accounting warns (through absl) for every RDP order it drops while searching; the
# result is still valid. absl's first message would also call logging.basicConfig, after
# which every Flower log line prints twice: a NullHandler on the root logger prevents that.
logging.getLogger("absl").setLevel(logging.ERROR)
if not logging.getLogger().handlers:
    logging.getLogger().addHandler(logging.NullHandler())


@dataclass(frozen=True)
class PrivacyPlan:
    mode: str  # "central", "local" or "distributed" (accounted as central: the unmasked sum carries the noise)
    noise_multiplier: float
    clipping_norm: float
    sampling: str  # "poisson" or "fixed"
    sample_size: int  # expected users per round
    population: int
    delta: float
    accountant: str  # "rdp" or "pld"
    max_rounds: int = 0  # local and distributed DP: rounds a user may take part in (its devices enforce it)
    calibrated: bool = False  # z was calibrated to a target epsilon (else set by hand)
    weights: tuple[float, ...] = ()  # releases of unequal weight w_r (sum 1), one per round; (): every round alike

    @property
    def full_participation(self) -> bool:
        """Every user takes part in every round (no sampling to amplify, nothing for the server to choose)."""
        return self.sample_size >= self.population and self.sampling == "fixed" and self.mode != "local"

    def round_z(self, release: int, z: float | None = None) -> float:
        """Noise multiplier of the `release`-th round (1-based): z / sqrt(w_r) for releases of unequal weight."""
        z = self.noise_multiplier if z is None else z
        if not self.weights:
            return z
        return z / math.sqrt(self.weights[min(release, len(self.weights)) - 1])

    def round_noise_std(self, release: int) -> float:
        """Std of the round's Gaussian noise per coordinate, on the sum (central) or per user (local)."""
        return self.round_z(release) * self.clipping_norm

    @property
    def widest_z(self) -> float:
        """The largest of the rounds' noise multipliers (what sizes SecAgg+'s range)."""
        return max(self.round_z(r) for r in range(1, len(self.weights) + 1)) if self.weights else self.noise_multiplier

    @property
    def rate(self) -> float:
        return self.sample_size / self.population

    @property
    def noise_std(self) -> float:
        """Std of the Gaussian noise per coordinate: on the sum (central) or per user (local)."""
        return self.noise_multiplier * self.clipping_norm

    def guarantee(self, rounds: int) -> float:
        """Epsilon that holds for every user after `rounds` rounds: central DP composes
        every round; local DP the rounds of the most active user allowed, the cap."""
        return self.epsilon(min(rounds, self.max_rounds) if self.mode == "local" else rounds)

    def server_epsilon(self, rounds_taken: int) -> float:
        """Distributed DP against the server: it chose who takes part, so no amplification;
        each of a user's rounds is a Gaussian release of its clipped update (replace-one,
        sensitivity 2C) in noise z C, composed over the rounds it took part in (capped).
        With full participation it chose nobody: the zero-out relation holds against it as
        against readers, and its epsilon is the release's."""
        if self.full_participation:
            return self.epsilon(rounds_taken)
        return dataclasses.replace(self, mode="local").epsilon(min(rounds_taken, self.max_rounds or rounds_taken))

    def event(self, z: float | None = None) -> dp_event.DpEvent:
        """One round's DpEvent in dp-accounting's terms."""
        z = self.noise_multiplier if z is None else z
        if self.full_participation:
            return dp_event.GaussianDpEvent(z)  # zero-out: the sum moves by at most C
        if self.mode == "local":
            return dp_event.GaussianDpEvent(z / 2)
        if self.sampling == "poisson":
            return dp_event.PoissonSampledDpEvent(self.rate, dp_event.GaussianDpEvent(z))
        return dp_event.SampledWithoutReplacementDpEvent(self.population, self.sample_size,
                                                         dp_event.GaussianDpEvent(z / 2))

    def composed(self, rounds: int, z: float | None = None) -> dp_event.DpEvent:
        """The first `rounds` releases: copies of one event, or each round's own for unequal weights."""
        if not self.weights:
            return dp_event.SelfComposedDpEvent(self.event(z), rounds)
        return dp_event.ComposedDpEvent([self.event(self.round_z(r, z)) for r in range(1, rounds + 1)])

    def _relation(self):
        relation = dp_accounting.NeighboringRelation
        if self.full_participation:
            return relation.REPLACE_SPECIAL
        add_remove = self.mode != "local" and self.sampling == "poisson"
        return relation.ADD_OR_REMOVE_ONE if add_remove else relation.REPLACE_ONE

    def fresh_accountant(self):
        if self.accountant == "pld":
            return pld_privacy_accountant.PLDAccountant(self._relation())
        return rdp_privacy_accountant.RdpAccountant(neighboring_relation=self._relation())

    def epsilon(self, rounds: int, z: float | None = None) -> float:
        """Epsilon at `delta` after `rounds` releases (for local DP: rounds a user took part in)."""
        if rounds <= 0:
            return 0.0
        accountant = self.fresh_accountant()
        accountant.compose(self.composed(rounds, z))
        return float(accountant.get_epsilon(self.delta))

    def calibrate(self, target_epsilon: float, rounds: int) -> float:
        """Smallest z whose epsilon after `rounds` is at most `target_epsilon` (Brent's method;
        z below 0.1 is not searched: PLD's discretization would not fit in memory there)."""
        low, high = 0.1, 1e4
        if self.epsilon(rounds, low) <= target_epsilon:
            return low
        if self.epsilon(rounds, high) > target_epsilon:
            raise ValueError(f"epsilon {target_epsilon} is out of reach in {rounds} rounds even with z={high}")
        return float(dp_accounting.calibrate_dp_mechanism(
            self.fresh_accountant, lambda z: self.composed(rounds, z),
            target_epsilon, self.delta, dp_accounting.ExplicitBracketInterval(low, high), tol=1e-4))


def participation_cap(rounds: int, rate: float, population: int, tail: float = 0.01) -> int:
    """Smallest k such that, in expectation, fewer than `tail` users of the population would
    be sampled in more than k of `rounds` rounds (each round with probability `rate`)."""
    if rate >= 1:
        return rounds
    log_p, log_q = math.log(rate), math.log1p(-rate)
    pmf = [math.exp(math.lgamma(rounds + 1) - math.lgamma(k + 1) - math.lgamma(rounds - k + 1) + k * log_p
                    + (rounds - k) * log_q) for k in range(rounds + 1)]
    above = 0.0
    for k in range(rounds, -1, -1):  # above = P(X > k)
        if population * above > tail:
            return min(rounds, k + 1)
        above += pmf[k]
    return 1
