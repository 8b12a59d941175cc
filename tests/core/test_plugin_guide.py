"""docs/plugins.md stays true: quoted code matches the example plugin, links resolve, fixtures exist.

A code block whose first line is ``# from <path>`` quotes that file: a Python
quote must appear in it verbatim (contiguous lines), a TOML quote line by line.
The example plugin's behaviour itself is tested by docs/example-plugin/tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import qrm_core.testing

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "plugins.md"
DOCS = [
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "docs" / "example-plugin" / "README.md",
    REPO / "CONTRIBUTING.md",
]


def quotes() -> list[tuple[str, str, str]]:
    found = []
    for language, body in re.findall(r"```(\w+)\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.S):
        first, _, rest = body.partition("\n")
        match = re.fullmatch(r"# from (\S+)", first.strip())
        if match:
            found.append((language, match.group(1), rest))
    return found


QUOTES = quotes()


def test_the_guide_quotes_the_example_plugin() -> None:
    quoted = {path for _, path, _ in QUOTES}
    assert {
        "docs/example-plugin/pyproject.toml",
        "docs/example-plugin/src/qrm_example/plugin.py",
        "docs/example-plugin/src/qrm_example/driver.py",
    } <= quoted


@pytest.mark.parametrize(
    ("language", "path", "body"), QUOTES, ids=[f"{p}#{i}" for i, (_, p, _) in enumerate(QUOTES)]
)
def test_quoted_code_matches_the_file(language: str, path: str, body: str) -> None:
    source = (REPO / path).read_text(encoding="utf-8")
    if language == "python":
        assert body.rstrip("\n") in source, f"docs/plugins.md quotes {path}, but the file no longer reads so"
    else:
        lines = [line for line in body.splitlines() if line.strip()]
        stale = [line for line in lines if line not in source.splitlines()]
        assert not stale, f"docs/plugins.md quotes lines of {path} that it does not have: {stale}"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_relative_links_resolve(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target) or target.startswith("#"):
            continue
        if not (doc.parent / target.split("#", 1)[0]).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(REPO)} links to missing files: {broken}"


def test_the_fixture_table_names_real_fixtures() -> None:
    table = GUIDE.read_text(encoding="utf-8").split("| fixture | gives |", 1)[1].split("\n\n", 1)[0]
    names = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert len(names) >= 5
    assert not [n for n in names if not hasattr(qrm_core.testing, n)], (
        "docs/plugins.md names unknown fixtures"
    )
