"""Capturing a running machine logged in to with root's password (issue 12, the article's
way), against a real sshd that allows password logins: root's password is set in a copy
of /etc/shadow bind-mounted over it in the machine's private mount namespace only (the
system's accounts are not touched). The password must reach ssh through qrm's askpass
helper and never show in an event, a log line, an error or an answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from qrm_core import remote
from qrm_core.errors import DriverError, InvalidInput
from qrm_core.models import Event, FilesystemImage
from qrm_core.services import images, service_context
from qrm_core.services import storage as storage_service
from qrm_core.testing import missing
from qrm_core.testkit import CaptureLab, make_root_tree, missing_storage_tools

PASSWORD = "Tr0ub4dor&3 with spaces'\"$(x)"
PORT = 2222


def _shadow() -> str:
    return hashlib.sha256(Path("/etc/shadow").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CaptureLab, Path]]:
    if os.geteuid() != 0:
        missing("root", "the capture tests run sshd in network namespaces")
    absent = missing_storage_tools("nsenter", "unshare", "sshd", "ssh", "ssh-keygen", "rsync", "openssl")
    if absent:
        missing("OpenSSH, rsync and openssl", f"apt-get install {' '.join(absent)}")
    before = _shadow()
    work = tmp_path_factory.mktemp("capture-password")
    root = make_root_tree(work / "machine-root", data_mb=2)
    machines = CaptureLab(work)
    try:
        machines.source.start_password_sshd(PASSWORD, PORT)
        assert _shadow() == before  # the bind mount lives in the machine's namespace only
        yield machines, root
    finally:
        machines.stop()
    assert _shadow() == before


@pytest.fixture
def plugins(qrm_plugins: Any, lab: tuple[CaptureLab, Path], monkeypatch: pytest.MonkeyPatch) -> Any:
    machines, _ = lab

    def runner(settings: Any, storage: Any) -> Any:
        return machines.runner(
            remote.runner_for(settings.data_dir, storage.name, storage.address, storage.settings)
        )

    monkeypatch.setattr(images, "storage_runner", runner)
    monkeypatch.setattr("qrm_core.drivers.fake.storage_runner", runner)
    return qrm_plugins


def ctx_for(settings: Any, plugins: Any) -> Any:
    return service_context(settings, actor="tester", plugins=plugins)


def _state(settings: Any, plugins: Any) -> tuple[list[str], int, dict[str, Any]]:
    with ctx_for(settings, plugins) as ctx:
        names = sorted(ctx.session.exec(select(FilesystemImage.name)).all())
        count = len(ctx.session.exec(select(Event)).all())
    fake = settings.state_dir / "fake-storage" / "local.json"
    return names, count, json.loads(fake.read_text()) if fake.exists() else {}


def _everything_said(settings: Any, plugins: Any) -> str:
    with ctx_for(settings, plugins) as ctx:
        events = [e.message for e in ctx.session.exec(select(Event)).all()]
        rows = [r.model_dump_json() for r in ctx.session.exec(select(FilesystemImage)).all()]
    return "\n".join(events + rows)


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_a_password_logs_in_and_a_wrong_one_makes_nothing(
    qrm_settings: Any, plugins: Any, lab: tuple[CaptureLab, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    machines, root = lab
    with ctx_for(qrm_settings, plugins) as ctx:
        storage_service.add_storage(ctx, name="local", type="fake", address="10.0.11.35")
    source = f"root@{machines.source.address}:{root}/"
    before = _state(qrm_settings, plugins)
    for wrong in ("not the password", PASSWORD + "x"):
        with ctx_for(qrm_settings, plugins) as ctx, pytest.raises(DriverError) as info:
            images.capture_filesystem_image(
                ctx, name="node1", storage="local", source=source, port=PORT, password=wrong
            )
        assert str(info.value) == f"the machine refused the password for root@{machines.source.address}"
        assert _state(qrm_settings, plugins) == before
    for bad, said in (
        ("two\nlines", "one line"),
        ("", "empty"),
        ("x" * 1025, "longer than"),
        ("\ud800", "Unicode"),
    ):
        with ctx_for(qrm_settings, plugins) as ctx, pytest.raises(InvalidInput, match=said):
            images.capture_filesystem_image(ctx, name="node1", storage="local", source=source, password=bad)
    with ctx_for(qrm_settings, plugins) as ctx, pytest.raises(InvalidInput, match="not both"):
        images.capture_filesystem_image(
            ctx, name="node1", storage="local", source=source, password=PASSWORD, identity="k"
        )
    assert _state(qrm_settings, plugins) == before

    exposed: list[str] = []
    seen: list[str] = []

    def look_in_proc(line: str) -> None:
        """While the job runs: no process has the password in its command line or environment."""
        seen.append(line)
        for entry in Path("/proc").iterdir():
            for part in ("cmdline", "environ"):
                try:
                    data = (entry / part).read_bytes()
                except OSError:
                    continue
                if PASSWORD.encode() in data:
                    exposed.append(f"{entry.name}/{part}")

    with ctx_for(qrm_settings, plugins) as ctx:
        result = images.capture_filesystem_image(
            ctx, name="node1", storage="local", source=source, port=PORT, password=PASSWORD, every=0,
            progress=look_in_proc,
        )  # fmt: skip
    assert not exposed, exposed
    assert any("files" in line for line in seen), seen  # looked while rsync copied
    assert (result.state, result.origin) == ("ready", "captured")
    tree = qrm_settings.state_dir / "fake-storage" / "local.trees" / result.location.strip("/")
    assert (tree / "etc/hostname").read_bytes() == (root / "etc/hostname").read_bytes()
    # A resume logs in with the password as well.
    with ctx_for(qrm_settings, plugins) as ctx:
        again = images.run_capture(ctx, "node1", password=PASSWORD)
    assert again.state == "ready"
    said = _everything_said(qrm_settings, plugins) + result.model_dump_json() + caplog.text
    assert PASSWORD not in said and "captured from" in said


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_the_command_reads_a_private_password_file(
    qrm_settings: Any, qrm_cli: Any, plugins: Any, lab: tuple[CaptureLab, Path], tmp_path: Path
) -> None:
    machines, root = lab
    assert qrm_cli("storage", "add", "-n", "local", "-t", "fake", "-i", "10.0.11.35").exit_code == 0
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    source = f"{machines.source.address}:{root}"
    secret.chmod(0o644)
    loose = qrm_cli(
        "filesystem-image", "create", "-s", "local", "-l", source, "-n", "n1", "--port", str(PORT),
        "--password-file", str(secret),
    )  # fmt: skip
    assert loose.exit_code != 0 and "can be read by others (mode 644); chmod 600 it" in loose.stderr
    assert len(loose.stderr.strip().splitlines()) == 1, loose.stderr
    secret.chmod(0o600)
    done = qrm_cli(
        "filesystem-image", "create", "-s", "local", "-l", source, "-n", "n1", "--port", str(PORT),
        "--password-file", str(secret), "-o", "json",
    )  # fmt: skip
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "ready"
    assert PASSWORD not in done.stdout + done.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    wrong.chmod(0o600)
    refused = qrm_cli(
        "filesystem-image", "create", "-s", "local", "-l", source, "-n", "n2", "--port", str(PORT),
        "--password-file", str(wrong),
    )  # fmt: skip
    assert refused.exit_code != 0
    lines = [line for line in refused.stderr.splitlines() if line.strip() and "logging in" not in line]
    assert lines == [f"error: the machine refused the password for root@{machines.source.address}"], lines
    # No terminal, no key, no password file: one line saying what to give.
    both = qrm_cli(
        "filesystem-image", "create", "-s", "local", "-l", source, "-n", "n3", "--ask-password",
    )  # fmt: skip
    assert both.exit_code != 0 and "no terminal" in both.stderr


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_the_api_takes_the_password_and_never_returns_it(
    qrm_server: Any, plugins: Any, lab: tuple[CaptureLab, Path]
) -> None:
    import time

    machines, root = lab
    with qrm_server.client() as api:
        assert (
            api.post(
                "/api/v1/storage", json={"name": "st", "type": "fake", "address": "10.0.11.35"}
            ).status_code
            == 201
        )
        body = {
            "name": "node1", "storage": "st", "source": f"root@{machines.source.address}:{root}/",
            "port": PORT, "password": PASSWORD,
        }  # fmt: skip
        refused = api.post("/api/v1/filesystem-images/capture", json={**body, "password": "wrong"})
        assert refused.status_code == 502, refused.text
        assert refused.json()["error"]["message"] == (
            f"the machine refused the password for root@{machines.source.address}"
        )
        assert api.get("/api/v1/filesystem-images/node1").status_code == 404
        too_long = api.post("/api/v1/filesystem-images/capture", json={**body, "password": PASSWORD * 100})
        assert too_long.status_code == 422 and PASSWORD not in too_long.text
        started = api.post("/api/v1/filesystem-images/capture", json=body)
        assert started.status_code == 202, started.text
        deadline = time.monotonic() + 120
        while (shown := api.get("/api/v1/filesystem-images/node1").json())["state"] == "creating":
            assert time.monotonic() < deadline, shown
            time.sleep(0.2)
        assert shown["state"] == "ready", shown
        neither = api.post("/api/v1/filesystem-images/node1/capture", json={})
        assert neither.status_code == 422 and "one of the two" in neither.text
        answers = started.text + json.dumps(shown) + api.get("/api/v1/events").text
        assert PASSWORD not in answers and json.dumps(PASSWORD)[1:-1] not in answers


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_the_password_goes_to_the_storage_server_that_copies(
    qrm_settings: Any, plugins: Any, lab: tuple[CaptureLab, Path]
) -> None:
    """rsync runs on a storage server qrm manages over SSH: the storage server logs in to the
    machine with the password (it went there inside the job's script), and leaves nothing."""
    machines, root = lab
    with ctx_for(qrm_settings, plugins) as ctx:
        ssh = storage_service.SshChange(
            user="root",
            key=machines.storage_key.read_text(),
            host_key=machines.storage_known.split(None, 1)[1],
        )
        storage_service.add_storage(ctx, name="san", type="fake", address=machines.storage.address, ssh=ssh)
    source = f"root@{machines.source.address}:{root}/"
    with ctx_for(qrm_settings, plugins) as ctx, pytest.raises(DriverError) as info:
        images.capture_filesystem_image(
            ctx, name="node1", storage="san", source=source, port=PORT, password="no"
        )
    assert str(info.value) == f"the machine refused the password for root@{machines.source.address}"
    accepted = f"Accepted password for root from {machines.storage.address}"
    before = machines.source.log("sshd-password").count(accepted)
    with ctx_for(qrm_settings, plugins) as ctx:
        result = images.capture_filesystem_image(
            ctx, name="node1", storage="san", source=source, port=PORT, password=PASSWORD
        )
    assert result.state == "ready"
    assert machines.source.log("sshd-password").count(accepted) > before
    tree = qrm_settings.state_dir / "fake-storage" / "san.trees" / result.location.strip("/")
    assert (tree / "etc/hostname").read_bytes() == (root / "etc/hostname").read_bytes()
    assert not list(Path("/tmp").glob("qrm-capture.*"))
    assert PASSWORD not in _everything_said(qrm_settings, plugins)


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_the_command_asks_for_the_password_on_a_terminal_when_there_is_no_key(
    qrm_cli: Any, plugins: Any, lab: tuple[CaptureLab, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The article's way: no key, a terminal: ssh-like prompt, the answer not echoed (getpass)."""
    import getpass
    import io
    import sys

    machines, root = lab
    assert qrm_cli("storage", "add", "-n", "local", "-t", "fake", "-i", "10.0.11.35").exit_code == 0
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/id_* here
    source = f"{machines.source.address}:{root}"
    no_terminal = qrm_cli("filesystem-image", "create", "-s", "local", "-l", source, "-n", "n1")
    assert no_terminal.exit_code != 0 and "--password-file FILE" in no_terminal.stderr
    assert len(no_terminal.stderr.strip().splitlines()) == 1, no_terminal.stderr

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    prompts: list[str] = []

    def ask(prompt: str = "Password: ", stream: Any = None) -> str:
        prompts.append(prompt)
        return PASSWORD

    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr(getpass, "getpass", ask)
    done = qrm_cli("filesystem-image", "create", "-s", "local", "-l", source, "-n", "n1", "--port", str(PORT))
    assert done.exit_code == 0, done.stderr
    assert prompts == [f"root@{machines.source.address}'s password: "]
    assert PASSWORD not in done.stdout + done.stderr
    again = qrm_cli("filesystem-image", "capture", "n1", "--ask-password")
    assert again.exit_code == 0, again.stderr
    assert prompts[-1] == "password of the machine n1 was captured from: "
