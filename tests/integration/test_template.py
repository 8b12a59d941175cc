"""The plugin template makes a plugin that installs, loads and passes its own tests.

``scripts/new-plugin.sh`` is run as docs/plugins.md says; the result is built
and installed into a private directory (never into this environment, so no
other test sees it) and its tests run in a new process with that directory
on the path.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from integration_support import REPO

from qrm_core.testing import missing

SCRIPT = REPO / "scripts" / "new-plugin.sh"


def run(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def installer() -> list[str]:
    uv = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    if uv:
        return [uv, "pip", "install", "--python", sys.executable]
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip", "install"]
    missing("uv or pip", "install uv (scripts/test.sh does) to build the generated plugin")
    raise AssertionError("unreachable")


def test_a_plugin_made_from_the_template_works(tmp_path: Path) -> None:
    dest = tmp_path / "qrm_demo"
    made = run("bash", SCRIPT, "demo", dest)
    assert made.returncode == 0, made.stderr
    leftovers = [
        str(p.relative_to(dest))
        for p in dest.rglob("*")
        if p.is_file()
        and any(t in p.read_text(errors="replace") for t in ("myplugin", "MyPlugin", "MYPLUGIN"))
    ]
    assert not leftovers, f"placeholders left in {leftovers}"
    meta = tomllib.loads((dest / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "qrm-demo"
    assert meta["entry-points"]["qrm.plugins"] == {"demo": "qrm_demo.plugin"}
    assert (dest / "src" / "qrm_demo" / "plugin.py").is_file()

    site = tmp_path / "site"
    built = run(*installer(), "--no-deps", "--target", site, dest)
    assert built.returncode == 0, built.stderr
    env = dict(os.environ, PYTHONPATH=str(site), QRM_TEST_DATABASES="sqlite")
    tested = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", dest / "tests", env=env)
    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-2000:]
    assert "3 passed" in tested.stdout


@pytest.mark.parametrize("name", ["", "Xen", "x", "two words", "a_b", "9lives", "../evil"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    result = run("bash", SCRIPT, name, tmp_path / "out")
    assert result.returncode == 2 and "usage:" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_existing_directory_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "qrm_demo").mkdir()
    result = run("bash", SCRIPT, "demo", tmp_path / "qrm_demo")
    assert result.returncode == 1 and "already exists" in result.stderr
    assert list((tmp_path / "qrm_demo").iterdir()) == []
