"""fedrec's optional features, each a pip extra (pyproject.toml's [project.optional-dependencies]),
and the one line a command prints when the one it needs is not installed."""

from __future__ import annotations

import importlib
import json
import sys
from urllib.parse import unquote, urlparse

from fedrec.run.config import ConfigError

# extra -> (the module it brings, its package's name)
EXTRAS = {
    "serve": ("flask", "Flask"),  # fedrec serve, serve-bench: the demo page
    "tune": ("optuna", "Optuna"),  # fedrec tune, compare --tune, accuracy --tune-trials
    "peers": ("surprise", "scikit-surprise"),  # Surprise's baselines beside fedrec in fedrec accuracy
}


class MissingExtra(ConfigError):
    """An optional feature that is not installed: like a bad setting, one line and exit code 2."""


def install_command(extra: str) -> str:
    """The pip command that adds `extra` to this environment: from fedrec's own source folder where
    fedrec was installed from one (`make install`: an editable install of the checkout), else by name."""
    from importlib import metadata  # here: its import alone costs the command line's start-up a tenth of a second

    pip = f"{sys.executable} -m pip install"  # this environment's pip, not whichever is first on PATH
    # pip's record of where fedrec came from (a checkout's fedrec.egg-info, found first from inside
    # the checkout, has none)
    records = (d.read_text("direct_url.json") for d in metadata.distributions(name="fedrec"))
    try:
        origin = json.loads(next((r for r in records if r), "{}"))
    except ValueError:
        origin = {}
    url = urlparse(origin.get("url", ""))
    if url.scheme == "file":
        editable = "-e " if origin.get("dir_info", {}).get("editable") else ""
        return f'{pip} {editable}"{unquote(url.path)}[{extra}]"'
    return f'{pip} "fedrec[{extra}]"'


def installed(extra: str) -> bool:
    try:
        importlib.import_module(EXTRAS[extra][0])
    except ImportError:
        return False
    return True


def require(extra: str, feature: str) -> None:
    """MissingExtra naming the extra and how to install it, before `feature` starts any work."""
    if not installed(extra):
        raise MissingExtra(f"{feature} needs {EXTRAS[extra][1]}, which is not installed (fedrec's {extra} extra): "
                           f"{install_command(extra)}")
