"""What an honest-but-curious server holds of one device's upload under SecAgg+, measured
by running Flower's protocol in process on the audit's target users (one user per node)
and keeping every masked vector the server receives."""

from __future__ import annotations

import dataclasses

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedrec.client.app import app as client_app
from fedrec.models.algorithm import Algorithm
from fedrec.privacy.secagg import secure_order
from fedrec.run import schema
from fedrec.run.config import RunConfig
from fedrec.run.device_config import round_config
from fedrec.server.federation import array_record
from fedrec.server.runner import coordinates
from fedrec.server.secagg import SecureGrid, secagg_setup
from fedrec.simulations.inprocess import InProcessGrid

FIRST_NODE = 1000  # InProcessGrid's node id of partition 0


class _MaskRecorder(InProcessGrid):
    """Delivers like InProcessGrid and keeps each node's masked vector as the server gets it."""

    def __init__(self, population: int, users: list[int], data_dir: str):
        super().__init__(client_app, population, partitions=users, data_dir=data_dir)
        self.masked: dict[int, list[np.ndarray]] = {}

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in filter(Message.has_content, replies):  # a failed device's error reply holds no vector
            record = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if record is not None and Key.MASKED_PARAMETERS in record:
                self.masked[reply.metadata.src_node_id] = [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]
        return replies


def masked_views(cfg: RunConfig, algorithm: Algorithm, model: dict[str, np.ndarray], users: np.ndarray,
                 population: int, round_: int, group: int = 10) -> dict[int, dict[str, np.ndarray]]:
    """For each user, its masked vector read the only way the server can: as quantized values, by the name of
    `algorithm`'s statistics (each device masks its dense upload; `model`: the shared arrays it is sent)."""
    secure_cfg = dataclasses.replace(cfg, secure_aggregation="secagg+", dp="none", update_mode="dense",
                                     clipping_norm=cfg.clipping_norm or 1.0)
    statistics = algorithm.statistics()
    coords = coordinates(algorithm, algorithm.n_items)
    views = {}
    for start in range(0, len(users), group):
        chunk = [int(u) for u in users[start:start + group]]
        if len(chunk) < 3:  # SecAgg+ needs a few participants: borrow the previous users
            chunk = [int(u) for u in users[max(0, start - 3):start]] + chunk
        grid = _MaskRecorder(population, chunk, cfg.data_dir)
        setup = secagg_setup(secure_cfg, len(chunk), 1, coords, 0.0, len(chunk), len(chunk))
        messages = []
        for user in chunk:
            config = ConfigRecord(round_config(secure_cfg, round_, [user]))
            messages.append(Message(RecordDict({schema.ARRAYS: array_record(model), schema.CONFIG: config}),
                                    dst_node_id=FIRST_NODE + user, message_type=MessageType.TRAIN))
        SecureGrid(grid, secure_cfg, setup, statistics).send_and_receive(messages)
        for node, vector in grid.masked.items():
            values = [v.astype(np.float64) * setup.step - setup.clip_range for v in vector[1:]]  # [0]: the weight
            views[node - FIRST_NODE] = dict(zip(secure_order(statistics), values))
    return views
