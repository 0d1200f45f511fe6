"""Print README.md's settings table from RunConfig (`python scripts/settings_table.py`);
tests/test_config.py checks that the README holds exactly this table."""

from __future__ import annotations

from dataclasses import fields

from fedrec.run.config import RunConfig


def settings_table() -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in fields(RunConfig):
        help_text = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{f.name.replace('_', '-')}` | `{f.default!r}` | {help_text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
