"""Run the page: werkzeug's threaded server, the URL printed once it is listening."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fedrec.run.config import ConfigError


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def make_page_server(run: Path, host: str = "127.0.0.1", port: int = 8000, data_dir: str | None = None):
    """The listening server for `run` (port 0: a free one); ConfigError for a bad run or address."""
    from werkzeug.serving import make_server

    from .app import create_app
    from .demo import Demo

    app = create_app(Demo(run, data_dir))
    try:
        return make_server(host, port, app, threaded=True)
    except (OSError, OverflowError) as error:  # address in use, unknown host, no permission
        raise ConfigError(f"cannot listen on {host}:{port}: {getattr(error, 'strerror', None) or error}; "
                          "pick another --port or --host") from None


def serve(run: Path, host: str = "127.0.0.1", port: int = 8000, data_dir: str | None = None, say=print) -> None:
    server = make_page_server(run, host, port, data_dir)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request would drown the URL
    say(f"fedrec serve: {url(host, server.port)} (Ctrl-C stops)")
    from .device import device_side

    threading.Thread(target=device_side, daemon=True).start()  # the device pages' imports, while the index shows
    if host not in ("127.0.0.1", "localhost", "::1"):
        say(f"note: listening on {host}: anyone who can reach this address can use the page")
    try:
        server.serve_forever()  # werkzeug's returns on Ctrl-C (it catches KeyboardInterrupt)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.app.extensions["fedrec-replays"].stop()  # a replay cut short resumes on the next fedrec forget
    say("stopped")
