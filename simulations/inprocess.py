"""A Grid that calls the ClientApp in this process: no Ray, no ports, no polling.

For unit tests and quick checks of the exact code paths the real engines run. It follows
the recipe in Flower's own strategy tests; TaskIdentity is an internal Flower API that
the Message constructor reads outside a runtime.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1, partitions: list[int] | None = None,
                 data_dir: str = ""):
        """`num_nodes` nodes hosting partitions 0..num_nodes-1, or only `partitions` of them;
        `data_dir`: where the nodes read their data (their node config, as in deployment)."""
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1
        self.client_app = client_app
        where = {"data-dir": str(Path(data_dir).resolve())} if data_dir else {}
        self.contexts = {
            1000 + i: Context(run_id=run_id, node_id=1000 + i,
                              node_config={"partition-id": i, "num-partitions": num_nodes, **where},
                              state=RecordDict(), run_config={})
            for i in (range(num_nodes) if partitions is None else partitions)
        }
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._ids = itertools.count()

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            self.sent.append(message)
            # A node gets its own copy, as over a network: Flower's SecAgg+ sends one content
            # object to every node and its client mod edits what it receives.
            delivered = copy.deepcopy(message)
            try:
                reply = self.client_app(delivered, self.contexts[message.metadata.dst_node_id])
            except Exception as error:  # as the engines do: the failure becomes an error reply
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(error)),
                                reply_to=delivered)
            replies.append(reply)
        self.replies.extend(replies)
        return replies

    # The rest of the Grid interface is not used by strategies.start().
    def set_run(self, run) -> None:  # noqa: D102
        pass

    @property
    def run(self):  # noqa: D102
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # noqa: D102
        raise NotImplementedError

    def push_messages(self, messages):  # noqa: D102
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: D102
        raise NotImplementedError
