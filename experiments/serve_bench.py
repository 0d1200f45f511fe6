"""How fast the demo page is: `fedrec serve` start to first page, and a cold-start device's
fit + top-10, in process and through the page's own form (POST /new).

Start-up is timed on the real command in a fresh process (interpreter start, imports,
loading the run and its data, the web server's start), from spawning it until GET / answers
200, and until a device page does too, each through the printed URL's token login as a
browser opens it (one redirect). The fit is timed on the run's algorithm (fit_user + top_n),
the code the page runs for a new device, against the run's saved model.
"""

from __future__ import annotations

import http.cookiejar
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from fedrec.personal.model import run_model
from fedrec.run.build import load_data
from fedrec.run.config import RunConfig
from fedrec.run.finished import locate
from fedrec.run.rundir import write_json

FIRST_PAGE_TARGET = 5.0  # seconds, issue 11
PRINTED_URL = re.compile(r"http://\S+/\?token=([\w-]+)")  # fedrec serve's first line
FIT_TARGET = 0.5


def stats(seconds: list[float]) -> dict:
    values = np.asarray(seconds, dtype=np.float64)
    return {"n": len(values), "median": float(np.median(values)), "p95": float(np.percentile(values, 95)),
            "max": float(values.max())}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fedrec_command() -> list[str]:
    """The installed `fedrec` script beside this interpreter: what a user types."""
    script = Path(sys.executable).with_name("fedrec")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from fedrec.cli.main import main; main()"]


