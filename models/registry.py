"""The algorithms fedrec knows, by name, and which one `--model auto` runs.

Adding an algorithm is one file under models/ and one line here. Nothing outside an algorithm's file and
this registry asks which algorithm a run trains: the rest reads what an algorithm declares (its
statistics, what it refuses, whether it models implicit feedback).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .algorithm import Algorithm
from .bpmf import BPMF
from .dpstats import DPStats
from .fcf import FCF
from .fedrecon import FedRecon
from .mf import MF
from .pfedrec import PFedRec
from .svdpp import SVDPP

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (MF, SVDPP, BPMF, DPStats, PFedRec, FedRecon, FCF)}
AUTO_ORDER = ("bpmf", "dpstats", "mf")
"""--model auto runs the first of these that admits everything the run asks for: Bayesian MF won on
validation (ML-100K u1: 0.9095 vs MF's 0.9248) but admits no privacy mechanism and needs every user in
every round; dpstats is the private one where DP is asked and every user takes part in each round
(ML-100K u1 at epsilon 8: about 0.967 against DP MF's 1.048), for ratings, and bounds its own
statistics (no --clipping-norm); MF admits them all (partial participation, implicit feedback)."""
NEEDS = {"dpstats": "dp"}
"""Algorithms --model auto runs only where the run asks for this mechanism (dpstats: non-private, MF and
BPMF are more accurate)."""


def algorithm_class(name: str) -> type[Algorithm]:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(ALGORITHMS)}") from None


def auto(implicit: bool, asked: dict[str, str]) -> tuple[str, str]:
    """(name, why the ones before it were passed over) of the algorithm --model auto runs for a run that
    asks for the mechanisms `asked` (mechanism -> the flag that asks for it) on implicit or rating data."""
    passed_over = []
    for name in AUTO_ORDER:
        cls = ALGORITHMS[name]
        refused = [flag for mechanism, flag in asked.items() if mechanism in cls.refuses]
        if implicit and not cls.implicit_feedback:
            refused.insert(0, "implicit feedback (--split loo)")
        if cls.bounded_norm and "clipping" in asked:
            refused.append(f"{asked['clipping']} (it bounds its own statistics)")
        if name in NEEDS and NEEDS[name] not in asked:
            continue  # not passed over for anything the run asks: it is not for this kind of run
        if not refused or name == AUTO_ORDER[-1]:
            return name, "; ".join(passed_over)
        passed_over.append(f"{name} refuses {', '.join(refused)}")
    raise AssertionError("AUTO_ORDER is empty")


@contextlib.contextmanager
def substituted(name: str, cls: type[Algorithm]) -> Iterator[None]:
    """Build `cls` wherever algorithm `name` is asked for, in this process, until the block ends. The canary
    audit's hook (fedrec.audit.canary): the real server and ClientApp build their algorithm from here, so an
    in-process run of a config that names `name` trains the audit's instrument through the real pipeline,
    while the config, its checks and the command line's --model choices stay those of `name`. No run uses it."""
    previous = ALGORITHMS[name]
    ALGORITHMS[name] = cls
    try:
        yield
    finally:
        ALGORITHMS[name] = previous
