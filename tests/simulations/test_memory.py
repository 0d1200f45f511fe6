"""The process-tree memory probe used by `fedrec bench`."""

from __future__ import annotations

import os
import subprocess
import sys

from fedrec.experiments.memory import PeakRSS, tree_rss_bytes


def test_tree_rss_includes_children():
    alone = tree_rss_bytes(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(200 * 2**20); time.sleep(3)"])
    try:
        with PeakRSS(interval=0.05) as peak:
            import time

            time.sleep(1.0)
        assert peak.peak > alone + 150 * 2**20  # the child's 200 MB buffer is counted
    finally:
        child.kill()
        child.wait()
