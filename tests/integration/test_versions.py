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


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0]


CORE_VERSION = project(CORE)["version"]
PROJECTS = repository_projects()
#: Distributions under plugins/ without entry points: libraries plugins may depend on (qrm-libvirt).
LIBRARIES = {
    project(p)["name"]
    for p in PROJECTS
    if p.parent.parent == REPO / "plugins" and not project(p).get("entry-points")
}


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
    plugins = [d for d in others if requirement_name(d) not in LIBRARIES]
    assert not plugins, f"{where}: plugins never depend on other plugins: {plugins}"
    unpinned = [d for d in others if d != f"{requirement_name(d)}=={CORE_VERSION}"]
    assert not unpinned, f"{where}: a library of this repository is pinned to {CORE_VERSION}: {unpinned}"


def test_the_libraries_are_libraries() -> None:
    """qrm-libvirt has no entry points (it is no plugin) and both libvirt plugins use it."""
    assert "qrm-libvirt" in LIBRARIES
    users = {
        project(p)["name"]
        for p in PROJECTS
        if "qrm-libvirt==" + CORE_VERSION in project(p).get("dependencies", [])
    }
    assert users == {"qrm-qemu", "qrm-xen"}


def test_installed_qrm_distributions_agree() -> None:
    """What is installed in this environment is this checkout, at one version."""
    versions = {
        d.metadata["Name"]: d.version
        for d in metadata.distributions()
        if (d.metadata["Name"] or "").startswith("qrm-")
    }
    assert versions.get("qrm-example") == CORE_VERSION
    assert {name: v for name, v in versions.items() if v != CORE_VERSION} == {}
