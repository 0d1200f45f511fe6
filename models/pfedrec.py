"""PFedRec (Zhang et al., IJCAI 2023, "Dual Personalization on Federated Recommendation").

score(u, i) = sigmoid(w_u . q_i + c_u): each device keeps its own score function (w_u, c_u); the item
embeddings q_i are shared. A round, for each user, over minibatches of its rows (positives and freshly
sampled negatives, `local_batch` rows a step): an SGD step of the score function with the items fixed,
then an SGD step of the user's copies of the items with the new score function (step lr x items x
`item_lr_scale`, the official code's). The device sends the change of its copies; the server adds the
mean change over the round's users (the paper's average of the users' item embeddings, for every user
leaves the rows it did not touch as they were). Dual personalization: a device scores with its own view
of the items, the shared ones fine-tuned on its rows with its score function fixed; that view is never sent.

Everything is vectorized across a batch of users: minibatch j of every user is one step, users whose
rows ran out sit it out, and a user's copies are kept per (user, item) pair.
"""

from __future__ import annotations

import numpy as np
import torch

from .algorithm import DECOYS, DeviceKeys, RowContributions, Statistic, UserState
from .factors import FULL_RANKING_CHUNK, ITEM_EMB, ItemParams, Users, init_items, top_n
from .metrics import add_sums, full_ranking_sums, loo_sums
from .mf import MF, FactorServer
from .randomness import init_generator, mix64, negatives_key, uniform01
from .train import chunks, take

EVALUATION_ROUND = 0  # the negatives key of the scoring fine-tune: training rounds count from 1


