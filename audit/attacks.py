"""Item-inference attackers: which items did a user rate, from what an observer sees?

Each attacker ranks every item and is scored against the truth (the user's training
items) with ROC AUC and precision@k:
- prior: item popularity alone, without seeing any update (what needs no data);
- norm: the L2 size of each item's row in the observation;
- direction: a generalized likelihood-ratio test per item that knows the shape of an MF
  update (its "item-emb" and "item-bias" statistics: the factor family's). A rated item's row
  change lies in the plane spanned by (p_u, 1) and (reg_item q_i, reg_bias b_i); noise spreads
  over all K+1 coordinates. Projecting on that plane keeps the signal and 2 of K+1 noise
  dimensions. The attacker is given the target's private vector p_u (stronger than any real
  server), and adds the popularity prior's log-odds: a Bayesian observer who knows everything
  but the rated set;
- seed: regenerates the noise from every seed construction the code has used and
  subtracts it (see `seed_attack`).
"""

from __future__ import annotations

import numpy as np

from fedrec.models.algorithm import Statistic
from fedrec.models.defaults import Hyper
from fedrec.models.factors import ITEM_BIAS, ITEM_EMB
from fedrec.models.randomness import STREAM_TAGS, seeded_rng
from fedrec.privacy.noise import add_device_noise

LEGACY_TAGS = (11, 7, 0xD9, 0x5A, 0xA0D, 0xA0D17)  # literals earlier versions seeded noise and decoys with


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1, counts)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_k(scores: np.ndarray, positive: np.ndarray, k: int) -> float:
    top = np.argsort(-scores, kind="mergesort")[:k]
    return float(positive[top].mean())


def norm_scores(dense: dict[str, np.ndarray], uploaded: np.ndarray | None = None) -> np.ndarray:
    """Size of each item's row (over the factor family's item-emb and item-bias statistics); rows absent from
    a sparse upload score below any present one."""
    scores = np.sqrt((item_rows(dense) ** 2).sum(axis=1))
    if uploaded is not None:
        present = np.zeros(len(scores), bool)
        present[uploaded] = True
        scores = np.where(present, scores + 1.0, 0.0)  # +1: present beats absent whatever its size
    return scores


def item_rows(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """[items, K + 1] float64: each item's embedding row and its bias, from model arrays or statistics."""
    bias = np.asarray(arrays[ITEM_BIAS], np.float64)
    return np.concatenate([np.asarray(arrays[ITEM_EMB], np.float64), bias.reshape(len(bias), -1)], axis=1)


def prior_log_odds(popularity: np.ndarray, n_users: int) -> np.ndarray:
    """Log-odds that a user rated each item, from how many users rated it (smoothed)."""
    p = (popularity + 0.5) / (n_users + 1.0)
    return np.log(p) - np.log1p(-p)


def direction_scores(dense: dict[str, np.ndarray], model: dict[str, np.ndarray], user_vec: np.ndarray,
                     hyper: Hyper, noise_std: float, prior: np.ndarray, n_rated: int) -> np.ndarray:
    """Posterior log-odds per item: the prior plus the log likelihood ratio of the item's row
    projected on the plane a real update lies in (see module doc), with the update's
    coefficients in that plane taken as N(0, tau^2): tau^2 is the observation's energy above
    the noise floor spread over the target's `n_rated` items (the attacker knows the count)."""
    rows = item_rows(dense)
    q = item_rows(model) * np.array([hyper.reg_item] * hyper.dim + [hyper.reg_bias])
    a = np.append(user_vec, 1.0)
    a = a / max(np.linalg.norm(a), 1e-30)
    # Gram-Schmidt per item: e1 = a (shared), e2 = the part of q_i orthogonal to a.
    q_perp = q - (q @ a)[:, None] * a
    q_norm = np.linalg.norm(q_perp, axis=1)
    e2 = q_perp / np.maximum(q_norm, 1e-30)[:, None]
    projected = (rows @ a) ** 2 + np.where(q_norm > 1e-12, (rows * e2).sum(axis=1) ** 2, 0.0)
    sigma2 = max(noise_std, 1e-9) ** 2  # without noise any non-zero row is conclusive
    signal = max((rows**2).sum() - rows.size * noise_std**2, 0.0)
    tau2 = max(signal / max(n_rated, 1) / 2, 1e-30)  # per plane coordinate
    shrink = tau2 / (sigma2 + tau2)
    return prior + np.log(sigma2 / (sigma2 + tau2)) + projected / (2 * sigma2) * shrink


def noise_candidates(seed: int, round_: int, user: int) -> list[tuple[str, np.random.Generator]]:
    """Every way the code base has derived a random stream from what the server knows."""
    candidates = [(f"seeded_rng(seed, {name!r}{tail})", seeded_rng(seed, name, *key)) for name in STREAM_TAGS
                  for tail, key in (("", ()), (", round", (round_,)), (", round, user", (round_, user)))]
    for tag in (*LEGACY_TAGS, *STREAM_TAGS.values()):
        for key in ([seed, round_, user, tag], [seed, tag], [seed, round_, tag], [seed, tag, round_, user]):
            candidates.append((f"default_rng({key})", np.random.default_rng(key)))
    candidates += [("default_rng(seed)", np.random.default_rng(seed)),
                   ("default_rng([seed, round])", np.random.default_rng([seed, round_]))]
    return candidates


def seed_attack(upload: dict[str, np.ndarray], statistics: dict[str, Statistic], noise_std: float, seed: int,
                round_: int, user: int, truth: np.ndarray) -> tuple[float, str]:
    """Regenerate a dense local-DP upload's noise with each candidate stream, subtract it,
    and rank items by what is left (unrated rows come out exactly zero when the guess is
    right). Returns the AUC of the best guess (the one leaving the most zero rows); when no
    guess zeroes a single row, none is subtracted (a wrong guess only adds noise, and a
    fixed one would bias the ranking toward the rows it happens to be large on)."""
    best = (0, roc_auc(norm_scores(upload), truth), "none matched")
    per_item = {name for name, s in statistics.items() if s.per_item}
    for name, rng in noise_candidates(seed, round_, user):
        guess = {k: np.zeros_like(v) for k, v in upload.items()}  # in the upload's order, as the device draws
        add_device_noise(guess, noise_std, np.ones(len(upload[ITEM_BIAS]), np.int64), 1, per_item, rng)
        residual = {k: upload[k] - guess[k] for k in (ITEM_EMB, ITEM_BIAS)}
        scores = norm_scores(residual)
        zeros = int((scores < 1e-6 * noise_std).sum())
        if zeros > best[0]:
            best = (zeros, roc_auc(scores, truth), name)
    return best[1], best[2]
