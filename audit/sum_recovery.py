"""Sparse recovery from one round's SecAgg+ sum: what the server reads when it can regenerate
the devices' starting vectors.

In the first MF round each sampled user u changes the row of every item i it rated by
s_u (-2 lr reg_item q_i - 2 lr e_ui p_u) and the item's bias by s_u (-2 lr e_ui), where
e_ui = mu + b_i + p_u . q_i - r_ui and s_u <= 1 is the user's clipping scale. So the sum
over users of item i's row is a q_i + sum_u c_ui p_u with c_ui = -2 lr s_u e_ui, and the
bias sum is sum_u c_ui. The server sent q_i; if it also knows every sampled user's p_u
(a starting vector derived from the run seed), each item's row of the unmasked sum is a
sparse combination of K + 1 known vectors in K + 1 equations: orthogonal matching pursuit
finds which users rated the item, and their coefficients give the ratings. Starting
vectors drawn from OS entropy on the device leave the server a dictionary of wrong vectors,
and the same pursuit finds next to nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedrec.client.app import app as client_app
from fedrec.models.factors import GLOBAL_BIAS, ITEM_BIAS, ITEM_EMB
from fedrec.run import schema
from fedrec.run.build import ensure_shards, hyper, load_data, make_algorithm, num_nodes
from fedrec.run.config import RunConfig
from fedrec.run.device_config import DeviceConfig, round_config
from fedrec.server.directory import discover
from fedrec.server.federation import array_record
from fedrec.server.runner import coordinates
from fedrec.server.sampling import sample_users, sampling_rng
from fedrec.server.secagg import SecureGrid, secagg_setup
from fedrec.simulations.inprocess import InProcessGrid

MAX_RATERS = 12  # atoms the pursuit may use per item (an item's raters among ~100 sampled users)
FIT = 2e-2  # relative residual below which a support counts as recovered: SecAgg+'s rounding is ~1e-3 of a
# rated row; K + 1 random directions leave ~0.8 of a row unexplained by 12 atoms


@dataclass
class SecureRound:
    """What the server holds after one SecAgg+ round, and the truth to score an attack against."""

    sums: dict[str, np.ndarray]  # the unmasked sum (MF's statistics: item rows, item biases, global bias)
    shared: dict[str, np.ndarray]  # what it sent
    users: np.ndarray  # who it sampled (global ids)
    population: int
    rated: set[tuple[int, int]]  # (user, item) pairs of the sampled users' training ratings


def secure_first_round(cfg: RunConfig) -> SecureRound:
    """Round 1 of `cfg` (SecAgg+, MF) through the real ClientApp and Flower's SecAgg+ in process."""
    cfg = cfg.resolved().validate()
    split = load_data(cfg)
    nodes = num_nodes(cfg, split.n_users)
    ensure_shards(cfg, nodes)
    grid = InProcessGrid(client_app, nodes, data_dir=cfg.data_dir)
    directory = discover(grid, ConfigRecord(DeviceConfig.of(cfg).record()))
    users = sample_users(directory.population, cfg.users_per_round, cfg.sampling, sampling_rng(cfg, 1))
    groups, _ = directory.group(users)
    algorithm = make_algorithm(cfg, directory.num_items, directory.rating_scale)
    shared = algorithm.init_server(cfg.strategy, cfg.server_lr).broadcast()
    messages = []
    for node, node_users in groups.items():
        config = ConfigRecord(round_config(cfg, 1, node_users))
        messages.append(Message(RecordDict({schema.ARRAYS: array_record(shared), schema.CONFIG: config}),
                                dst_node_id=node, message_type=MessageType.TRAIN))
    setup = secagg_setup(cfg, len(directory.node_ids), int(directory.num_users.max()),
                         coordinates(algorithm, directory.num_items), 0.0, cfg.users_per_round or directory.population,
                         directory.population)
    reply = SecureGrid(grid, cfg, setup, algorithm.statistics()).send_and_receive(messages)[0]
    record = reply.content[schema.ARRAYS]
    sums = {k: record[k].numpy().astype(np.float64) for k in record.keys()}
    picked = np.isin(split.train.user, users)
    rated = set(zip(split.train.user[picked].tolist(), split.train.item[picked].tolist()))
    return SecureRound(sums, shared, users, directory.population, rated)


