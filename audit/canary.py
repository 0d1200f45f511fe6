"""Canary audit: an empirical lower bound on epsilon (Jagielski et al. 2020; Nasr et al.
2021; the many-canaries-per-run idea of Steinke, Nasr & Jagielski 2023).

Canary users are inserted, each with probability 1/2 (OS entropy); each one's update is
huge and points along one coordinate of its own, so after clipping it should carry norm C
along a direction the attacker knows. The updates go through the real clipping
(`clip_per_user`), the real sampling rate, and the real noise functions (the server's
`add_central_noise`, the device's `add_device_noise`, with their private streams). The
attacker, who is given everyone else's contribution, tests each canary's presence with the
likelihood ratio of its coordinate over the rounds, picks a threshold on half of the
canaries and measures true/false positive rates on the other half. Any (eps, delta)-DP
mechanism obeys TPR <= e^eps FPR + delta, so with Clopper-Pearson bounds on both rates

    eps_lower = log((TPR_low - delta) / FPR_high)

holds with the stated confidence. Canaries own disjoint coordinates and the noise is
independent per coordinate, so the canaries are independent trials of the per-user
mechanism. A lower bound above the accountant's epsilon means a bug: clipping that does
not bind, noise smaller than claimed, or noise an attacker can predict.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from fedrec.models.local import clip_per_user
from fedrec.models.mf import GLOBAL_BIAS, ITEM_BIAS, ITEM_EMB
from fedrec.models.randomness import private_rng
from fedrec.models.upload import add_device_noise
from fedrec.server.privacy import PrivacyPlan, add_central_noise

OVERSHOOT = 100.0  # a canary's raw update is this many times C: clipping must bring it down


def canary_updates(n_items: int, dim: int, clip: float, count: int) -> np.ndarray:
    """Each canary's clipped value on its own coordinate (canary j owns flat coordinate j of
    the [n_items, dim + 1] table of item rows and biases), through the real clipping."""
    j = np.arange(count)
    col = j % (dim + 1)
    pair_dq = torch.zeros(count, dim, dtype=torch.float32)
    pair_db = torch.zeros(count, dtype=torch.float32)
    in_emb = col < dim
    pair_dq[torch.as_tensor(j[in_emb]), torch.as_tensor(col[in_emb])] = OVERSHOOT * clip
    pair_db[torch.as_tensor(j[~in_emb])] = OVERSHOOT * clip
    pair_dq, pair_db, _, _ = clip_per_user(torch.as_tensor(j), pair_dq, pair_db, torch.zeros(count), clip)
    full = torch.cat([pair_dq, pair_db[:, None]], dim=1).numpy()
    return full[j, col].astype(np.float64)


def _as_arrays(flat: np.ndarray, n_items: int, dim: int) -> dict[str, np.ndarray]:
    table = np.zeros(n_items * (dim + 1))
    table[: len(flat)] = flat
    table = table.reshape(n_items, dim + 1)
    return {ITEM_EMB: table[:, :dim].astype(np.float32), ITEM_BIAS: table[:, dim].astype(np.float32),
            GLOBAL_BIAS: np.zeros(1, np.float32)}


def _flat(arrays: dict[str, np.ndarray], count: int) -> np.ndarray:
    return np.concatenate([arrays[ITEM_EMB], arrays[ITEM_BIAS][:, None]], axis=1).reshape(-1)[:count].astype(np.float64)


def _log_mix(o: np.ndarray, q: float, shift: float, sigma: float) -> np.ndarray:
    """log((1 - q) N(o; 0, s^2) + q N(o; shift, s^2)) up to a constant shared by both hypotheses."""
    a = np.log1p(-q) - o**2 / (2 * sigma**2) if q < 1 else np.full(o.shape, -np.inf)
    b = np.log(q) - (o - shift) ** 2 / (2 * sigma**2)
    return np.logaddexp(a, b)


def canary_scores(dp: str, plan: PrivacyPlan | None, n_items: int, dim: int, rounds: int, rate: float,
                  clip: float, member: np.ndarray, replace_one: bool, reproducible_seed: int | None,
                  min_users: int = 1) -> np.ndarray:
    """Log-likelihood-ratio score of each canary's presence from what the observer sees."""
    count = len(member)
    value = canary_updates(n_items, dim, clip, count)
    absent = -value if replace_one else np.zeros(count)  # the neighbour that replaces a missing canary
    own = np.where(member, value, absent)
    sigma = plan.noise_std if plan is not None else 0.0
    sampler = private_rng("canaries", reproducible_seed, 1)
    score = np.zeros(count)
    if dp == "local":  # the server sees every upload of the device: its max_rounds participations
        noise_rng = private_rng("device-noise", reproducible_seed, 0)
        for _ in range(plan.max_rounds):
            arrays = _as_arrays(own, n_items, dim)
            add_device_noise(arrays, sigma, np.ones(n_items, np.int64), 1, noise_rng)
            score += _flat(arrays, count)  # the LR of N(+C) vs N(-C) is monotone in the sum
        return score
    noise_rng = private_rng("central-noise", reproducible_seed)
    share_rng = private_rng("device-noise", reproducible_seed, 1)
    for _ in range(rounds):
        sampled = sampler.random(count) < rate
        release = _as_arrays(np.where(sampled, own, 0.0), n_items, dim)
        if dp == "central":
            release = add_central_noise(release, plan, noise_rng)
        elif dp == "distributed":  # the least accepted number of users each add their share, on their devices
            add_device_noise(release, sigma / np.sqrt(min_users), np.full(n_items, min_users), min_users, share_rng)
        o = _flat(release, count)
        if sigma > 0:  # sampling unknown to the attacker: each round is a mixture
            score += _log_mix(o, rate, clip, sigma) - (_log_mix(o, rate, -clip, sigma) if replace_one
                                                       else -(o**2) / (2 * sigma**2))
        else:
            score += o
    return score


