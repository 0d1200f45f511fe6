"""The local training step: what each device computes, vectorized across a batch of users.

Every user trains on its own rows only, against its own copy of the item rows it touches,
so a user's result depends only on its data, its private state and the item parameters
it was given, never on who else is in the batch. Per-user clipping happens before
anything is summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .mf import Hyper, ItemParams, UserState
from .randomness import mix64, negatives_key

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class LocalUpdate:
    """Summed item-side updates of a batch of users, and per-user facts about them."""

    emb_delta: torch.Tensor  # [items, dim], sum over users of (clipped) row changes
    bias_delta: torch.Tensor  # [items]
    global_bias_delta: torch.Tensor  # [1]
    num_users: int
    loss_sum: float
    num_rows: int
    norms: torch.Tensor  # [users] L2 norm of each user's update before clipping
    pair_item: torch.Tensor  # [pairs] item of each distinct (user, item) the batch changed
    pair_user: torch.Tensor  # [pairs] user position of each such pair


def sample_negatives(users: np.ndarray, segment: np.ndarray, positives: np.ndarray, n_neg: np.ndarray,
                     n_items: int, seed: int, round_: int, key: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """n_neg[j] items for user j, uniform over items the user did not rate (with replacement).
    Keyed by (seed, round), or by `key` when given (a private key: see training_rows)."""
    neg_segment = np.repeat(np.arange(len(users)), n_neg)
    counter = np.arange(len(neg_segment)) - np.repeat(np.cumsum(n_neg) - n_neg, n_neg)
    round_key = negatives_key(seed, round_) if key is None else np.array([key], np.uint64)
    base = mix64(users[neg_segment].astype(np.uint64) ^ round_key)
    rated = np.sort(users[segment] * n_items + positives)
    items = np.empty(len(neg_segment), np.int64)
    todo = np.arange(len(neg_segment))
    attempt = 0
    while len(todo):  # redraw the few that hit a rated item
        draw = mix64(base[todo] + (counter[todo] * 64 + attempt).astype(np.uint64))
        items[todo] = (draw % np.uint64(n_items)).astype(np.int64)
        pair = users[neg_segment[todo]] * n_items + items[todo]
        pos = np.minimum(np.searchsorted(rated, pair), len(rated) - 1)
        todo = todo[rated[pos] == pair]
        attempt += 1
    return neg_segment, items


USERS_PER_CHUNK = 1024
"""Users trained at once. Users are independent, so a cohort is trained a chunk at a time:
the per-row tensors of 50,000 users are gigabytes. On the 100k-user bench, 1,024 gave lower
peak memory than 4,096 (2.18 vs 2.37 GB) and rounds no slower (0.31 vs 0.32-0.62 s)."""


def local_train(items: ItemParams, state: UserState, segment: torch.Tensor, item: torch.Tensor,
                target: torch.Tensor, hyper: Hyper, clip_norm: float = 0.0,
                decoy: torch.Tensor | None = None) -> tuple[UserState, LocalUpdate]:
    """Train each user of the batch for `hyper.local_epochs` full-batch steps.

    segment/item/target: the rows (user position, item, rating or 0/1 label). Returns the
    users' new private state and the summed item-side update (each user's update clipped
    to L2 norm `clip_norm` first when it is > 0).

    decoy: for the padded upload mode, True on decoy rows: items the user did not rate,
    given a made-up target (fedrec.models.device.decoy_targets: a plausible rating, or
    label 1). Their item rows are trained exactly like real ones, so an observer cannot
    tell them apart by the shape of the update or by the rating it implies; they never
    touch the user's own vector, its bias, the global bias or the loss.
    """
    n = state.emb.shape[0]
    if n <= USERS_PER_CHUNK:
        return _train_chunk(items, state, segment, item, target, hyper, clip_norm, decoy)
    # Rows grouped by user once (stable: a user's rows keep their order), so a chunk is a slice.
    order = torch.argsort(segment, stable=True)
    bounds = torch.searchsorted(segment[order], torch.arange(0, n + USERS_PER_CHUNK, USERS_PER_CHUNK).clamp(max=n))
    total = (torch.zeros_like(items.emb), torch.zeros_like(items.bias))  # the chunks add into these
    states, updates = [], []
    for k, lo in enumerate(range(0, n, USERS_PER_CHUNK)):
        rows = order[bounds[k]:bounds[k + 1]]
        chunk_state, update = _train_chunk(items, state.take(torch.arange(lo, min(n, lo + USERS_PER_CHUNK))),
                                           segment[rows] - lo, item[rows], target[rows], hyper, clip_norm,
                                           None if decoy is None else decoy[rows], total)
        update.pair_user += lo
        states.append(chunk_state)
        updates.append(update)
    return UserState(*(torch.cat([getattr(s, f) for s in states]) for f in ("emb", "bias", "m", "v", "step"))), \
        LocalUpdate(emb_delta=total[0], bias_delta=total[1],
                    global_bias_delta=sum(u.global_bias_delta for u in updates), num_users=n,
                    loss_sum=sum(u.loss_sum for u in updates), num_rows=sum(u.num_rows for u in updates),
                    norms=torch.cat([u.norms for u in updates]), pair_item=torch.cat([u.pair_item for u in updates]),
                    pair_user=torch.cat([u.pair_user for u in updates]))


def _train_chunk(items: ItemParams, state: UserState, segment: torch.Tensor, item: torch.Tensor,
                 target: torch.Tensor, hyper: Hyper, clip_norm: float, decoy: torch.Tensor | None,
                 total: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[UserState, LocalUpdate]:
    """local_train for one batch of users; `total`: item-side sums to add this batch into."""
    n = state.emb.shape[0]
    q0 = items.emb[item]  # each user's own copy of the rows it touches
    b0 = items.bias[item]
    mu0 = items.global_bias.expand(n)
    dq = db = dmu = None  # accumulated local changes of those copies
    state = UserState(state.emb.clone(), state.bias.clone(), state.m.clone(), state.v.clone(), state.step.clone())
    loss_sum = 0.0
    real = None if decoy is None else ~decoy
    rows_per_user = torch.bincount(segment if real is None else segment[real], minlength=n).clamp(min=1)
    dim = hyper.dim
    svdpp = items.emb.shape[1] == 2 * dim
    if svdpp:  # N(u): the user's positive rows (device_step refuses decoys under SVD++: they would show)
        member = (target > 0) if hyper.implicit else torch.ones(len(item), dtype=torch.bool)
        in_sum = member if real is None else member & real
        sum_seg = segment[in_sum]
        y_scale = torch.bincount(sum_seg, minlength=n).clamp(min=1).to(q0.dtype).rsqrt()
    for epoch in range(hyper.local_epochs):
        q_full, b, mu = (q0, b0, mu0) if epoch == 0 else (q0 + dq, b0 + db, mu0 + dmu)
        q = q_full[:, :dim]
        p_own = state.emb[segment]
        p = p_own
        if svdpp:
            y_sum = torch.zeros(n, dim).index_add_(0, sum_seg, q_full[in_sum, dim:]) * y_scale[:, None]
            p = p_own + y_sum[segment]
        bu = state.bias[segment]
        pred = mu[segment] + bu + b + (p * q).sum(dim=1)
        if hyper.implicit:
            dloss = torch.sigmoid(pred) - target
            losses = torch.nn.functional.binary_cross_entropy_with_logits(pred, target, reduction="none")
        else:
            err = pred - target
            dloss, losses = 2 * err, err.square()
        loss_sum = float(losses.sum() if real is None else losses[real].sum())  # at the epoch's start
        user_rows = segment
        if real is not None:
            user_rows = segment[real]
            p_user, q_user, dl_user, bu_user = p_own[real], q[real], dloss[real], bu[real]
        else:
            p_user, q_user, dl_user, bu_user = p_own, q, dloss, bu
        row_grads = torch.addcmul(2 * hyper.reg_user * p_user, dl_user[:, None], q_user)
        grad_emb = torch.zeros(n, hyper.dim).index_add_(0, user_rows, row_grads)
        grad_bias = torch.zeros(n).index_add_(0, user_rows, dl_user + 2 * hyper.reg_bias * bu_user)
        _adam_rows(state, torch.cat([grad_emb, grad_bias[:, None]], dim=1), hyper.lr)
        step_q = torch.addcmul(2 * hyper.reg_item * q, dloss[:, None], p).mul_(-hyper.lr)
        if svdpp:  # d loss / d y_j = |N(u)|^-1/2 sum over the user's rows of dloss q_i, for every j in N(u)
            pull = torch.zeros(n, dim).index_add_(0, user_rows, dl_user[:, None] * q_user) * y_scale[:, None]
            y = q_full[:, dim:]
            step_y = (2 * hyper.reg_item * y + pull[segment]).mul_(-hyper.lr)
            step_y[~member] = 0.0
            step_q = torch.cat([step_q, step_y], dim=1)
        step_b = (dloss + 2 * hyper.reg_bias * b).mul_(-hyper.lr)
        # mu's loss curvature grows with the user's rating count (every row touches it), so its
        # local step is the mean over the user's rows: a summed step is unstable past one epoch.
        step_mu = torch.zeros(n).index_add_(0, user_rows, dl_user).div_(rows_per_user).mul_(-hyper.lr)
        dq, db, dmu = (step_q, step_b, step_mu) if epoch == 0 else (dq + step_q, db + step_b, dmu + step_mu)
    # A user's contribution is its change per *item*: rows of one item (an implicit negative
    # drawn twice, a negative that is also a decoy, several local epochs) add up before the
    # norm is taken, so the bound holds on exactly what is summed.
    pair_key, pair_of_row = torch.unique(segment * items.emb.shape[0] + item, return_inverse=True)
    pair_user, pair_item = pair_key // items.emb.shape[0], pair_key % items.emb.shape[0]
    pair_dq = torch.zeros(len(pair_key), items.emb.shape[1]).index_add_(0, pair_of_row, dq)
    pair_db = torch.zeros(len(pair_key)).index_add_(0, pair_of_row, db)
    pair_dq, pair_db, dmu, norms = clip_per_user(pair_user, pair_dq, pair_db, dmu, clip_norm)
    update = LocalUpdate(
        emb_delta=(torch.zeros_like(items.emb) if total is None else total[0]).index_add_(0, pair_item, pair_dq),
        bias_delta=(torch.zeros_like(items.bias) if total is None else total[1]).index_add_(0, pair_item, pair_db),
        global_bias_delta=dmu.sum().reshape(1),
        num_users=n, loss_sum=loss_sum, num_rows=len(item) if real is None else int(real.sum()), norms=norms,
        pair_item=pair_item, pair_user=pair_user,
    )
    return state, update


def clip_per_user(pair_user: torch.Tensor, pair_dq: torch.Tensor, pair_db: torch.Tensor, dmu: torch.Tensor,
                  clip_norm: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale each user's whole item-side change (its rows, item biases and global bias) to
    L2 norm at most `clip_norm` (0: no clipping). `pair_user` gives the user of each row
    and must list each (user, item) once. Returns the scaled parts and the norms before."""
    # vector_norm accumulates in float64 without a float64 copy of the rows (half the time)
    row_sq = torch.linalg.vector_norm(pair_dq, dim=1, dtype=torch.float64).square() + pair_db.double() ** 2
    sq = torch.zeros(len(dmu), dtype=torch.float64).index_add_(0, pair_user, row_sq)
    norms = (sq + dmu.double() ** 2).sqrt()  # float64: the bound must not rest on float32 sums
    if clip_norm <= 0:
        return pair_dq, pair_db, dmu, norms.to(pair_dq.dtype)
    scale = clip_scales(norms, clip_norm).to(pair_dq.dtype)
    row_scale = scale[pair_user]
    if not bool(torch.all(scale > 0)):  # 0 * inf is nan: zero such rows outright
        kept = (row_scale > 0)[:, None]
        return (torch.where(kept, pair_dq * row_scale[:, None], 0.0), torch.where(kept[:, 0], pair_db * row_scale, 0.0),
                torch.where(scale > 0, dmu * scale, 0.0), norms.to(pair_dq.dtype))
    return pair_dq * row_scale[:, None], pair_db * row_scale, dmu * scale, norms.to(pair_dq.dtype)


