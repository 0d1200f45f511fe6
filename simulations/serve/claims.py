"""Which visitor acts as which device: the page stands in for every phone, so a device's
panels (what it stores, recommends and sent), its controls (consent, erase, forget replay) and
their status belong to the one visitor session that claimed it, for as long as this server runs.

A visitor who does not hold a device sees only whether another visitor holds it, or a button to
claim it: nothing that depends on its state (an erased or opted-out device's page reads exactly
as any other's), so walking the pages tells nobody who opted out or was forgotten. Claims live
in this process's memory only: who claimed what is written nowhere.
"""

from __future__ import annotations

import threading
from enum import Enum


class Access(Enum):
    MINE = "mine"  # this visitor holds the device: its panels, its controls and their status
    OPEN = "open"  # no one holds it: a button to claim it
    HELD = "held"  # another visitor holds it: nothing of its state


HELD_MESSAGE = "this device is held by another visitor: only its holder sees its state or acts on it"


class Claims:
    def __init__(self):
        self._holder: dict[str, str] = {}
        self._lock = threading.Lock()

    def access(self, user: str, visitor: str) -> Access:
        with self._lock:
            holder = self._holder.get(user)
        return Access.OPEN if holder is None else Access.MINE if holder == visitor else Access.HELD

    def claim(self, user: str, visitor: str) -> bool:
        """Give the device to `visitor` unless another visitor holds it (True: the visitor holds it now)."""
        with self._lock:
            return self._holder.setdefault(user, visitor) == visitor
