"""Run the page: werkzeug's threaded server, its URL with the access token printed once it is listening.

That printed line is the one place the token appears (access.py): werkzeug's per-request log,
which would carry it in the login's query string, is off.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
from pathlib import Path

from fedrec.run.config import ConfigError

from .access import TOKEN_PARAM, cookie_name, new_token


def url(host: str, port: int, token: str | None = None) -> str:
    base = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    return base if token is None else f"{base}?{TOKEN_PARAM}={token}"


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line ConfigError (werkzeug would print and exit 1 on its own)."""
    from werkzeug.serving import get_sockaddr, select_address_family

    try:
        family = select_address_family(host, port)
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot listen on {host}:{port}: {error}; pick another --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as werkzeug does: restart without waiting
        sock.bind(get_sockaddr(host, port, family))
        sock.listen(128)
    except (OSError, OverflowError) as error:  # address in use, unknown host, no permission
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {getattr(error, 'strerror', None) or error}; "
                          "pick another --port or --host") from None
    return sock


def make_page_server(run: Path, token: str, host: str = "127.0.0.1", port: int = 8000, data_dir: str | None = None):
    """The listening server for `run`, opened with `token` (port 0: a free one); ConfigError for a bad run or
    address. The address is taken first: a busy port fails before seconds of loading."""
    from werkzeug.serving import make_server

    from .app import create_app
    from .demo import Demo

    sock = listen(host, port)
    try:
        port = sock.getsockname()[1]
        app = create_app(Demo(run, data_dir), token, cookie=cookie_name(port))
        return make_server(host, port, app, threaded=True, fd=sock.fileno())
    finally:
        sock.close()  # the server holds its own duplicate of the socket


def serve(run: Path, host: str = "127.0.0.1", port: int = 8000, data_dir: str | None = None, say=print) -> None:
    token = new_token()  # OS entropy; printed once below, never logged or written
    server = make_page_server(run, token, host, port, data_dir)
    # werkzeug logs each request's line at INFO: the login's would carry the token (and they would drown the URL)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    say(f"fedrec serve: {url(host, server.port, token)} (open this URL: its token is the only way in; "
        "Ctrl-C stops)")
    from .device import device_side

    warm = threading.Thread(target=device_side, daemon=True)  # the device pages' imports, while the index shows
    warm.start()
    if host_warning(host):
        say(host_warning(host))
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it like Ctrl-C: replays stopped too
    try:
        server.serve_forever()  # werkzeug's returns on Ctrl-C (it catches KeyboardInterrupt)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
        server.app.extensions["fedrec-replays"].stop()  # a replay cut short resumes on the next fedrec forget
        warm.join()  # exiting mid-import (torch's C++ threads) aborts the process: "terminate called ..."
    say("stopped")


def host_warning(host: str) -> str | None:
    """One line for an address other machines may reach: plain HTTP shows the token to the network, and whoever
    has it is a visitor; the demo is every device, and claims are first come."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name
        loopback = False
    if loopback:
        return None
    return (f"warning: listening on {host}: the page is plain HTTP, so the token and session cookies cross the "
            "network readable; this demo stands in for every device, and anyone who has the URL can act as any "
            "device no visitor holds (see its state, opted out or erased included; opt it out, erase it, replay "
            "without it)")


def _interrupt(signum, frame):
    raise KeyboardInterrupt
