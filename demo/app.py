"""The Flask app: server-rendered pages and plain HTML forms (they work with JavaScript off).

Only a visitor who opened the URL with the access token gets in (access.py): the server then
issues them a random id in a signed, HttpOnly, SameSite=Lax session cookie. A visitor's
cold-start device is kept server-side under that id, so concurrent visitors never see each
other's. Every POST form carries a token derived from the server-issued id with a per-process
secret: a page on another site, or on another port of this host, cannot post to this one on the
visitor's behalf. A device's controls and private status belong to the visitor who holds it,
one device per visitor (claims.py).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict

from flask import Flask, Response, abort, g, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException

from fedrec.datasets import DataError
from fedrec.run.config import ConfigError

from .access import Allowance, Gate, cookie_name, visitor
from .claims import HELD_MESSAGE, Access, Claims
from .demo import Demo, UnknownUser
from .device import (
    MIN_RATINGS,
    TOP,
    BadInput,
    also_sent,
    cold_start,
    device_side,
    epsilon_caveat,
    own_ratings,
    parse_ratings,
    recommend,
    view_of,
)
from .plot import plot_png
from .replay import Replays

COLD_START_ITEMS = 15
MAX_VISITORS = 1000  # cold-start devices kept; the oldest go first
# the browser fetches nothing but this server's own files and runs no script at all
CSP = "default-src 'self'; script-src 'none'; object-src 'none'; base-uri 'none'; form-action 'self'; " \
      "frame-ancestors 'none'"


class ColdStarts:
    """Visitor id -> that visitor's cold-start device, bounded, safe across the server's threads."""

    def __init__(self, limit: int = MAX_VISITORS):
        self._devices: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self._limit = limit

    def get(self, visitor: str):
        with self._lock:
            return self._devices.get(visitor)

    def put(self, visitor: str, device) -> None:
        with self._lock:
            self._devices[visitor] = device
            self._devices.move_to_end(visitor)
            while len(self._devices) > self._limit:
                self._devices.popitem(last=False)

    def drop(self, visitor: str) -> None:
        with self._lock:
            self._devices.pop(visitor, None)


def create_app(demo: Demo, token: str, replay_command: list[str] | None = None, cookie: str = cookie_name(),
               new_sessions: Allowance | None = None) -> Flask:
    """The page for `demo`, opened with `token` (access.py); `replay_command` runs `fedrec` for the forget
    replay (default: the installed one); `cookie` names the session cookie; `new_sessions` rations logins."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024  # a rating form is a few hundred bytes
    app.secret_key = secrets.token_bytes(32)  # signs the session cookie: visitor ids only this process issued
    app.config.update(SESSION_COOKIE_NAME=cookie, SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax")
    gate = Gate(token, new_sessions)
    secret = secrets.token_bytes(32)  # derives the form tokens
    devices = ColdStarts()
    claims = Claims()
    device_lock = threading.Lock()  # consent and erasure write the device's state: one at a time
    plots: dict[str, bytes] = {}

    def replayed():  # the replay rewrote the model and the metrics: serve the new ones
        demo.reload_model()
        plots.clear()

    replays = app.extensions["fedrec-replays"] = Replays(demo.paths.run, replayed, replay_command)

    @app.before_request
    def identify_visitor():
        answer = gate.admit()  # no session and no token: one line of 403, nothing of the page
        if answer is not None:
            return answer
        g.visitor = visitor()
        g.csrf = hmac.new(secret, g.visitor.encode(), hashlib.sha256).hexdigest()
        if request.method == "POST" and not same(request.form.get("csrf", ""), g.csrf):
            abort(400, "this form is out of date or came from another page; reload the page and try again")

    @app.after_request
    def secure_headers(response: Response) -> Response:
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = CSP
        return response

    def page(template: str, status: int = 200, **context):
        return render_template(template, demo=demo, csrf=g.get("csrf", ""), **context), status

    def index_page(error: str | None = None, status: int = 200, user: str = ""):
        return page("index.html", status, error=error, user=user, examples=demo.example_users())

    @app.errorhandler(UnknownUser)
    def unknown_user(error):
        return index_page(str(error), 404, user=request.view_args.get("user", "") if request.view_args else "")

    @app.errorhandler(ConfigError)
    @app.errorhandler(DataError)  # e.g. the device's data moved since the run: say so, not "internal error"
    def refused(error):
        return page("error.html", 400, error=str(error))

    @app.errorhandler(HTTPException)
    def http_error(error):
        return page("error.html", error.code or 500, error=f"{error.code} {error.name}: {error.description}")

    @app.errorhandler(Exception)
    def unexpected(error):
        app.logger.exception("unexpected error")  # the traceback goes to the server's log, not the page
        first = (str(error).splitlines() or [""])[0]
        return page("error.html", 500, error=f"internal error: {type(error).__name__}: {first}")

    @app.get("/")
    def index():
        return index_page()

    @app.get("/device")
    def pick_user():
        user = request.args.get("user", "").strip()
        if not user:
            return index_page("type a user id, or pick one of the examples", 400)
        demo.row_of(user)
        if same(request.args.get("csrf", ""), g.csrf):
            claims.claim(user, g.visitor)  # the index form picks the device to act as
        return redirect(url_for("device", user=user))

    @app.get("/device/<user>")
    def device(user: str):
        demo.row_of(user)
        user = user.strip()
        access = claims.access(user, g.visitor)
        if access is not Access.MINE:  # nothing that depends on the device's state
            return page("claim.html", 403 if access is Access.HELD else 200, user=user,
                        held=HELD_MESSAGE if access is Access.HELD else None)
        view = view_of(demo, user)
        rated, _ = own_ratings(demo, user)
        picks = [] if view.erased else recommend(demo, view.vector, view.bias, rated, TOP)
        return page("device.html", view=view, recommended=picks, forget_command=demo.forget_command(view.user),
                    plot=url_for("plot", user=view.user), replay=replays.status(view.user),
                    can_replay=demo.can_replay, no_replay=None if demo.can_replay else demo.no_replay(),
                    also_sent=also_sent(view), epsilon_caveat=epsilon_caveat(demo, view))

    def own(user: str) -> str:
        """The device's id if this visitor holds it; 403 otherwise."""
        demo.row_of(user)
        user = user.strip()
        if claims.access(user, g.visitor) is not Access.MINE:
            abort(403, "only the visitor who claimed this device can see it or act on it: open its page and press "
                       "'This is my device' (if no one holds it yet)")
        return user

    @app.post("/device/<user>/claim")
    def claim(user: str):
        demo.row_of(user)
        if not claims.claim(user.strip(), g.visitor):
            abort(403, HELD_MESSAGE)
        return redirect(url_for("device", user=user.strip()), code=303)

    def change_device(user: str, change, anchor: str):
        user = own(user)
        with device_lock:
            change(device_side(), user)
        return redirect(url_for("device", user=user) + anchor, code=303)

    @app.post("/device/<user>/consent")
    def consent(user: str):
        train = request.form.get("train") == "1"
        return change_device(user, lambda side, u: side.set_consent(demo.paths.run, u, train), "#consent")

    @app.post("/device/<user>/forget")
    def forget(user: str):
        return change_device(user, lambda side, u: side.erase_device(demo.paths.run, u), "#forget")

    @app.post("/device/<user>/forget/replay")
    def forget_replay(user: str):
        user = own(user)
        if not demo.can_replay:
            raise BadInput(demo.no_replay())
        replays.start(user)
        return redirect(url_for("device", user=user) + "#forget", code=303)

    @app.get("/plot.png")
    def plot():
        user = request.args.get("user", "").strip()
        if not user:
            if "" not in plots:
                plots[""] = plot_png(demo)
            png = plots[""]
        else:
            view = view_of(demo, own(user))
            png = plot_png(demo, [(u.round, u.epsilon) for u in view.uploads if u.epsilon is not None], user)
        return Response(png, mimetype="image/png", headers={"Cache-Control": "no-store"})

    def new_page(status: int = 200, error: str | None = None, result=None):
        rows = demo.well_known(COLD_START_ITEMS)
        chosen = {k: v for k, v in request.form.items() if k.startswith("rating-")}  # kept across a refusal
        return page("new.html", status, error=error, result=result, min_ratings=MIN_RATINGS, chosen=chosen,
                    movies=[(str(demo.item_ids[r]), demo.titles[r]) for r in rows],
                    choices=_choices(demo.scale), opt_in=request.form.get("opt-in") == "1")

    @app.get("/new")
    def new_device():
        return new_page(result=devices.get(g.visitor))

    @app.post("/new")
    def fit_new_device():
        try:
            ratings = parse_ratings(demo, request.form)
        except BadInput as error:
            return new_page(400, str(error))
        result = cold_start(demo, ratings, request.form.get("opt-in") == "1")
        devices.put(g.visitor, result)
        return new_page(result=result)

    @app.post("/new/forget")
    def forget_new_device():
        devices.drop(g.visitor)
        return redirect(url_for("new_device"), code=303)

    return app


def same(given: str, expected: str) -> bool:
    """Constant-time equality; as bytes, so a non-ASCII value is a mismatch, not a TypeError."""
    return hmac.compare_digest(given.encode(), expected.encode())


def _choices(scale: tuple[float, float]) -> list[str]:
    """The select's options: each step of the rating scale (1..5 on ML-100K; half stars from 0.5 on ml-latest)."""
    low, high = scale
    step = 1.0 if float(low).is_integer() else 0.5
    return [f"{low + i * step:g}" for i in range(int(round((high - low) / step)) + 1)]
