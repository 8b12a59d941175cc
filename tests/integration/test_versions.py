"""Lockstep versions while the hook and driver API is 0.x (STYLE.md 7.6).

Every distribution in the repository (core, each plugin, the template, the
example plugin, the test-only broken plugin) has qrm-core's version, and every
plugin pins ``qrm-core==<that version>`` exactly: a plugin built against other
hook specifications must not install beside this core.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import tomllib
from pathlib import Path

import pytest
from integration_support import REPO

import qrm_core

CORE = REPO / "qrm_core" / "pyproject.toml"


def repository_projects() -> list[Path]:
    found = [CORE, REPO / "docs" / "example-plugin" / "pyproject.toml"]
    found += sorted((REPO / "plugins").glob("*/pyproject.toml"))
    found += sorted((REPO / "tests" / "integration").glob("*/pyproject.toml"))
    return found


def project(path: Path) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))["project"]


CORE_VERSION = project(CORE)["version"]
PROJECTS = repository_projects()


def test_core_version_is_the_one_the_package_reports() -> None:
    assert qrm_core.__version__ == CORE_VERSION == metadata.version("qrm-core")
    assert (REPO / "plugins" / "_template" / "pyproject.toml") in PROJECTS


@pytest.mark.parametrize("path", PROJECTS, ids=[str(p.parent.relative_to(REPO)) for p in PROJECTS])
def test_every_distribution_has_core_version_and_pins_core(path: Path) -> None:
    meta = project(path)
    where = path.relative_to(REPO)
    assert meta["version"] == CORE_VERSION, f"{where}: version {meta['version']}, qrm-core has {CORE_VERSION}"
    if path == CORE:
        return
    assert meta["name"].startswith("qrm-"), f"{where}: distribution names start with 'qrm-'"
    pins = [d for d in meta.get("dependencies", []) if re.match(r"^qrm-core\b", d)]
    assert pins == [f"qrm-core=={CORE_VERSION}"], f"{where}: must depend on exactly qrm-core=={CORE_VERSION}"
    others = [d for d in meta.get("dependencies", []) if re.match(r"^qrm[-_]", d) and d not in pins]
    assert not others, f"{where}: plugins never depend on other plugins: {others}"


def test_installed_qrm_distributions_agree() -> None:
    """What is installed in this environment is this checkout, at one version."""
    versions = {
        d.metadata["Name"]: d.version
        for d in metadata.distributions()
        if (d.metadata["Name"] or "").startswith("qrm-")
    }
    assert versions.get("qrm-example") == CORE_VERSION
    assert {name: v for name, v in versions.items() if v != CORE_VERSION} == {}
