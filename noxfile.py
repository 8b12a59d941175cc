"""Test sessions: the only entry point for developers and CI.

    nox                      # everything below, in order
    nox -s core              # qrm_core alone: proves core imports no plugin
    nox -s console           # the web console in Debian's Chromium (Playwright)
    nox -s "plugin(qrm_nfs)" # one plugin with core only: catches missing deps and stray imports
    nox -s example           # docs/example-plugin with core only
    nox -s integration       # core + every plugin + the example plugin
    nox -s lint typecheck

Databases: the suite runs against SQLite, PostgreSQL and MariaDB
(``QRM_TEST_DATABASES``, ``QRM_TEST_POSTGRES_URL``, ``QRM_TEST_MYSQL_URL``);
under CI=true a database or component that cannot be reached fails the run.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["lint", "typecheck", "core", "console", "plugin", "example", "integration"]

ROOT = Path(__file__).parent
PLUGINS = sorted(
    p.name
    for p in (ROOT / "plugins").iterdir()
    if (p / "pyproject.toml").exists() and not p.name.startswith("_")
)
EXAMPLE_PLUGIN = "docs/example-plugin"
#: Distributions under plugins/ by name (plugins depend on the libraries among them, e.g. qrm-libvirt).
LOCAL_DISTRIBUTIONS = {
    tomllib.loads((ROOT / "plugins" / p / "pyproject.toml").read_text())["project"]["name"]: p
    for p in PLUGINS
}
PASS_ENV = ("CI", "QRM_TEST_DATABASES", "QRM_TEST_POSTGRES_URL", "QRM_TEST_MYSQL_URL", "QRM_TEST_OUTPUT")


def _pytest(session: nox.Session, *paths: str) -> None:
    session.run("pytest", *paths, *session.posargs)


def _no_shadowing(session: nox.Session) -> None:
    """Fail if a released qrm distribution (not this checkout) is installed."""
    session.run(
        "python",
        "-c",
        "import importlib.metadata as m, json, sys\n"
        "bad=[d.metadata['Name'] for d in m.distributions() if (d.metadata['Name'] or '').startswith('qrm')"
        " and not (d.read_text('direct_url.json') or '').count('file://')]\n"
        "sys.exit('installed from an index, not this checkout: ' + ', '.join(bad) if bad else 0)",
        silent=True,
    )


@nox.session(python="3.11")
def core(session: nox.Session) -> None:
    """Run qrm_core's tests with no plugin installed."""
    session.install("-e", "./qrm_core[test]")
    _no_shadowing(session)
    _pytest(session, "tests/core")


def _local_dependencies(plugin: str) -> list[str]:
    """``-e ./plugins/<lib>`` for each library of this repository the plugin depends on
    (qrm-qemu and qrm-xen on qrm-libvirt): installed from the checkout, never from an index."""
    meta = tomllib.loads((ROOT / "plugins" / plugin / "pyproject.toml").read_text())["project"]
    found = []
    for requirement in meta.get("dependencies", []):
        name = re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0]
        if name in LOCAL_DISTRIBUTIONS and LOCAL_DISTRIBUTIONS[name] != plugin:
            found += ["-e", f"./plugins/{LOCAL_DISTRIBUTIONS[name]}"]
    return found


@nox.session(python="3.11")
def console(session: nox.Session) -> None:
    """The web console in a real browser: Playwright driving Debian's Chromium (core only)."""
    session.install("-e", "./qrm_core[test]")
    _no_shadowing(session)
    _pytest(session, "tests/console")


@nox.session(python="3.11")
@nox.parametrize("plugin", PLUGINS, ids=PLUGINS)
def plugin(session: nox.Session, plugin: str) -> None:
    """Run one plugin's tests against core and the libraries it depends on, with no other plugin."""
    session.install("-e", "./qrm_core[test]", *_local_dependencies(plugin), "-e", f"./plugins/{plugin}[test]")
    _no_shadowing(session)
    _pytest(session, f"plugins/{plugin}/tests")


@nox.session(python="3.11")
def example(session: nox.Session) -> None:
    """Run the example plugin's own tests (docs/example-plugin) against core, with no other plugin."""
    session.install("-e", "./qrm_core[test]", "-e", f"./{EXAMPLE_PLUGIN}[test]")
    _no_shadowing(session)
    _pytest(session, f"{EXAMPLE_PLUGIN}/tests")


@nox.session(python="3.11")
def integration(session: nox.Session) -> None:
    """Install core, every plugin and the example plugin; run the cross-plugin tests."""
    session.install(
        "-e",
        "./qrm_core[test]",
        *(f"-e./plugins/{p}[test]" for p in PLUGINS),
        "-e",
        f"./{EXAMPLE_PLUGIN}",
        "-e",
        "./tests/integration/broken-plugin",
    )
    _no_shadowing(session)
    _pytest(session, "tests/integration")


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting; plugins import only core's plugin API."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("python", "scripts/check_plugin_imports.py")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy over core, every plugin and the example plugin."""
    session.install(
        "mypy>=1.10",
        "-e",
        "./qrm_core[test]",
        *(f"-e./plugins/{p}" for p in PLUGINS),
        "-e",
        f"./{EXAMPLE_PLUGIN}",
    )
    session.run("mypy", "qrm_core/src", *(f"plugins/{p}/src" for p in PLUGINS), f"{EXAMPLE_PLUGIN}/src")