def _get(opener, url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with opener.open(url, timeout=timeout) as reply:
            return reply.status, reply.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


class Server:
    """`fedrec serve --run R` on a free loopback port, in its own session, stopped by its PID (R relative to
    `cwd` when given: the page then shows the short path a user would have typed). Its output is read
    through a pipe into memory, never a file: its first line carries the access token (`login_url`)."""

    def __init__(self, run: Path, timeout: float = 60.0, cwd: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token: str | None = None
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self._lines: list[str] = []
        self.started = time.perf_counter()
        self.process = subprocess.Popen([*fedrec_command(), "serve", "--run", str(run), "--host", "127.0.0.1",
                                         "--port", str(self.port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd, text=True,
                                        errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)  # a full pipe would block the server
        self._reader.start()
        self.timeout = timeout

    def _read(self) -> None:
        for line in self.process.stdout:
            printed = PRINTED_URL.search(line) if self.token is None else None
            if printed:
                self.token = printed.group(1)
            self._lines.append(line)

    def login_url(self, path: str = "/") -> str:
        """`path` with the access token, as the printed URL carries it: the server redirects to `path`."""
        return f"{self.url}{path}{'&' if '?' in path else '?'}{urllib.parse.urlencode({'token': self.token})}"

    def wait_for(self, path: str, opener=None) -> float:
        """Seconds from the spawn until GET path answers 200 (polled every 10 ms), through the printed URL's
        login with `opener` (which must keep cookies; default: this server's own)."""
        opener = opener or self.opener
        deadline = self.started + self.timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fedrec serve exited with {self.process.returncode}: {self.output()[-600:]}")
            if self.token is not None:
                try:
                    status, _ = _get(opener, self.login_url(path), timeout=2.0)
                    if status == 200:
                        return time.perf_counter() - self.started
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
            time.sleep(0.01)
        raise RuntimeError(f"fedrec serve did not answer 200 on {path} within {self.timeout:.0f} s: "
                           f"{self.output()[-600:]}")

    def output(self) -> str:
        """What the server printed, its token masked (this text goes into test reports and errors)."""
        text = "".join(self._lines)
        return text.replace(self.token, "<token>") if self.token else text

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the server and nothing else
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._reader.join(5)
        self.process.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class ColdStartForm(HTMLParser):
    """The fields of the page's `#cold-start-form`: rating selects and hidden inputs, as a browser sends them."""

    def __init__(self):
        super().__init__()
        self.inside, self.ratings, self.hidden, self.action = False, [], {}, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and a.get("id") == "cold-start-form":
            self.inside, self.action = True, a.get("action")
        elif self.inside and tag == "select" and (a.get("name") or "").startswith("rating-"):
            self.ratings.append(a["name"])
        elif self.inside and tag == "input" and a.get("type") == "hidden" and a.get("name"):
            self.hidden[a["name"]] = a.get("value") or ""

    def handle_endtag(self, tag):
        if tag == "form":
            self.inside = False


def start_up(run: Path, user: str, repeats: int, log=print) -> dict:
    first, device = [], []
    for i in range(repeats):
        with Server(run) as server:
            first.append(server.wait_for("/"))
            device.append(server.wait_for(f"/device/{urllib.parse.quote(user)}"))
        log(f"start {i + 1}/{repeats}: first page {first[-1]:.2f} s, device page {device[-1]:.2f} s")
    return {"first_page_seconds": stats(first), "device_page_seconds": stats(device), "user": user,
            "samples_first_page": first, "samples_device_page": device}


def fit_in_process(run: Path, cfg: RunConfig, counts: list[int], repeats: int, seed: int = 0) -> dict:
    """fit_user + top_n(10) for a new device with `k` random ratings of random items, `repeats` times per k."""
    split = load_data(cfg)
    algorithm, model = run_model(run, cfg, split)
    rng = np.random.default_rng(seed)
    low, high = split.rating_scale
    algorithm.fit_user(model, np.arange(5), np.full(5, high))  # first call pays torch's lazy initialisation
    per_count, every = {}, []
    for k in counts:
        seconds = []
        for _ in range(repeats):
            rated = rng.choice(split.n_items, size=k, replace=False)
            ratings = rng.integers(int(low), int(high) + 1, size=k).astype(np.float64)
            start = time.perf_counter()
            best, _ = algorithm.top_n(model, algorithm.fit_user(model, rated, ratings), rated, 10)
            seconds.append(time.perf_counter() - start)
            if len(best) != 10 or set(best) & set(rated):
                raise RuntimeError(f"top_n gave {len(best)} items or a rated one for {k} ratings")
        per_count[str(k)] = stats(seconds)
        every += seconds
    return {"all": stats(every), "by_ratings": per_count, "items": int(split.n_items),
            "dim": int(algorithm.settings.dim)}


def _post(opener, target: str, fields: dict, k: int) -> tuple[float, float | None]:
    """(seconds until the answer, the fit seconds the page shows) of one cold-start form post."""
    start = time.perf_counter()
    with opener.open(target, urllib.parse.urlencode(fields).encode(), timeout=30) as reply:
        body = reply.read().decode("utf-8", "replace")
    seconds = time.perf_counter() - start
    recs = len(re.findall(r"<li[^>]*class=\"[^\"]*\brec\b", body))
    if recs != 10:
        raise RuntimeError(f"POST /new with {k} ratings showed {recs} recommendations, not 10")
    shown = re.search(r"id=\"fit-seconds\"[^>]*>\s*([0-9.]+)", body)
    return seconds, float(shown.group(1)) if shown else None


def fit_over_http(run: Path, user: str, counts: list[int], repeats: int, top: int = 5, seed: int = 0,
                  log=print) -> dict:
    """POST /new as the page's form does (k random ratings, no opt-in); seconds until the answer with 10
    recommendations. The first post right after start-up is reported apart: it shares the process with the
    device pages' imports, which the server runs in the background; the others come after a device page."""
    rng = np.random.default_rng(seed)
    per_count, every, server_side = {}, [], []
    with Server(run) as server:
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        server.wait_for("/", opener)
        status, page = _get(opener, server.url + "/new")
        form = ColdStartForm()
        form.feed(page)
        if status != 200 or len(form.ratings) < min(counts):
            raise RuntimeError(f"GET /new answered {status} without a #cold-start-form of rating selects")
        target = urllib.parse.urljoin(server.url + "/new", form.action or "/new")

        def fields(k: int) -> dict:
            rated = rng.choice(form.ratings, k, replace=False)
            return {**form.hidden, **{name: str(int(rng.integers(1, top + 1))) for name in rated}}

        first = _post(opener, target, fields(min(counts)), min(counts))[0]
        server.wait_for(f"/device/{urllib.parse.quote(user)}", opener)
        for k in [c for c in counts if c <= len(form.ratings)]:
            seconds = []
            for _ in range(repeats):
                took, shown = _post(opener, target, fields(k), k)
                seconds.append(took)
                server_side += [shown] if shown is not None else []
            per_count[str(k)] = stats(seconds)
            every += seconds
            log(f"POST /new, {k} ratings: median {per_count[str(k)]['median'] * 1000:.0f} ms")
    report = {"all": stats(every), "by_ratings": per_count, "movies_offered": len(form.ratings),
              "first_post_after_start_seconds": first}
    if server_side:
        report["fit_seconds_shown"] = stats(server_side)
    return report


def model_dir(run: Path) -> Path:
    """Where the served model is: the run itself, or a `fedrec compare` directory's federated/ run
    (what `fedrec serve` shows for it)."""
    return locate(run).run


def run_serve_bench(run: Path, out: Path, starts: int = 5, repeats: int = 200, http_repeats: int = 30,
                    counts: tuple[int, ...] = (5, 10, 15, 20), log=print) -> dict:
    run, model = Path(run), model_dir(run)
    cfg = RunConfig.from_toml(model / "config.toml")
    split = load_data(cfg)
    user = str(split.user_ids[0]) if split.user_ids is not None else "0"
    report = {"run": str(run.resolve()), "dataset": cfg.dataset, "targets": {"first_page_seconds": FIRST_PAGE_TARGET,
                                                                             "fit_top10_seconds": FIT_TARGET}}
    report["start_up"] = start_up(run, user, starts, log)
    report["fit_top10_in_process"] = fit_in_process(model, cfg, list(counts), repeats)
    log(f"fit + top-10 in process: median {report['fit_top10_in_process']['all']['median'] * 1000:.1f} ms")
    report["fit_top10_http"] = fit_over_http(run, user, list(counts), http_repeats, int(split.rating_scale[1]), log=log)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "serve_bench.json", report)
    report["out"] = str(out)
    return report
