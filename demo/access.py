"""Who may use the page: a token login, the convention of Jupyter's.

`fedrec serve` makes a random access token from OS entropy and prints it in its URL
(`http://127.0.0.1:8000/?token=...`), the one place it appears: no log line, no file, not in
the process's arguments. A GET carrying the right token (compared in constant time) gets a
visitor id in a session cookie and is redirected to the same URL without the token, so the
token leaves the address bar and never reaches a Referer. Any request without that session,
static files and the plot included, is answered with one line of 403 and nothing of the page.

Visitor ids are issued by this server only, in Flask's session cookie signed with a
per-process key from OS entropy: a cookie the client chose, one signed by an earlier server
or tampered with, or one another app on this host set (cookies ignore ports, so an app on any
127.0.0.1 port can set and clobber cookies here) is never taken for a visitor. The cookie is
HttpOnly, so no script on another local port can read it; its name carries the port, so two
`fedrec serve` on one host do not log each other out.

A visitor holds one device at a time (claims.py), so how many devices one token holder can
take is bounded by how many sessions they get: new sessions come at most NEW_SESSIONS_AT_ONCE
at once, then one every NEW_SESSION_EVERY seconds, server-wide; past that a login gets one
line of 429 and no session.
"""

from __future__ import annotations

import hmac
import math
import secrets
import threading
import time
from urllib.parse import parse_qsl, quote, urlencode

from flask import Response, request, session

TOKEN_PARAM = "token"
VISITOR = "visitor"  # the session's key for the visitor id
NEW_SESSIONS_AT_ONCE = 30
NEW_SESSION_EVERY = 10.0  # seconds
NO_ACCESS = ("403 Forbidden: open this page with the URL that `fedrec serve` printed when it started "
             "(it carries the access token)")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def cookie_name(port: int | None = None) -> str:
    return "fedrec_session" if port is None else f"fedrec_session_{port}"


def one_line(status: int, message: str, **headers: str) -> Response:
    return Response(message + "\n", status, mimetype="text/plain", headers={"Cache-Control": "no-store", **headers})


class Allowance:
    """At most `at_once` at once, then one more every `every` seconds (a token bucket), safe across threads."""

    def __init__(self, at_once: int = NEW_SESSIONS_AT_ONCE, every: float = NEW_SESSION_EVERY, clock=time.monotonic):
        self._at_once, self._every, self._clock = at_once, every, clock
        self._left, self._since = float(at_once), clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0 when one is granted, else the seconds until one will be."""
        with self._lock:
            now = self._clock()
            self._left = min(float(self._at_once), self._left + (now - self._since) / self._every)
            self._since = now
            if self._left >= 1:
                self._left -= 1
                return 0.0
            return (1 - self._left) * self._every


class Gate:
    """Runs before every request: lets a signed session through, logs in with the token, refuses the rest."""

    def __init__(self, token: str, sessions: Allowance | None = None):
        if len(token) < 16:  # an empty or short token must never open the page
            raise ValueError("the access token needs at least 16 characters")
        self._token = token.encode()
        self._sessions = sessions or Allowance()

    def admit(self) -> Response | None:
        """None: the request goes on as visitor(); otherwise the answer (a refusal, or the login's redirect)."""
        given = request.args.get(TOKEN_PARAM)
        if given is None:
            return None if visitor() else one_line(403, NO_ACCESS)
        # a login is a GET: a POST redirected here would lose its form
        if request.method not in ("GET", "HEAD") or not hmac.compare_digest(given.encode(), self._token):
            return one_line(403, NO_ACCESS)
        if not visitor():  # a valid session logging in again keeps its id (and the device it holds)
            wait = self._sessions.take()
            if wait:
                return one_line(429, f"429 Too Many Requests: too many new sessions on this server; try again in "
                                     f"{math.ceil(wait)} s", **{"Retry-After": str(math.ceil(wait))})
            session[VISITOR] = secrets.token_urlsafe(32)
        return Response(status=303, headers={"Location": without_token(), "Cache-Control": "no-store"})


def visitor() -> str | None:
    """This request's visitor id: only ever one this server signed (Flask drops a cookie whose signature fails)."""
    value = session.get(VISITOR)
    return value if isinstance(value, str) and value else None


def without_token() -> str:
    """This request's path and query, less the token; relative, and never '//host' (no redirect off this server)."""
    path = "/" + quote(request.path, safe="/:@!$&'()*+,;=-._~").lstrip("/")
    kept = [(k, v) for k, v in parse_qsl(request.query_string.decode("utf-8", "replace"), keep_blank_values=True)
            if k != TOKEN_PARAM]
    return path + ("?" + urlencode(kept) if kept else "")
