"""Browser tests of the web console: Playwright for Python driving Debian's
Chromium (``apt-get install chromium``; Playwright cannot download its own
browsers here) against a real ``qrm server`` with simulated agents.

One server, one database (SQLite) and one browser per module: the scenarios
build on each other the way a person's session would. Screenshots go to
``build/test-output/console/`` (``QRM_TEST_OUTPUT`` to change it).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qrm_core import db
from qrm_core.config import Settings
from qrm_core.lab.simulate import NodeSpec, Simulation
from qrm_core.testing import RunningServer, missing, running_server

ROOT = Path(__file__).resolve().parents[2]
AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    # Chromium's own background requests go nowhere (a dead proxy on loopback);
    # the pages under test are on 127.0.0.1, which bypasses it.
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=127.0.0.1",
]


def chromium_path() -> str:
    path = os.environ.get("QRM_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        missing("Chromium", "install Debian's chromium (scripts/system-packages.sh test)")
    return path


def output_dir() -> Path:
    out = Path(os.environ.get("QRM_TEST_OUTPUT", ROOT / "build" / "test-output")) / "console"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    path = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Playwright for Python", "pip install playwright (qrm-core's test extra)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


class Agents:
    """Simulated machines (the real agent protocol over HTTP) on their own thread."""

    def __init__(self, url: str, token: str, state_dir: Path) -> None:
        self.sim = Simulation(url, token, reboot_delay=0.3, interval_scale=0.05, fake_state_dir=state_dir)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True, name="agents")
        self.started = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self.started.set()
        await self.sim.run([])

    def add(self, *specs: NodeSpec) -> None:
        done = threading.Event()

        def add() -> None:
            for spec in specs:
                self.sim.add(spec)
            done.set()

        self.loop.call_soon_threadsafe(add)
        assert done.wait(10)

    def start(self) -> Agents:
        self.thread.start()
        self.started.wait(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.sim.stopping.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A real ``qrm server`` on its own SQLite database, with the default admin qrm/qrm."""
    data = tmp_path_factory.mktemp("console-data")
    settings = Settings(
        data_dir=data,
        database_url=f"sqlite:///{data / 'qrm.db'}",
        init_boot_image=False,
        heartbeat_interval=1.0,
        heartbeat_timeout=30.0,
        actor="tester",
    )
    engine = db.create_db_engine(settings.effective_database_url)
    db.upgrade(engine)
    engine.dispose()
    with running_server(settings, engine_interval=0.1) as server:
        yield server
    db.dispose_engines()


@pytest.fixture(scope="module")
def agents(console_server: RunningServer) -> Iterator[Agents]:
    sim = Agents(console_server.url, console_server.enrollment_token(), console_server.settings.state_dir)
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


class Pages:
    """Browser contexts (each its own cookies) on the console under test."""

    def __init__(self, browser: Any, url: str) -> None:
        self.browser = browser
        self.url = url
        self.contexts: list[Any] = []
        self.external: list[str] = []

    def new(self, *, phone: bool = False) -> Any:
        options: dict[str, Any] = {"base_url": self.url}
        if phone:
            options.update(
                viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
            )
        else:
            options.update(viewport={"width": 1366, "height": 860})
        context = self.browser.new_context(**options)
        context.set_default_timeout(10_000)

        def only_loopback(route: Any) -> None:
            if route.request.url.startswith(self.url):
                route.continue_()
            else:
                self.external.append(route.request.url)
                route.abort()

        context.route("**/*", only_loopback)
        self.contexts.append(context)
        page = context.new_page()
        page.on("dialog", lambda dialog: dialog.accept())
        return page

    def logged_in(self, user: str = "qrm", password: str = "qrm", **kwargs: Any) -> Any:
        page = self.new(**kwargs)
        page.goto("/login")
        page.get_by_label("User").fill(user)
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(re.compile(r".*/$"))
        return page

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def pages(chromium: Any, console_server: RunningServer) -> Iterator[Pages]:
    found = Pages(chromium, console_server.url)
    try:
        yield found
    finally:
        found.close()
    assert not found.external, f"the console asked for something beyond this server: {found.external}"


def screenshot(page: Any, name: str) -> Path:
    path = output_dir() / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def axe_violations(page: Any) -> list[str]:
    """WCAG 2 A/AA violations axe-core finds on the page (one line each)."""
    page.add_script_tag(content=AXE.read_text())
    result = page.evaluate(
        "async () => (await axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}})).violations"
        ".map(v => v.id + ': ' + v.help + ' (' + v.nodes.map(n => n.target.join(' ')).slice(0, 3).join(', ') + ')')"
    )
    return list(result)