def recover_pairs(observed: SecureRound, cfg: RunConfig) -> set[tuple[int, int]]:
    """The (user, item) pairs the server claims from the sum, given the starting vectors it
    believes the sampled users had: the seeded population matrix every plain run starts from."""
    cfg = cfg.resolved()
    h = hyper(cfg)
    algorithm = make_algorithm(cfg, len(observed.shared[ITEM_EMB]), (1.0, 5.0))
    guess = algorithm.new_users(observed.users, observed.population, None)["emb"].double().numpy()  # [sampled, K]
    q = observed.shared[ITEM_EMB].astype(np.float64)
    # Flower's dequantization leaves one constant offset on every coordinate: the value shared by the
    # rows no sampled user rated (exactly equal), removed before the pursuit
    sums = {k: v - _mode(v) for k, v in observed.sums.items() if k != GLOBAL_BIAS}
    sums[ITEM_BIAS] = sums[ITEM_BIAS].reshape(-1)
    found = set()
    for item in np.flatnonzero(np.abs(sums[ITEM_BIAS]) > 0):
        # rows: the K embedding coordinates, then the bias; atoms: q_i (reg term), then each user
        atoms = np.zeros((h.dim + 1, len(observed.users) + 1))
        atoms[:h.dim, 0] = q[item]
        atoms[:h.dim, 1:] = guess.T
        atoms[h.dim, 1:] = 1.0
        target = np.append(sums[ITEM_EMB][item], sums[ITEM_BIAS][item])
        support = _pursuit(atoms, target)
        found.update((int(observed.users[a - 1]), int(item)) for a in support if a > 0)
    return found


def _mode(values: np.ndarray) -> float:
    found, counts = np.unique(values, return_counts=True)
    return float(found[np.argmax(counts)])


def _pursuit(atoms: np.ndarray, target: np.ndarray) -> list[int]:
    """Orthogonal matching pursuit: the fewest atoms (at most MAX_RATERS) that fit `target` to
    FIT; none where no such support exists (the item is left unclaimed)."""
    norms = np.linalg.norm(atoms, axis=0) + 1e-300
    support: list[int] = [0]  # the reg term rides along with every rated item
    scale = np.linalg.norm(target) + 1e-300
    for _ in range(MAX_RATERS):
        coef, *_ = np.linalg.lstsq(atoms[:, support], target, rcond=None)
        residual = target - atoms[:, support] @ coef
        if np.linalg.norm(residual) <= FIT * scale:
            return support
        scores = np.abs(atoms.T @ residual) / norms
        scores[support] = -1
        support.append(int(np.argmax(scores)))
    return []


def attack_precision(observed: SecureRound, cfg: RunConfig) -> tuple[float, int]:
    """Share of claimed pairs that are true ratings (0 when nothing is claimed), and how many were claimed."""
    claimed = recover_pairs(observed, cfg)
    if not claimed:
        return 0.0, 0
    return len(claimed & observed.rated) / len(claimed), len(claimed)


def secagg_only(cfg: RunConfig, **changes) -> RunConfig:
    """`cfg` as a SecAgg+ run without DP: what the attack targets."""
    return dataclasses.replace(cfg, secure_aggregation="secagg+", dp="none", update_mode="dense", model="mf",
                               **changes)


# ---------------------------------------------------------------- sufficient statistics: a differencing attack
def differencing_precision(cfg: RunConfig, targets: list[int], nodes: int = 3) -> tuple[float, int]:
    """The strongest server against an algorithm of summed statistics (dpstats): it knows every other user's
    ratings, so from the first round's SecAgg+ sum it subtracts their statistics (computed exactly, as their
    devices would) and reads the rest as the target's. It claims the items with the largest remainder in the
    first per-item statistic, as many as the target rated (which it is even told). Returns the share of all
    claims, over `targets`, that are the target's rated items, and the number of claims. `cfg` runs for real,
    in process, once."""
    import tempfile

    import torch

    from fedrec.datasets import cohort
    from fedrec.models.registry import algorithm_class, substituted
    from fedrec.privacy.device import device_step, new_users
    from fedrec.privacy.policy import DevicePolicy
    from fedrec.server.runner import run_server

    cfg = cfg.resolved().validate()
    imitated, first = algorithm_class(cfg.model), []

    class Recording(imitated):
        def server_step(self, state, sums, weight, round_, noise_std=0.0):
            if round_ == 1:
                first.append({k: v.double().numpy().copy() for k, v in sums.items()})
            super().server_step(state, sums, weight, round_, noise_std=noise_std)

    with tempfile.TemporaryDirectory() as tmp, substituted(cfg.model, Recording):
        run_server(InProcessGrid(client_app, nodes), dataclasses.replace(cfg, out=f"{tmp}/run"))
    split = load_data(cfg)
    algorithm = make_algorithm(cfg, split.n_items, split.rating_scale)
    policy = DevicePolicy(clipping_norm=cfg.clipping_norm)
    shared = algorithm.init_server(cfg.strategy, cfg.server_lr).broadcast()
    name = next(n for n, s in algorithm.statistics().items() if s.per_item)

    def first_round(users: np.ndarray) -> np.ndarray:
        state = new_users(algorithm, users, split.n_users, policy)
        sums = device_step(algorithm, shared, state, cohort(split, users), 1, policy, cfg.seed).sums.arrays
        return torch.as_tensor(sums[name]).double().numpy()[:, 0]

    everyone = first_round(np.arange(split.n_users))
    hits = claims = 0
    for target in targets:
        remainder = first[0][name][:, 0] - (everyone - first_round(np.array([target])))
        rated = set(split.train.item[split.train.user == target].tolist())
        claimed = set(np.argsort(-remainder)[:len(rated)].tolist())
        hits, claims = hits + len(claimed & rated), claims + len(claimed)
    return hits / max(claims, 1), claims
