"""Write docs/settings.md from the config parts (`python scripts/settings_table.py > docs/settings.md`);
tests/run/test_config.py checks that the page is exactly this output."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

from fedrec.run.config import PARTS

INTRO = """# Settings

Every setting has one name from its flag (`--clipping-norm`) to its key in a config file
(`clipping-norm = 1.0`, flat or under `[tool.flwr.app.config]`) and its use in the code
(`PrivacyConfig.clipping_norm`). Flags win over a file, a file over the defaults. `fedrec simulate --help`
groups them in panels; `-1` means "the chosen model's own default". A setting a run would not use
(say `--pad-ratio` without `--update-mode padded`) is refused on the command line and reset, with a
warning, when it comes from a file.

Each layer owns its part and validates it; a device receives only the model and device-side parts.
This page is generated: `python scripts/settings_table.py > docs/settings.md`.
"""


def settings_table() -> str:
    out = [INTRO]
    for part in PARTS:
        source = Path(inspect.getfile(part))
        owner = f"{source.parent.name}/{source.name}"
        out += [f"## {part.__name__} ({owner})", "", (inspect.getdoc(part) or "").split("\n")[0], "",
                "| key | default | meaning |", "|---|---|---|"]
        for f in fields(part):
            if f.metadata.get("internal"):
                continue
            help_text = f.metadata["help"].replace("|", "\\|")
            out.append(f"| `{f.name.replace('_', '-')}` | `{f.default!r}` | {help_text} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(settings_table(), end="")
