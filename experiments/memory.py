"""Peak resident memory of a whole process tree (this process, Ray's daemons and workers),
sampled from /proc in a background thread (Linux), with what each kind of process held at the peak."""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

# (what a process's command line holds, the kind it is counted as): first match wins. Ray names its
# actors and agents "ray::<class>" in their command lines; its idle pooled workers run default_worker.py.
KINDS = (
    ("raylet/raylet", "Ray daemons"),  # before default_worker.py, which its arguments name
    ("ClientAppActor", "ClientApp actors"),
    ("default_worker.py", "Ray idle workers"),
    ("flwr-simulation", "flwr-simulation (ServerApp, Ray driver)"),
    ("flower-superlink", "Flower SuperLink and SuperExec"),
    ("flower-superexec", "Flower SuperLink and SuperExec"),
    ("/bin/flwr", "flwr CLI"),
    ("ray", "Ray daemons"),
)
DRIVER = "driver (this process)"
OTHER = "other"


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0  # a zombie has no VmRSS


def kind(pid: int, root: int) -> str:
    if pid == root:
        return DRIVER
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return OTHER
    return next((name for needle, name in KINDS if needle in command), OTHER)


def tree_rss(root: int) -> dict[int, int]:
    """pid -> RSS in bytes of `root` and every process below it."""
    tree, found, todo = _children(), {}, [root]
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            found[pid] = _rss(pid)
        except OSError:
            pass
    return found


def tree_rss_bytes(root: int) -> int:
    return sum(tree_rss(root).values())


class PeakRSS:
    """`with PeakRSS() as peak: ...` then `peak.mb`, and `peak.breakdown_mb()`: MB and process count
    per kind of process (KINDS) at the peak. Sums RSS, so pages shared between processes (torch
    libraries, Ray's object store) count once per process: an upper bound."""

    def __init__(self, interval: float = 0.2, root: int | None = None):
        self.interval, self.root, self.peak = interval, root or os.getpid(), 0
        self.at_peak: dict[int, int] = {}
        self._kinds: dict[int, str] = {}  # as last seen: a pooled Ray worker renames itself when it becomes an actor
        self._stop = threading.Event()

    def _sample(self) -> None:
        sizes = tree_rss(self.root)
        for pid in sizes:
            found = kind(pid, self.root)
            if found != OTHER or pid not in self._kinds:  # a zombie's empty command line says nothing
                self._kinds[pid] = found
        total = sum(sizes.values())
        if total > self.peak:
            self.peak, self.at_peak = total, sizes

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def mb(self) -> float:
        return self.peak / 2**20

    def breakdown_mb(self) -> dict[str, dict[str, float]]:
        """{kind: {"mb": its summed RSS, "processes": how many}} at the peak, largest first."""
        mb, count = Counter(), Counter()
        for pid, size in self.at_peak.items():
            name = self._kinds.get(pid, OTHER)
            mb[name] += size / 2**20
            count[name] += 1
        return {name: {"mb": round(value, 1), "processes": count[name]} for name, value in mb.most_common()}
