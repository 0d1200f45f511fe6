"""`fedrec forget` started from the page: a child process, one at a time, watched by a thread.

The replay re-runs federation rounds (the simulation engine, seconds to minutes), so the page
does not wait for it: it starts the command the page shows, in its own process group, and
shows its last line when it ends. Statuses live in this server's memory only: which users
were forgotten is private, so it is written nowhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .device import BadInput


def fedrec_command() -> list[str]:
    """The `fedrec` script beside this interpreter (what the page tells people to type)."""
    script = Path(sys.executable).with_name("fedrec")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from fedrec.cli.main import main; main()"]


@dataclass
class Job:
    user: str
    process: subprocess.Popen
    started: float
    code: int | None = None
    last_line: str = ""

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


class Replays:
    def __init__(self, run: Path, on_success: Callable[[], None], command: list[str] | None = None):
        self.run, self.on_success = run, on_success
        self.command = command or fedrec_command()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, user: str) -> None:
        with self._lock:
            if any(job.code is None for job in self._jobs.values()):
                raise BadInput("another replay is running; wait for it to finish, then forget this user")
            process = subprocess.Popen([*self.command, "forget", "--run", str(self.run), "--user", user],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       text=True, start_new_session=True,  # its engine's workers: one group
                                       env={**os.environ, "COLUMNS": "10000"})  # its report on one line
            job = self._jobs[user] = Job(user, process, time.monotonic())
        threading.Thread(target=self._watch, args=(job,), daemon=True).start()

    def _watch(self, job: Job) -> None:
        output, _ = job.process.communicate()
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        job.last_line = lines[-1] if lines else ""
        if job.process.returncode == 0:
            self.on_success()  # the replay rewrote model.npz and metrics.csv
        job.code = job.process.returncode

    def status(self, user: str) -> Job | None:
        with self._lock:
            return self._jobs.get(user)

    def stop(self, wait: float = 10.0) -> None:
        """Interrupt running replays (Ctrl-C to their process group: `fedrec forget` again finishes one)."""
        running = [job for job in self._jobs.values() if job.process.poll() is None]
        for job in running:
            os.killpg(job.process.pid, signal.SIGINT)
        for job in running:
            try:
                job.process.wait(wait)
            except subprocess.TimeoutExpired:
                os.killpg(job.process.pid, signal.SIGKILL)
