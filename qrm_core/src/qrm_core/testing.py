"""Opt-in pytest helpers for qrm and its plugins (``pytest_plugins = ["qrm_core.testing"]``).

Fixtures:

* ``qrm_db_url`` - a migrated, empty database; parametrised over the backends
  in ``QRM_TEST_DATABASES`` (default ``sqlite,postgresql,mariadb``). Each
  backend gets a private schema or database for the test run, created once
  and emptied after every test. Under ``CI=true`` an unreachable backend fails
  the run; elsewhere it skips with a message saying what to start.
* ``qrm_settings`` - :class:`~qrm_core.config.Settings` with a temporary data
  directory and that database.
* ``qrm_plugins`` - a :class:`~qrm_core.plugins.PluginSystem` that discovers
  drivers but loads no entry-point plugins; tests register plugin objects.
* ``qrm_ctx`` - a :class:`~qrm_core.services.ServiceContext` on all of that.
* ``qrm_cli`` - runs ``qrm`` in-process as a user would, returning exit
  status, stdout and stderr.

Helpers: :func:`running_server` (``qrm server`` in this process) and
:func:`fuzz_api` (schemathesis over that server's OpenAPI document, bounded
and deterministic; core's suite runs it without plugins, the integration
suite with every plugin installed).

Databases: PostgreSQL at ``QRM_TEST_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``) and MariaDB at
``QRM_TEST_MYSQL_URL`` (default ``mysql+pymysql://root@127.0.0.1:3306/test``).
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlmodel import SQLModel

from qrm_core import db
from qrm_core.config import Settings, reset_settings_cache
from qrm_core.plugins import PluginSystem, set_plugin_system

DEFAULT_URLS = {
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "mariadb": "mysql+pymysql://root@127.0.0.1:3306/test",
}
ENV_URLS = {"postgresql": "QRM_TEST_POSTGRES_URL", "mariadb": "QRM_TEST_MYSQL_URL"}
ALL_BACKENDS = ("sqlite", "postgresql", "mariadb")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str, hint: str) -> None:
    """Skip on a laptop, fail under CI: a real component is not available."""
    text = f"{what} is not available: {hint}"
    if in_ci():
        pytest.fail(text + " (CI=true: missing components fail the run)", pytrace=False)
    pytest.skip(text)


def selected_backends() -> list[str]:
    wanted = os.environ.get("QRM_TEST_DATABASES", ",".join(ALL_BACKENDS))
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_BACKENDS]
    if unknown:
        raise pytest.UsageError(f"QRM_TEST_DATABASES: unknown backend(s) {unknown}")
    return names


def server_url(backend: str) -> str:
    return os.environ.get(ENV_URLS[backend], DEFAULT_URLS[backend])


@dataclass
class TestDatabase:
    backend: str
    url: str
    engine: sa.Engine
    cleanup: Any


def create_test_database(backend: str, tmp_dir: Path) -> TestDatabase:
    """A private, migrated database for one test run."""
    tag = f"qrm_t_{os.getpid()}_{secrets.token_hex(3)}"
    if backend == "sqlite":
        url = f"sqlite:///{tmp_dir / (tag + '.db')}"

        def cleanup() -> None:
            pass

    elif backend == "postgresql":
        base = make_url(server_url(backend))
        admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE SCHEMA "{tag}"')
        except sa.exc.OperationalError as exc:
            admin.dispose()
            missing("PostgreSQL", f"cannot connect to {base.render_as_string()} ({db._short(exc)})")
        url = base.update_query_dict({"options": f"-csearch_path={tag}"}).render_as_string(
            hide_password=False
        )

        def cleanup() -> None:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{tag}" CASCADE')
            admin.dispose()

    else:
        base = make_url(server_url(backend))
        admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"CREATE DATABASE `{tag}` CHARACTER SET utf8mb4")
        except sa.exc.OperationalError as exc:
            admin.dispose()
            missing("MariaDB", f"cannot connect to {base.render_as_string()} ({db._short(exc)})")
        url = base.set(database=tag).render_as_string(hide_password=False)

        def cleanup() -> None:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{tag}`")
            admin.dispose()

    engine = db.create_db_engine(url)
    db.upgrade(engine)
    return TestDatabase(backend=backend, url=url, engine=engine, cleanup=cleanup)


def empty_database(engine: sa.Engine) -> None:
    """Delete every row (keeping the schema and its revision).

    PostgreSQL: DELETE in dependency order and restart the schema's sequences,
    as ``TRUNCATE ... RESTART IDENTITY`` would; a TRUNCATE of every table costs
    about 0.25 s against 0.03 s for the DELETEs on a test's few rows, paid
    after every test on PostgreSQL. TRUNCATE stays the fallback (a cycle of
    foreign keys that DELETE cannot order).
    """
    if engine.dialect.name == "postgresql":
        try:
            with engine.begin() as conn:
                for table in reversed(SQLModel.metadata.sorted_tables):
                    conn.execute(table.delete())
                sequences = conn.exec_driver_sql(
                    "SELECT sequence_name FROM information_schema.sequences"
                    " WHERE sequence_schema = current_schema()"
                ).scalars()
                for name in list(sequences):
                    conn.exec_driver_sql(f'ALTER SEQUENCE "{name}" RESTART')
            return
        except sa.exc.IntegrityError:
            pass
    with engine.begin() as conn:
        if conn.dialect.name == "mysql":
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS=0")
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA defer_foreign_keys=ON")
        if conn.dialect.name == "postgresql":
            names = ", ".join(f'"{t.name}"' for t in SQLModel.metadata.sorted_tables)
            conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
        else:
            for table in reversed(SQLModel.metadata.sorted_tables):
                conn.execute(table.delete())
        if conn.dialect.name == "mysql":
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS=1")


@pytest.fixture(scope="session")
def _qrm_databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TestDatabase]]:
    created: dict[str, TestDatabase] = {}
    yield created
    for database in created.values():
        database.engine.dispose()
        database.cleanup()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "qrm_backends(*names): run this database test only on these backends (of those selected)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "qrm_backend" in metafunc.fixturenames:
        backends = selected_backends()
        marker = metafunc.definition.get_closest_marker("qrm_backends")
        if marker is not None:
            backends = [b for b in backends if b in marker.args] or list(marker.args[:1])
        metafunc.parametrize("qrm_backend", backends, scope="session")


@pytest.fixture
def qrm_db_url(
    qrm_backend: str, _qrm_databases: dict[str, TestDatabase], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    database = _qrm_databases.get(qrm_backend)
    if database is None:
        database = create_test_database(qrm_backend, tmp_path_factory.mktemp("db"))
        _qrm_databases[qrm_backend] = database
    yield database.url
    db.dispose_engines()
    empty_database(database.engine)


@pytest.fixture
def qrm_settings(qrm_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    data_dir = tmp_path / "data"
    for key in list(os.environ):
        if key.startswith("QRM_") and not key.startswith("QRM_TEST_"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("QRM_DATA_DIR", str(data_dir))
    monkeypatch.setenv("QRM_DATABASE_URL", qrm_db_url)
    monkeypatch.setenv("QRM_ACTOR", "tester")
    # A kernel in the developer's /boot must not make every 'qrm init' build an image.
    monkeypatch.setenv("QRM_INIT_BOOT_IMAGE", "false")
    reset_settings_cache()
    set_plugin_system(None)
    settings = Settings()
    yield settings
    set_plugin_system(None)
    reset_settings_cache()
    db.dispose_engines()


@pytest.fixture
def qrm_plugins(qrm_settings: Settings) -> Iterator[PluginSystem]:
    system = PluginSystem(qrm_settings, discover_plugins=False).load()
    set_plugin_system(system)
    yield system
    set_plugin_system(None)


@pytest.fixture
def qrm_ctx(qrm_settings: Settings, qrm_plugins: PluginSystem) -> Iterator[Any]:
    from qrm_core.services import service_context

    with service_context(qrm_settings, actor="tester", plugins=qrm_plugins) as ctx:
        yield ctx


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        import json

        return json.loads(self.stdout)


class CliRunner:
    """Runs ``qrm`` in this process with the test's settings."""

    def __call__(self, *args: str, input: str | None = None) -> CliResult:
        from qrm_core.cli import main as cli_main
        from qrm_core.cli import output

        out, err = io.StringIO(), io.StringIO()
        output._console = None
        old_stdin = sys.stdin
        if input is not None:
            sys.stdin = io.StringIO(input)
        try:
            with redirect_stdout(out), redirect_stderr(err):
                code = cli_main.main(list(args))
        finally:
            sys.stdin = old_stdin
            output._console = None
        return CliResult(exit_code=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture
def qrm_cli(qrm_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """``qrm`` as the user runs it: entry-point plugins are discovered too."""
    monkeypatch.setenv("COLUMNS", "200")
    return CliRunner()


@dataclass
class RunningServer:
    url: str
    server: Any
    settings: Settings
    plugins: PluginSystem

    def client(self, user: str | None = "qrm", password: str | None = "qrm", token: str | None = None) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        auth = (user, password or "") if user is not None and token is None else None
        return httpx.Client(base_url=self.url, auth=auth, headers=headers, timeout=30)

    def enrollment_token(self) -> str:
        from qrm_core.services import service_context, site

        with service_context(self.settings, plugins=self.plugins) as ctx:
            return site.get_enrollment_token(ctx)


@contextmanager
def running_server(
    settings: Settings, *, engine_interval: float = 0.2, plugins: PluginSystem | None = None
) -> Iterator[RunningServer]:
    """Run ``qrm server`` in this process (HTTP on 127.0.0.1, an ephemeral port),
    with the plugins found through entry points, or with ``plugins``."""
    from qrm_core.server import QrmServer
    from qrm_core.services import service_context, users

    plugins = plugins if plugins is not None else PluginSystem(settings).load()
    with service_context(settings, plugins=plugins) as ctx:
        users.ensure_admin(ctx, None)
    server = QrmServer(settings, plugins, "127.0.0.1", 0, engine_interval=engine_interval)
    thread = server.start_in_thread()
    try:
        yield RunningServer(
            url=f"http://127.0.0.1:{server.port}", server=server, settings=server.settings, plugins=plugins
        )
    finally:
        server.stop()
        thread.join(10)


@pytest.fixture
def qrm_server(qrm_settings: Settings) -> Iterator[RunningServer]:
    """A real ``qrm server`` (HTTP on 127.0.0.1, engine thread) on the test database.

    Plugins are discovered from entry points, as in production. The default
    admin ``qrm``/``qrm`` exists.
    """
    with running_server(qrm_settings) as server:
        yield server


# ---------------------------------------------------------------------------
# Schemathesis over the server's own OpenAPI document
# ---------------------------------------------------------------------------

#: Cases per operation and phase of :func:`fuzz_api` (about a minute on two cores).
FUZZ_EXAMPLES = 3

#: A rule between fields that JSON Schema cannot state is written in the
#: operation's description, and only the check that the server accepts every
#: request the schema allows is left out there.
FUZZ_CROSS_FIELD_RULES = [
    ("/api/v1/partitions", "POST"),  # max_cpus >= cpus, max_memory_mb >= memory_mb
    ("/api/v1/filesystem-images/capture", "POST"),  # identity or password, one of the two
    ("/api/v1/filesystem-images/{name}/capture", "POST"),  # identity or password, one of the two
]

#: Operations left out: changing the password of the user the run acts as
#: would lock the run out (tests/core/test_api.py and test_logins.py test it).
FUZZ_DISABLED_PATHS = ["/api/v1/users/{name}/password"]

FUZZ_CONFIG = """
seed = 20261205
workers = 1
max-failures = 50
color = false
generation.max-examples = {examples}
generation.database = "none"
phases.examples.enabled = true
phases.coverage.enabled = true
phases.fuzzing.enabled = true
phases.stateful.enabled = false

[auth.openapi.basicAuth]
username = "qrm"
password = "qrm"

[auth.openapi.enrollmentToken]
bearer = "{enrollment}"
{operations}
"""


@dataclass
class ApiFuzzRun:
    """A passed :func:`fuzz_api` run: schemathesis's output, and the document it ran over."""

    output: str
    document: dict[str, Any]
    plugins: PluginSystem


def fuzz_api(
    work: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    plugins: PluginSystem | None = None,
    examples: int = FUZZ_EXAMPLES,
) -> ApiFuzzRun:
    """Run schemathesis (every check, a fixed seed, ``examples`` cases per
    operation and phase, one worker) over the OpenAPI document of a real
    ``qrm server`` on :class:`Settings` from the environment, with the plugins
    found through entry points (or ``plugins``); fail the test unless every
    operation of the document but :data:`FUZZ_DISABLED_PATHS` was tested and
    none failed. The run is kept in a network namespace of its own (a storage
    check or a capture with a generated address must reach nothing): root only.
    """
    import shutil
    import subprocess

    from qrm_core.testkit import Netns, stop_process

    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is part of qrm-core[test]"
    if os.geteuid() != 0:
        missing(
            "root",
            "the run is kept in a network namespace of its own (a storage check or a capture "
            "with a generated address must reach nothing)",
        )
    # Wrong credentials are part of the run (the ignored_auth check): no
    # throttling of the run's own address (tests/core/test_logins.py tests it).
    monkeypatch.setenv("QRM_LOGIN_USER_FAILURES", "100000")
    monkeypatch.setenv("QRM_LOGIN_ADDRESS_FAILURES", "100000")
    reset_settings_cache()
    operations = "".join(
        f'\n[[operations]]\ninclude-path = "{path}"\nenabled = false\n' for path in FUZZ_DISABLED_PATHS
    ) + "".join(
        f'\n[[operations]]\ninclude-path = "{path}"\ninclude-method = "{method}"\n'
        "checks.positive_data_acceptance.enabled = false\n"
        for path, method in FUZZ_CROSS_FIELD_RULES
    )
    netns = Netns("fz")
    try:
        with contextlib.ExitStack() as stack:
            # The server's threads are started inside the namespace and stay there.
            server = netns.inside(lambda: stack.enter_context(running_server(Settings(), plugins=plugins)))

            def fetch_document() -> dict[str, Any]:
                with server.client(user=None) as client:
                    answer = client.get("/openapi.json")
                    answer.raise_for_status()
                    document: dict[str, Any] = answer.json()
                    return document

            document = netns.inside(fetch_document)
            config = work / "schemathesis.toml"
            config.write_text(
                FUZZ_CONFIG.format(
                    examples=examples, enrollment=server.enrollment_token(), operations=operations
                )
            )
            proc = netns.popen(
                [st, "--config-file", str(config), "run", f"{server.url}/openapi.json"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=work,
            )
            try:
                output, _ = proc.communicate(timeout=900)
            finally:
                stop_process(proc)
    finally:
        netns.delete()
    summary = output[-8000:]
    assert proc.returncode == 0, summary
    assert "Server error" not in output
    total = sum(len(methods) for methods in document["paths"].values())
    tested = total - sum(len(document["paths"].get(path, {})) for path in FUZZ_DISABLED_PATHS)
    assert f"Selected: {tested}/{total}" in output and f"Tested: {tested}\n" in output, summary
    return ApiFuzzRun(output=output, document=document, plugins=server.plugins)
