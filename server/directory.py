"""Which node hosts which users, learned from the nodes themselves at the start of a run."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedrec.common import schema


class DiscoveryError(RuntimeError):
    pass


@dataclass(frozen=True)
class NodeDirectory:
    node_ids: np.ndarray  # sorted by first user
    first_user: np.ndarray
    num_users: np.ndarray
    population: int
    num_items: int
    rating_scale: tuple[float, float]

    def group(self, users: np.ndarray) -> dict[int, np.ndarray]:
        """Sampled users per node id (nodes without sampled users are left out)."""
        owner = np.searchsorted(self.first_user, users, side="right") - 1
        cuts = np.flatnonzero(np.diff(owner)) + 1
        return {int(self.node_ids[owner[part[0]]]): part_users
                for part, part_users in zip(np.split(np.arange(len(users)), cuts), np.split(users, cuts)) if len(part)}


def _ask(grid: Grid, node_ids: list[int], config: ConfigRecord, timeout: float) -> list[Message]:
    messages = [Message(RecordDict({schema.CONFIG: config}), dst_node_id=n, message_type=MessageType.QUERY)
                for n in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    errors = [r.error.reason for r in replies if r.has_error()]
    if errors or len(replies) != len(node_ids):
        raise DiscoveryError(f"nodes failed to describe their data: {errors[:1] or 'no reply'}")
    return replies


def discover(grid: Grid, config: ConfigRecord, timeout: float = 300.0) -> NodeDirectory:
    """Wait for every node of the federation, then ask each which users it hosts."""
    deadline = time.monotonic() + timeout
    node_ids: list[int] = []
    while not node_ids:
        node_ids = sorted(grid.get_node_ids())
        if time.monotonic() > deadline:
            raise DiscoveryError("no SuperNode connected; start the nodes, then the run")
        time.sleep(0.1) if not node_ids else None
    expected = int(_ask(grid, node_ids[:1], config, timeout)[0].content[schema.METRICS]["num-partitions"])
    while len(node_ids) < expected:
        if time.monotonic() > deadline:
            raise DiscoveryError(f"only {len(node_ids)} of {expected} SuperNodes connected")
        time.sleep(0.1)
        node_ids = sorted(grid.get_node_ids())
    facts = [(r.metadata.src_node_id, r.content[schema.METRICS]) for r in _ask(grid, node_ids, config, timeout)]
    facts = sorted((f for f in facts if f[1]["num-users"] > 0), key=lambda f: f[1]["first-user"])
    hosted = sum(int(m["num-users"]) for _, m in facts)
    population = int(facts[0][1]["population"])
    if hosted != population:
        raise DiscoveryError(f"nodes host {hosted} users but the data set has {population}; "
                             "check partition-id/num-partitions of each SuperNode")
    return NodeDirectory(
        node_ids=np.array([n for n, _ in facts], dtype=np.uint64),
        first_user=np.array([int(m["first-user"]) for _, m in facts]),
        num_users=np.array([int(m["num-users"]) for _, m in facts]),
        population=population, num_items=int(facts[0][1]["num-items"]),
        rating_scale=(float(facts[0][1]["rating-min"]), float(facts[0][1]["rating-max"])),
    )
