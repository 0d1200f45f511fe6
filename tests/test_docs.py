"""The user-facing docs hold together: README.md stays a front page, every link between README.md and
docs/*.md reaches a file and, with #anchor, a heading there (GitHub's anchor rules), and no commit hash,
issue number or review jargon reaches what users read. Pure Python: reads the files, imports nothing
of fedrec."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MOST_LINES = 300

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# 7 to 40 hex digits with at least one letter and one digit: what a (short) commit hash looks like
COMMIT_HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
ISSUE = re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE)
JARGON = ("per the review", "red-team", "red team", "blocker")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, everything but letters, digits,
    underscores, hyphens and spaces removed, spaces turned into hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("*", "")
    text = "".join(c for c in text.lower() if c.isalnum() or c in "_- ")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives the headings of `path` (repeats get -1, -2, ...)."""
    seen: Counter[str] = Counter()
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        found.add(base if not seen[base] else f"{base}-{seen[base]}")
        seen[base] += 1
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link and image in `path`'s prose (not in code)."""
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        bare = INLINE_CODE.sub("", line)
        out += [(number, target) for target in LINK.findall(bare)]
    return out


def test_slug_follows_githubs_rules():
    assert slug("Demo page: one device's side (`fedrec serve`)") == "demo-page-one-devices-side-fedrec-serve"
    assert slug("(b) The Deployment Engine with cohort SuperNodes") == "b-the-deployment-engine-with-cohort-supernodes"
    assert slug("Privacy and utility (`fedrec privacy-sweep`)") == "privacy-and-utility-fedrec-privacy-sweep"
    assert slug("A 10-machine run — an estimate") == "a-10-machine-run--an-estimate"


def test_the_checks_can_fail(tmp_path):
    """Positive controls: a broken file link, a broken anchor, a hash and an issue number are caught."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [bad](#nope) [gone](missing.md) `[code](x.md)`\n"
                    "fixed at e420082, see issue 21\n```\n[fenced](nowhere.md)\n```\n")
    assert anchors(page) == {"title"}
    assert [t for _, t in links(page)] == ["#title", "#nope", "missing.md"]
    assert problems(page) == [f"{page.name}:3: #nope: no such heading in page.md",
                              f"{page.name}:3: missing.md: no such file"]
    text = page.read_text()
    assert COMMIT_HASH.findall(text) == ["e420082"] and ISSUE.findall(text) == ["issue 21"]


def problems(path: Path) -> list[str]:
    found = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            found.append(f"{path.name}:{number}: {target}: no such file")
            continue
        if anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            found.append(f"{path.name}:{number}: {target}: no such heading in {dest.name}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_reaches_a_file_and_a_heading(page):
    assert problems(page) == []


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MOST_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_commit_hashes_issue_numbers_or_review_jargon(page):
    text = page.read_text(encoding="utf-8")
    assert COMMIT_HASH.findall(text) == [], "commit hashes: give the date instead"
    assert ISSUE.findall(text) == [], "issue numbers: say what the change is"
    assert [word for word in JARGON if word in text.lower()] == []
