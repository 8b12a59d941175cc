"""The console's capture form with a password instead of a key (issue 12, the article's
way), in a real browser (Debian's Chromium through Playwright) against a real ``qrm
server``: the machine is a network namespace whose sshd lets root in with a password
only (set in a copy of /etc/shadow bind-mounted in that namespace alone). The password
must log in, and never come back: not in the form sent back after a refusal, not on a
page, in an event, a row, or a log line of the server."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect
from sqlmodel import select

from qrm_core import remote
from qrm_core.models import Event, FilesystemImage
from qrm_core.services import images, service_context
from qrm_core.services import storage as storage_service
from qrm_core.testing import RunningServer, missing
from qrm_core.testkit import CaptureLab, make_root_tree, missing_storage_tools

from .conftest import Pages

pytestmark = pytest.mark.slow
PASSWORD = "c0nsole pa$$word 'with' \"quotes\""
PORT = 2222


@pytest.fixture(scope="module")
def machine(
    console_server: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """The machine to capture, and the server's storage driver running where it reaches it."""
    if os.geteuid() != 0:
        missing("root", "the capture tests run sshd in network namespaces")
    absent = missing_storage_tools("nsenter", "unshare", "sshd", "ssh", "ssh-keygen", "rsync", "openssl")
    if absent:
        missing("OpenSSH, rsync and openssl", f"apt-get install {' '.join(absent)}")
    work = tmp_path_factory.mktemp("console-capture")
    root = make_root_tree(work / "machine-root", data_mb=1)
    lab = CaptureLab(work)
    try:
        lab.source.start_password_sshd(PASSWORD, PORT)

        def runner(settings: Any, storage: Any) -> Any:
            return lab.runner(
                remote.runner_for(settings.data_dir, storage.name, storage.address, storage.settings)
            )

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(images, "storage_runner", runner)
            patch.setattr("qrm_core.drivers.fake.storage_runner", runner)
            with service_context(console_server.settings, plugins=console_server.plugins) as ctx:
                storage_service.add_storage(ctx, name="local", type="fake", address="10.0.11.35")
            yield f"root@{lab.source.address}:{root}/", root
    finally:
        lab.stop()


def _everything_kept(server: RunningServer) -> str:
    with service_context(server.settings, plugins=server.plugins) as ctx:
        events = [e.message for e in ctx.session.exec(select(Event)).all()]
        rows = [r.model_dump_json() for r in ctx.session.exec(select(FilesystemImage)).all()]
    return "\n".join(events + rows)


def test_capture_with_a_password_from_the_console(
    pages: Pages, console_server: RunningServer, machine: tuple[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source, root = machine
    page = pages.logged_in()
    page.goto("/filesystem-images/capture")
    page.get_by_label("Name").fill("node1")
    page.get_by_label("Storage server").select_option("local")
    page.get_by_label("Machine to capture").fill(source)
    page.get_by_label("SSH port").fill(str(PORT))
    page.get_by_label("... or the password that logs in there").fill(PASSWORD + "x")
    page.get_by_role("button", name="Capture").click()
    expect(page.locator("#e-source")).to_contain_text(
        f"the machine refused the password for {source.split(':')[0]}"
    )
    expect(page.get_by_label("... or the password that logs in there")).to_have_value("")  # never sent back
    with service_context(console_server.settings, plugins=console_server.plugins) as ctx:
        assert "node1" not in [f.name for f in storage_service.list_filesystem_images(ctx)]

    page.get_by_label("... or the password that logs in there").fill(PASSWORD)
    page.get_by_role("button", name="Capture").click()
    page.wait_for_url("**/filesystem-images/node1")
    expect(page.locator("#fs-live .lead .state")).to_have_text("ready", timeout=60_000)
    with service_context(console_server.settings, plugins=console_server.plugins) as ctx:
        image = storage_service.show_filesystem_image(ctx, "node1")
    tree = console_server.settings.state_dir / "fake-storage" / "local.trees" / image.location.strip("/")
    assert (tree / "home" / "alice" / "notes").read_text() == (root / "home" / "alice" / "notes").read_text()

    # Nowhere to be found again: the pages, the records, the server's log.
    for url in ("/filesystem-images/node1", "/filesystem-images/capture", "/events"):
        page.goto(url)
        assert PASSWORD not in page.content() and "c0nsole" not in page.content(), url
    assert PASSWORD not in _everything_kept(console_server) and "c0nsole" not in _everything_kept(
        console_server
    )
    assert "c0nsole" not in caplog.text
