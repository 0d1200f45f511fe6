"""Federated Reconstruction (Singhal et al., NeurIPS 2021) of biased MF: devices keep no state.

Nothing of a user survives a round on its device. Each round the device splits the user's rows afresh
(a share `recon_fraction` of them, drawn per round) into a reconstruction part and an update part: it
reconstructs the user's (p_u, b_u) from the reconstruction rows with the received items fixed, in closed
form (local training's objective with the items fixed: a ridge regression for ratings, a few Newton steps
of the L2-penalized logistic loss for implicit feedback), then trains its copies of the items on the
update rows with that vector (MF's local step, models/mf.py) and sends their change, as MF does; the
server averages and applies it with its optimizer. Scoring reconstructs the vector from all the user's
training rows the same way. What the device holds between rounds is its data and its participation count.
"""

from __future__ import annotations

import numpy as np
import torch

from .algorithm import DeviceKeys, UserState
from .factors import GLOBAL_BIAS, ITEM_BIAS, ITEM_EMB, ItemParams, Users, evaluate_view
from .mf import MF
from .randomness import mix64, uniform01

GRAM_CHUNK = 8192  # rows whose outer products are summed at once ([rows, K + 1, K + 1] floats)
NEWTON_STEPS = 8  # the penalized logistic loss is convex: a few steps reach its minimum to float precision
SPLIT_SALT = np.uint64(0xD1B54A32D192ED03)  # the reconstruction split's key, apart from the negatives' draw
EVALUATION_ROUND = 0  # the negatives key of the scoring reconstruction: training rounds count from 1


def user_grams(seg: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, n: int) -> torch.Tensor:
    """[n, w, w]: per user, the sum over its rows of weight g g^T (g [rows, w], float64)."""
    out = torch.zeros(n, g.shape[1], g.shape[1], dtype=g.dtype)
    for lo in range(0, len(seg), GRAM_CHUNK):
        part = g[lo:lo + GRAM_CHUNK]
        weighted = part * weight[lo:lo + GRAM_CHUNK, None]
        out.index_add_(0, seg[lo:lo + GRAM_CHUNK], part[:, :, None] * weighted[:, None, :])
    return out


class FedRecon(MF):
    name = "fedrecon"
    title = "FedRecon (stateless MF)"
    settings_read = frozenset({"dim", "reg_user", "reg_item", "reg_bias", "init_std", "lr", "local_epochs",
                               "train_negatives", "recon_fraction", "strategy", "server_lr"})

    def new_users(self, users: np.ndarray, population: int, rng: np.random.Generator | None) -> UserState:
        """Nothing: a device keeps no state of its users between rounds."""
        return {}

    def train(self, shared, state, rows, round_: int, keys: DeviceKeys, decoys=None):
        """The user's vector reconstructed from one part of its rows, the items trained on the other; the
        state it was given goes back as it came (a participation count at most)."""
        seg, item, target = self.training_rows(rows, round_, keys)
        n = len(rows.users)
        draw = uniform01(mix64(mix64(rows.users[seg.numpy()].astype(np.uint64) ^ keys.negatives(round_) ^ SPLIT_SALT)
                               + item.numpy().astype(np.uint64)))
        support = torch.as_tensor(draw < self.settings.recon_fraction)
        users = self.reconstruct(shared, seg[support], item[support], target[support], n)
        moments = torch.zeros(n, self.settings.dim + 1)
        fresh = {"emb": users.emb, "bias": users.bias, "m": moments, "v": moments.clone(), "step": torch.zeros(n)}
        seg, item, target, decoy = self.with_decoys(shared, fresh, rows, seg[~support], item[~support],
                                                    target[~support], decoys)
        _, contributions = self.fit_rows(shared, fresh, seg, item, target, decoy, n)
        return state, contributions

    def reconstruct(self, shared, seg: torch.Tensor, item: torch.Tensor, target: torch.Tensor, n: int) -> Users:
        """Each user's (p_u, b_u) minimizing local training's loss on its rows with the items fixed (squared
        error or BCE, plus reg_user |p_u|^2 + reg_bias b_u^2 per row); a user without rows gets zeros."""
        s = self.settings
        q = shared[ITEM_EMB].double()[item]
        g = torch.cat([q, torch.ones(len(item), 1, dtype=torch.float64)], dim=1)
        base = shared[GLOBAL_BIAS].double() + shared[ITEM_BIAS].double()[item]
        count = torch.bincount(seg, minlength=n).double()
        penalty = torch.tensor([s.reg_user] * s.dim + [s.reg_bias], dtype=torch.float64)
        ridge = torch.diag_embed(count[:, None] * penalty + 1e-9)  # + 1e-9: a user without rows solves to zeros
        t = target.double()
        if not s.implicit:
            gram = user_grams(seg, g, torch.ones(len(seg), dtype=torch.float64), n) + ridge
            rhs = torch.zeros(n, s.dim + 1, dtype=torch.float64).index_add_(0, seg, g * (t - base)[:, None])
            x = torch.linalg.solve(gram, rhs)
        else:  # Newton on sum BCE + count * penalty |x|^2 (MF's _fit_implicit, batched)
            x = torch.zeros(n, s.dim + 1, dtype=torch.float64)
            for _ in range(NEWTON_STEPS):
                prob = torch.sigmoid((g * x[seg]).sum(1) + base)
                grad = (torch.zeros_like(x).index_add_(0, seg, g * (prob - t)[:, None])
                        + 2 * (count[:, None] * penalty) * x)
                hess = user_grams(seg, g, prob * (1 - prob), n) + 2 * ridge
                x = x - torch.linalg.solve(hess, grad)
        x = x.float()
        return Users(x[:, :-1].contiguous(), x[:, -1].contiguous())

    def evaluate(self, model, state, rows, k: int) -> dict[str, float]:
        """The vector reconstructed from all the user's training rows (implicit: with negatives drawn as in
        training, keyed apart from every training round), then MF's scoring."""
        seg, item, target = self.training_rows(rows, EVALUATION_ROUND, DeviceKeys(self.settings.seed))
        users = self.reconstruct(model, seg, item, target, len(rows.users))
        items = ItemParams(model[ITEM_EMB], model[ITEM_BIAS], model[GLOBAL_BIAS])
        return evaluate_view(items, users, rows, self.settings.implicit, k, self.rating_scale)