def epsilon_lower_bound(score: np.ndarray, member: np.ndarray, delta: float, confidence: float,
                        rng: np.random.Generator) -> dict:
    """Choose a threshold (and direction) on half of the canaries, bound TPR and FPR on the
    other half with Clopper-Pearson, and turn them into a lower bound on epsilon."""
    alpha = 1 - confidence
    half = rng.random(len(score)) < 0.5
    best = _best_test(score[half], member[half], delta, alpha)
    held_score, held_member = score[~half], member[~half]
    sign, threshold = best
    guess = sign * held_score >= threshold
    pos, neg = held_member if sign > 0 else ~held_member, ~held_member if sign > 0 else held_member
    tp, fp = int((guess & pos).sum()), int((guess & neg).sum())
    tpr_low = _cp_low(tp, int(pos.sum()), alpha / 2)
    fpr_high = _cp_high(fp, int(neg.sum()), alpha / 2)
    eps = float(np.log((tpr_low - delta) / fpr_high)) if tpr_low > delta else 0.0
    return {"epsilon_lower": max(eps, 0.0), "confidence": confidence, "tpr": tp / max(pos.sum(), 1),
            "fpr": fp / max(neg.sum(), 1), "held_out_canaries": int(len(held_score))}


def _best_test(score: np.ndarray, member: np.ndarray, delta: float, alpha: float) -> tuple[int, float]:
    """(sign, threshold) whose bound is best on the selection half; sign -1 tests absence."""
    best, choice = -np.inf, (1, np.inf)
    for sign in (1, -1):
        s = sign * score
        pos, neg = (member, ~member) if sign > 0 else (~member, member)
        order = np.argsort(-s, kind="mergesort")
        tp, fp = np.cumsum(pos[order]), np.cumsum(neg[order])
        for cut in np.unique(np.geomspace(1, len(s), 200).astype(int)) - 1:
            low = _cp_low(int(tp[cut]), int(pos.sum()), alpha / 2)
            high = _cp_high(int(fp[cut]), int(neg.sum()), alpha / 2)
            if low > delta and np.log((low - delta) / high) > best:
                best, choice = np.log((low - delta) / high), (sign, float(s[order][cut]))
    return choice


def _cp_low(k: int, n: int, a: float) -> float:
    return 0.0 if k == 0 or n == 0 else float(stats.beta.ppf(a, k, n - k + 1))


def _cp_high(k: int, n: int, a: float) -> float:
    return 1.0 if k == n or n == 0 else float(stats.beta.ppf(1 - a, k + 1, n - k))


def canary_audit(dp: str, plan: PrivacyPlan | None, n_items: int, dim: int, rounds: int, rate: float, clip: float,
                 delta: float, max_canaries: int = 200_000, confidence: float = 0.95,
                 reproducible_seed: int | None = None, min_users: int = 1) -> dict:
    """One audit row: the empirical epsilon lower bound next to the accountant's."""
    count = min(n_items * (dim + 1), max_canaries)
    rng = private_rng("canaries", reproducible_seed, 0)
    member = rng.random(count) < 0.5
    replace_one = dp == "local" or (plan is not None and plan.sampling == "fixed")
    score = canary_scores(dp, plan, n_items, dim, rounds, rate, clip, member, replace_one, reproducible_seed, min_users)
    row = {"attacker": "canary", "observer": "upload" if dp == "local" else "aggregate", "dp": dp,
           "secure_aggregation": "secagg+" if dp == "distributed" else "none",
           "epsilon": None if plan is None else plan.guarantee(rounds), "canaries": count,
           "noise_std": 0.0 if plan is None else plan.noise_std,
           "relation": "replace-one" if replace_one else "add-remove"}
    return row | epsilon_lower_bound(score, member, delta, confidence, rng)
