"""Run the page: werkzeug's threaded server, the URL printed once it is listening."""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
from pathlib import Path

from fedrec.run.config import ConfigError


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


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


def make_page_server(run: Path, host: str = "127.0.0.1", port: int = 8000, data_dir: str | None = None):
    """The listening server for `run` (port 0: a free one); ConfigError for a bad run or address.
    The address is taken first: a busy port fails before seconds of loading."""
    from werkzeug.serving import make_server

    from .app import create_app
    from .demo import Demo

    sock = listen(host, port)
    try:
        app = create_app(Demo(run, data_dir))
        return make_server(host, sock.getsockname()[1], app, threaded=True, fd=sock.fileno())
    finally:
        sock.close()  # the server holds its own duplicate of the socket


def serve(run: Path, host: str = "127.0.0.1", port: int = 8000, data_dir: str | None = None, say=print) -> None:
    server = make_page_server(run, host, port, data_dir)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request would drown the URL
    say(f"fedrec serve: {url(host, server.port)} (Ctrl-C stops)")
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
    """One line for an address other machines may reach: the demo is every device, and claims are first come."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name
        loopback = False
    if loopback:
        return None
    return (f"warning: listening on {host}: this demo stands in for every device, and anyone who can reach it "
            "can act as any device no visitor holds (see its state, opted out or erased included; opt it out, "
            "erase it, replay without it)")


def _interrupt(signum, frame):
    raise KeyboardInterrupt
