"""Test sessions: the only entry point for developers and CI.

    nox                      # everything below, in order
    nox -s core              # qrm_core alone: proves core imports no plugin
    nox -s "plugin(qrm_nfs)" # one plugin with core only: catches missing deps and stray imports
    nox -s example           # docs/example-plugin with core only
    nox -s integration       # core + every plugin + the example plugin
    nox -s lint typecheck

Databases: the suite runs against SQLite, PostgreSQL and MariaDB
(``QRM_TEST_DATABASES``, ``QRM_TEST_POSTGRES_URL``, ``QRM_TEST_MYSQL_URL``);
under CI=true a database or component that cannot be reached fails the run.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["lint", "typecheck", "core", "plugin", "example", "integration"]

ROOT = Path(__file__).parent
PLUGINS = sorted(
    p.name
    for p in (ROOT / "plugins").iterdir()
    if (p / "pyproject.toml").exists() and not p.name.startswith("_")
)
EXAMPLE_PLUGIN = "docs/example-plugin"
PASS_ENV = ("CI", "QRM_TEST_DATABASES", "QRM_TEST_POSTGRES_URL", "QRM_TEST_MYSQL_URL")


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


@nox.session(python="3.11")
@nox.parametrize("plugin", PLUGINS, ids=PLUGINS)
def plugin(session: nox.Session, plugin: str) -> None:
    """Run one plugin's tests against core, with no other plugin installed."""
    session.install("-e", "./qrm_core[test]", "-e", f"./plugins/{plugin}[test]")
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
    """ruff: lint and formatting."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


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
