#!/usr/bin/env python3
"""Fail when a plugin imports anything of qrm_core but its public plugin API.

Plugins (``plugins/*/src``, the template, ``docs/example-plugin/src``) may
import ``qrm_core.plugin_api`` and nothing else of ``qrm_core``: everything a
plugin may use is there (docs/plugins.md, "The plugin API"). Run by the lint
session; ``python scripts/check_plugin_imports.py [DIR ...]`` checks other
directories. Prints ``file:line: what`` per violation and exits 1.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = "qrm_core.plugin_api"


def default_dirs() -> list[Path]:
    return [*sorted(ROOT.glob("plugins/*/src")), ROOT / "docs" / "example-plugin" / "src"]


def violations(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) for every import of qrm_core outside the plugin API in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _core(alias.name) and alias.name != ALLOWED:
                    yield node.lineno, f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "qrm_core":
                names = [a.name for a in node.names if a.name != "plugin_api"]
                if names:
                    yield node.lineno, f"from qrm_core import {', '.join(names)}"
            elif _core(node.module) and node.module != ALLOWED:
                yield node.lineno, f"from {node.module} import ..."


def _core(module: str) -> bool:
    return module == "qrm_core" or module.startswith("qrm_core.")


def main(argv: list[str]) -> int:
    dirs = [Path(a) for a in argv] or default_dirs()
    found = 0
    for directory in dirs:
        for path in sorted(directory.rglob("*.py")):
            for line, text in violations(path):
                shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                print(f"{shown}:{line}: {text} (plugins may import only {ALLOWED})")
                found += 1
    if found:
        print(f"{found} import(s) of qrm_core outside {ALLOWED}; see docs/plugins.md, 'The plugin API'")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
