"""Which visitor acts as which device. The demo server stands in for every device of the run:
whoever claims a device no visitor holds sees its state (what it stores, recommends and sent,
including whether it opted out or was erased) and uses its controls (consent, erase, forget
replay). A visitor holds at most one device at a time: claiming another releases the previous
one, which the next visitor to claim it then sees in full. While a visitor holds a device, other
visitors see only that it is held, nothing of its state.

Only a visitor who opened the printed URL with its access token is a visitor at all (access.py);
reaching the server without it shows nothing. But every token holder is a visitor: the page is a
presenter's demo on loopback, not a multi-tenant service, and it keeps no device private from
whoever holds the token, only each held device from the other visitors. One token holder's
script gets sessions, and so devices, at a rationed pace (access.py), not all at once. Claims
live in this process's memory only and end with the server; who claimed what is written nowhere.
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
        self._holder: dict[str, str] = {}  # device -> visitor
        self._held: dict[str, str] = {}  # visitor -> device (one each)
        self._lock = threading.Lock()

    def access(self, user: str, visitor: str) -> Access:
        with self._lock:
            holder = self._holder.get(user)
        return Access.OPEN if holder is None else Access.MINE if holder == visitor else Access.HELD

    def claim(self, user: str, visitor: str) -> bool:
        """Give the device to `visitor` unless another visitor holds it, releasing the one the visitor held
        before (True: the visitor holds `user` now; False: nothing changed)."""
        with self._lock:
            if self._holder.setdefault(user, visitor) != visitor:
                return False
            previous = self._held.get(visitor)
            if previous is not None and previous != user:
                del self._holder[previous]
            self._held[visitor] = user
            return True
