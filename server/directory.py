"""Which node hosts which users, learned from the nodes themselves at the start of a run."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedrec.run import schema


class DiscoveryError(RuntimeError):
    pass


@dataclass
class NodeDirectory:
    """Which node hosts which users. Nodes are found per round: a node that stops is left out,
    one that (re)connects with the same partition is used from the next round on."""

    node_ids: np.ndarray  # per partition, sorted by first user; 0 while its node is not connected
    first_user: np.ndarray
    num_users: np.ndarray
    population: int
    num_items: int
    rating_scale: tuple[float, float]
    connected: set[int] | None = None  # node ids seen at the last refresh (None: all of node_ids)

    def _present(self) -> np.ndarray:
        ids = self.node_ids.astype(np.int64)
        if self.connected is None:
            return ids != 0
        return np.isin(self.node_ids, np.array(sorted(self.connected), dtype=np.uint64)) & (ids != 0)

    def present_ids(self) -> list[int]:
        return [int(n) for n in self.node_ids[self._present()]]

    def hosted(self, node_id: int) -> int:
        """Users hosted by this node (0 for a node not in the directory)."""
        slots = np.flatnonzero(self.node_ids == np.uint64(node_id))
        return int(self.num_users[slots[0]]) if len(slots) else 0

    def group(self, users: np.ndarray) -> tuple[dict[int, np.ndarray], int]:
        """Sampled users per connected node id, and how many sampled users sit on nodes that are not connected."""
        owner = np.searchsorted(self.first_user, users, side="right") - 1
        present = self._present()
        groups = {}
        cuts = np.flatnonzero(np.diff(owner)) + 1
        for part, part_users in zip(np.split(np.arange(len(users)), cuts), np.split(users, cuts)):
            if len(part) and present[owner[part[0]]]:
                groups[int(self.node_ids[owner[part[0]]])] = part_users
        return groups, int(len(users) - sum(len(u) for u in groups.values()))

    def refresh(self, grid: Grid, config: ConfigRecord, timeout: float = 30.0) -> list[int]:
        """Look at the connected nodes; ask new ones which users they host. Returns the node ids that joined."""
        connected = {int(n) for n in grid.get_node_ids()}
        known = {int(n) for n in self.node_ids}
        joined = []
        new = sorted(connected - known)
        if new:
            try:
                replies = _ask(grid, new, config, timeout)
            except DiscoveryError:
                replies = []  # a node that cannot describe itself is tried again next round
            for reply in replies:
                facts = reply.content[schema.METRICS]
                slots = np.flatnonzero((self.first_user == int(facts["first-user"]))
                                       & (self.num_users == int(facts["num-users"])))
                if len(slots) and int(facts["population"]) == self.population:
                    self.node_ids[slots[0]] = np.uint64(reply.metadata.src_node_id)
                    joined.append(int(reply.metadata.src_node_id))
        self.connected = connected
        return joined


def _ask(grid: Grid, node_ids: list[int], config: ConfigRecord, timeout: float) -> list[Message]:
    messages = [Message(RecordDict({schema.CONFIG: config}), dst_node_id=n, message_type=MessageType.QUERY)
                for n in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    errors = [r.error.reason for r in replies if r.has_error()]
    if errors or len(replies) != len(node_ids):
        raise DiscoveryError(f"nodes failed to describe their data: {errors[:1] or 'no reply'}")
    for reply in replies:
        _check_hello(reply.content)
    return replies


def _check_hello(content: RecordDict) -> None:
    """A description the directory can use: every key, finite whole numbers where counts are meant."""
    metrics = content.get(schema.METRICS) if schema.METRICS in content else None
    if metrics is None or any(k not in metrics for k in schema.HELLO_METRICS):
        raise DiscoveryError("a node's description lacks keys; is it running fedrec's ClientApp?")
    for key in ("first-user", "num-users", "population", "num-items"):
        value = metrics[key]
        if not isinstance(value, (int, float)) or not np.isfinite(value) or value != int(value) or value < -1:
            raise DiscoveryError(f"a node described itself with {key}={value!r}")


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