def clip_scales(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """The factor (float64) that brings each user's update of L2 norm `norms` (float64) within
    `clip_norm` (> 0): 1 where it already is, 0 where it cannot be carried (see below)."""
    # A target a hair under C, so that float32 rounding of the scaled values cannot pass C.
    scale64 = torch.clamp(clip_norm * (1 - 1e-6) / norms.clamp(min=1e-300), max=1.0)
    # Fail closed where float32 cannot carry the scale: a non-finite update, or one so large that
    # the factor is subnormal (rounding could pass C) contributes nothing.
    return torch.where(torch.isfinite(norms) & (scale64 >= 1e-30), scale64, torch.zeros_like(scale64))


def _adam_rows(state: UserState, grad: torch.Tensor, lr: float) -> None:
    """Adam on each user's (p_u, b_u), with its own step count for bias correction."""
    beta1, beta2 = ADAM_BETAS
    state.step += 1
    state.m.mul_(beta1).add_(grad, alpha=1 - beta1)
    state.v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    m_hat = state.m / (1 - beta1 ** state.step)[:, None]
    v_hat = state.v / (1 - beta2 ** state.step)[:, None]
    step = lr * m_hat / (v_hat.sqrt() + ADAM_EPS)
    state.emb -= step[:, :-1]
    state.bias -= step[:, -1]


def training_rows(rows, n_items: int, hyper: Hyper, round_: int,
                  negatives_key: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(segment, item, target) that a batch of users trains on this round: its ratings, or
    for implicit feedback its positives (label 1) plus freshly sampled negatives (label 0).
    `negatives_key`: a private key for the negatives (runs that claim privacy against the
    server: which unrated items a user's upload touches must not be derivable from the seed);
    None: the seeded key, so central and federated runs draw alike."""
    seg, item = rows.train_segment, rows.train_item
    if not hyper.implicit:
        return torch.as_tensor(seg), torch.as_tensor(item), torch.as_tensor(rows.train_rating, dtype=torch.float32)
    counts = np.bincount(seg, minlength=len(rows.users))
    neg_seg, neg_item = sample_negatives(rows.users, seg, item, counts * hyper.train_negatives, n_items,
                                         hyper.seed, round_, negatives_key)
    target = np.concatenate([np.ones(len(seg), np.float32), np.zeros(len(neg_seg), np.float32)])
    return (torch.as_tensor(np.concatenate([seg, neg_seg])), torch.as_tensor(np.concatenate([item, neg_item])),
            torch.as_tensor(target))
