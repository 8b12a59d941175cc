"""The public plugin API: what it offers is documented, importable and cheap,
and the lint check that keeps plugins to it catches an import around it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from qrm_core import plugin_api

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "scripts" / "check_plugin_imports.py"


def documented_names() -> set[str]:
    text = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    match = re.search(r"^## The plugin API\s*$(.*?)(?=^## )", text, flags=re.M | re.S)
    assert match, "docs/plugins.md has no section 'The plugin API'"
    rows = [line for line in match.group(1).splitlines() if line.startswith("| ") and "---" not in line]
    return {name for row in rows[1:] for name in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", row.split("|")[2])}


def test_every_exported_name_is_documented_and_nothing_else() -> None:
    assert documented_names() == set(plugin_api.__all__)


@pytest.mark.parametrize("name", plugin_api.__all__)
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(plugin_api, name) is not None


def test_importing_the_api_loads_no_database_layer() -> None:
    code = "import sys, qrm_core.plugin_api; print('sqlalchemy' in sys.modules, 'typer' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="nosuch"):
        plugin_api.nosuch


def test_the_repository_s_plugins_import_only_the_api() -> None:
    result = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_the_check_finds_imports_around_the_api(tmp_path: Path) -> None:
    src = tmp_path / "src" / "qrm_bad"
    src.mkdir(parents=True)
    (src / "plugin.py").write_text(
        "from qrm_core.plugin_api import hookimpl\n"
        "from qrm_core import hookimpl as h2\n"
        "import qrm_core.services\n"
        "def f():\n"
        "    from qrm_core.models import Resource\n"
    )
    result = subprocess.run(
        [sys.executable, str(CHECK), str(tmp_path / "src")], capture_output=True, text=True
    )
    assert result.returncode == 1
    found = [line.split(": ", 1)[0].rsplit(":", 1)[1] for line in result.stdout.splitlines()[:-1]]
    assert found == ["2", "3", "5"], result.stdout