class PFedRec(MF):
    name = "pfedrec"
    title = "PFedRec"
    refuses = {DECOYS: "a decoy row would train the device's own score function on a made-up label"}
    settings_read = frozenset({"dim", "reg_user", "reg_item", "init_std", "lr", "local_epochs", "local_batch",
                               "train_negatives", "item_lr_scale"})
    rating_feedback = False  # the paper's model is a classifier of interactions

    @classmethod
    def defaults(cls, implicit: bool) -> dict:
        """The paper's K = 32, no L2 (its code's l2_regularization 0) and its code's minibatches of 256 rows."""
        return {"dim": 32, "local_batch": 256, "reg_user": 0.0, "reg_item": 0.0, "reg_bias": 0.0}

    def statistics(self) -> dict[str, Statistic]:
        return {ITEM_EMB: Statistic(self.settings.dim)}

    def init_server(self, strategy: str = "", server_lr: float = 0.0) -> FactorServer:
        """Public starting items; the server adds the users' mean change as it is (the paper's averaging:
        --strategy and --server-lr are not read)."""
        s = self.settings
        return FactorServer({ITEM_EMB: init_items(self.n_items, s.dim, s.init_std, s.seed, 0.0).emb}, "fedavg", 1.0)

    def new_users(self, users: np.ndarray, population: int, rng: np.random.Generator | None) -> UserState:
        """Every device starts from one public score function (the official code copies one torch Linear's
        uniform(-1/sqrt(K), 1/sqrt(K)) initialization to every client), or from a private draw."""
        dim, bound = self.settings.dim, self.settings.dim ** -0.5
        if rng is None:
            start = (torch.rand(dim + 1, generator=init_generator(self.settings.seed, "user-init")) * 2 - 1) * bound
            start = start.expand(len(users), dim + 1).clone()
        else:
            start = torch.as_tensor(rng.uniform(-bound, bound, (len(users), dim + 1)), dtype=torch.float32)
        return {"emb": start[:, :dim].contiguous(), "bias": start[:, dim].contiguous()}

    # ------------------------------------------------------------------ device
    def train(self, shared, state, rows, round_: int, keys: DeviceKeys, decoys=None):
        seg, item, target = self.training_rows(rows, round_, keys)
        n = len(rows.users)
        pair_key, pair = torch.unique(seg * self.n_items + item, return_inverse=True)
        start = shared[ITEM_EMB][pair_key % self.n_items]
        w, c, copies, loss_sum = self._local(state["emb"], state["bias"], start, seg, item, pair, target, n,
                                             rows.users, keys.negatives(round_), train_score=True)
        contributions = RowContributions(n, pair_key // self.n_items, pair_key % self.n_items,
                                         {ITEM_EMB: copies - start}, {}, loss_sum=loss_sum, num_rows=len(seg))
        return {"emb": w, "bias": c}, contributions

    def _local(self, w, c, copies, seg, item, pair, target, n, users, key, train_score: bool):
        """`local_epochs` passes over the rows in minibatches of `local_batch` per user (shuffled per pass,
        counter-based per user): the score function's step, then the item copies' step with it. A step is
        dense: the active users' batches padded to [users, batch, K], so that it costs two batched matrix
        products, one gather and one scatter of the copies (which the score function's step leaves as they are)."""
        s = self.settings
        w, c, copies = w.clone(), c.clone(), copies.clone()
        item_lr = s.lr * self.n_items * s.item_lr_scale
        loss_sum = 0.0
        for epoch in range(s.local_epochs):
            for active, rows, real in _minibatches(seg.numpy(), item.numpy(), users, key, epoch, s.local_batch):
                p, t = pair[rows], target[rows] * real
                q = copies.index_select(0, p.reshape(-1)).reshape(*p.shape, -1)  # [users, batch, K]
                size = real.sum(1, keepdim=True)
                wa, ca = w[active], c[active]
                if train_score:
                    slope = (torch.sigmoid(torch.bmm(q, wa[:, :, None])[:, :, 0] + ca[:, None]) - t) * real / size
                    wa = wa - s.lr * (torch.bmm(slope[:, None, :], q)[:, 0] + s.reg_user * wa)
                    ca = ca - s.lr * slope.sum(1)
                    w[active], c[active] = wa, ca
                logit = torch.bmm(q, wa[:, :, None])[:, :, 0] + ca[:, None]
                losses = torch.nn.functional.binary_cross_entropy_with_logits(logit, t, reduction="none")
                loss_sum += float((losses * real).sum())
                slope = (torch.sigmoid(logit) - t) * real * (-item_lr) / size
                if s.reg_item:  # weight decay on the rows this step touches (computed before the step)
                    touched = torch.unique(p[real > 0])
                    copies[touched] *= 1 - item_lr * s.reg_item
                copies.index_add_(0, p.reshape(-1), (slope[:, :, None] * wa[:, None, :]).reshape(-1, wa.shape[1]))
        return w, c, copies, loss_sum / max(s.local_epochs, 1)

    def server_step(self, state: FactorServer, sums, weight: float, round_: int, noise_std: float = 0.0) -> None:
        state.optimizer.step({ITEM_EMB: (sums[ITEM_EMB] / max(weight, 1.0)).float()})

    def check_sums(self, sums, users: float) -> str | None:
        return None

    # ------------------------------------------------------------------ scoring
    def personal_view(self, model, state: UserState, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(pair keys user x n_items + item, their fine-tuned embeddings): the device's own view of the items
        it trained on, the shared rows fine-tuned with the score function fixed (never sent)."""
        seg, item, target = self.training_rows(rows, EVALUATION_ROUND, DeviceKeys(self.settings.seed))
        pair_key, pair = torch.unique(seg * self.n_items + item, return_inverse=True)
        start = model[ITEM_EMB][pair_key % self.n_items]
        _, _, copies, _ = self._local(state["emb"], state["bias"], start, seg, item, pair, target, len(rows.users),
                                      rows.users, negatives_key(self.settings.seed, EVALUATION_ROUND), False)
        return pair_key, copies

    def scores(self, model, state: UserState, rows) -> torch.Tensor:
        """[users, items] logits of the cohort's users through their own views of the items."""
        pair_key, copies = self.personal_view(model, state, rows)
        logits = state["emb"] @ model[ITEM_EMB].T + state["bias"][:, None]
        user, item = pair_key // self.n_items, pair_key % self.n_items
        logits[user, item] = (state["emb"][user] * copies).sum(1) + state["bias"][user]
        return logits

    def evaluate(self, model, state, rows, k: int) -> dict[str, float]:
        return self.evaluate_with_validation(model, state, rows, k)[0]

    def evaluate_with_validation(self, model, state, rows, k: int) -> tuple[dict[str, float], dict[str, float]]:
        """Both sides from one personal view per user (its fine-tune is the costly part of scoring)."""
        test: dict[str, float] = {}
        held: dict[str, float] = {}
        with torch.no_grad():
            for lo, hi, part in chunks(rows, FULL_RANKING_CHUNK):
                logits = self.scores(model, take(state, torch.arange(lo, hi)), part)
                if part.test_validation is None:
                    add_sums(test, _ranked(logits, part, k, full=True))
                else:
                    add_sums(test, _ranked(logits, part.validation_side(False), k, full=True))
                    add_sums(held, _ranked(logits, part.validation_side(True), k, full=False))
        return test, held

    def fit_user(self, model, items: np.ndarray, ratings: np.ndarray) -> Users:
        """A score function for the user's own interactions with the shared items fixed (logistic regression
        against sampled negatives, on the device)."""
        s = self.settings
        penalty = torch.tensor([max(s.reg_user, 1e-3)] * s.dim + [1e-3], dtype=torch.float64)
        shared = ItemParams(model[ITEM_EMB], torch.zeros(self.n_items), torch.zeros(1))
        return self._fit_implicit(shared, items, torch.zeros(s.dim, dtype=torch.float64), penalty)

    def top_n(self, model, user: Users, rated, n: int, hide=None):
        shared = ItemParams(model[ITEM_EMB], torch.zeros(self.n_items), torch.zeros(1))
        return top_n(shared, user, rated, n, None, hide)


def _ranked(logits: torch.Tensor, rows, k: int, full: bool) -> dict[str, float]:
    """Ranking sums of the held-out rows of `rows` from the users' logits [users, items]: against their
    sampled negatives, and (`full`) against every item they did not train on."""
    if len(rows.test_segment) == 0:
        return {}
    seg, item = torch.as_tensor(rows.test_segment), torch.as_tensor(rows.test_item)
    sums = loo_sums(logits[seg, item], logits[seg[:, None], torch.as_tensor(rows.test_negatives)], k)
    if not full:
        return sums
    exclude = torch.zeros_like(logits, dtype=torch.bool)
    exclude[rows.train_segment, rows.train_item] = True
    relevant = torch.zeros_like(exclude)
    relevant[seg, item] = True
    return add_sums(sums, full_ranking_sums(logits, exclude, relevant, k))


def _minibatches(seg: np.ndarray, item: np.ndarray, users: np.ndarray, key: np.ndarray, epoch: int, size: int):
    """Each lockstep minibatch as (active user positions [a], row indices [a, batch], 1.0 on real rows and
    0.0 on padding): a user's rows in a random order (counter-based per user, pass and item, so a user's
    batches do not depend on who shares its cohort), `size` at a time (0: all of them at once)."""
    salt = np.uint64(epoch * 0x9E3779B97F4A7C15 % (1 << 64))
    draw = uniform01(mix64(mix64(users[seg].astype(np.uint64) ^ key ^ salt) + item.astype(np.uint64)))
    order = np.argsort(seg + draw * 0.5, kind="stable")  # by user, then shuffled (an item's rows in row order)
    counts = np.bincount(seg)
    position = np.arange(len(seg)) - np.repeat(np.cumsum(counts) - counts, counts)  # in `order`
    width = size if size > 0 else int(counts.max(initial=0))
    step = position // width
    by_step = np.argsort(step, kind="stable")  # each step's rows stay grouped by user
    bounds = np.searchsorted(step[by_step], np.arange(int(step.max(initial=-1)) + 2))
    for j in range(len(bounds) - 1):
        picked = by_step[bounds[j]:bounds[j + 1]]
        rows, slot, owner = order[picked], position[picked] % width, seg[order[picked]]
        new_user = np.concatenate([[True], owner[1:] != owner[:-1]])
        local = np.cumsum(new_user) - 1
        index = np.zeros((int(local[-1]) + 1, int(slot.max()) + 1), np.int64)
        real = np.zeros(index.shape, np.float32)
        index[local, slot] = rows
        real[local, slot] = 1.0
        yield torch.as_tensor(owner[new_user]), torch.as_tensor(index), torch.as_tensor(real)
