"""Which visitor acts as which device: the page stands in for every phone, so a device's
controls (consent, erase, forget replay) and its private status (opted out, erased, replay)
belong to the one visitor session that claimed it, for as long as this server runs.

Claims live in this process's memory only (who claimed what is written nowhere). A device a
visitor does not hold shows its population panels only while it is unclaimed and unchanged;
a device held by another visitor, or opted out or erased before anyone here claimed it (an
earlier session, the CLI), shows nothing of its state and cannot be claimed: to others the two
look the same, so the page never tells who opted out or was forgotten.
"""

from __future__ import annotations

import threading
from enum import Enum


class Access(Enum):
    MINE = "mine"  # this visitor holds the device: everything, with its controls
    OPEN = "open"  # unclaimed and unchanged: the population panels and a claim button
    CLOSED = "closed"  # held by another visitor, or withdrawn by its owner: nothing of its state


CLOSED_MESSAGE = ("this device is held by another visitor (or was changed by its owner outside this page): "
                  "nothing of its state is shown, and only its holder can act on it")


class Claims:
    def __init__(self):
        self._holder: dict[str, str] = {}
        self._lock = threading.Lock()

    def access(self, user: str, visitor: str, withdrawn) -> Access:
        """`withdrawn()` says whether the device was opted out or erased (read only when it matters)."""
        with self._lock:
            holder = self._holder.get(user)
        if holder is not None:
            return Access.MINE if holder == visitor else Access.CLOSED
        return Access.CLOSED if withdrawn() else Access.OPEN

    def claim(self, user: str, visitor: str, withdrawn) -> bool:
        """Give an unclaimed, unchanged device to `visitor` (True), or say it cannot be (False)."""
        if withdrawn():
            return self.holds(user, visitor)
        with self._lock:
            return self._holder.setdefault(user, visitor) == visitor

    def holds(self, user: str, visitor: str) -> bool:
        with self._lock:
            return self._holder.get(user) == visitor
