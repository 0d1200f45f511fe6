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


def test_the_peak_is_broken_down_by_kind_of_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(200 * 2**20); time.sleep(3)",
                              "ray::ClientAppActor"])  # named like a ClientApp actor by its command line
    try:
        import time

        time.sleep(0.5)
        with PeakRSS(interval=0.05) as peak:
            time.sleep(0.5)
        parts = peak.breakdown_mb()
        assert parts["ClientApp actors"]["processes"] == 1 and parts["ClientApp actors"]["mb"] > 150
        assert parts["driver (this process)"]["processes"] == 1
        assert abs(sum(p["mb"] for p in parts.values()) - peak.mb) < 1
    finally:
        child.kill()
        child.wait()
