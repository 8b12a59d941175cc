"""Storage servers qrm manages over SSH: qrm_core.remote against a real sshd (a storage host
in its own network namespace, throwaway host and user keys), and ``qrm storage add|set``
with SSH options and driver settings: checked before anything is kept, one line when
refused, the key never shown.

The storage driver here is the fake one with a real ``check_server``: it runs a script on
the server through :func:`qrm_core.remote.storage_runner` (the plugins' real drivers are
tested against tgt and ganesha in their own packages).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from qrm_core import remote
from qrm_core.drivers.base import StorageTarget
from qrm_core.drivers.fake import FakeStorage
from qrm_core.errors import AlreadyExists, DriverError, InvalidInput, NotFound
from qrm_core.models import StorageServer
from qrm_core.plugins import STORAGE_GROUP
from qrm_core.services import events, service_context
from qrm_core.services import storage as storage_service
from qrm_core.testing import missing
from qrm_core.testkit import StorageHost, missing_storage_tools

ADDRESS = "10.231.13.35"


class SshProbeStorage(FakeStorage):
    """The fake storage, with a check_server that really logs in and runs a script."""

    name = "sshprobe"
    description = "fake storage whose check logs in to the server"

    #: The storage host's network: ssh runs there (the database stays in this one).
    host: StorageHost | None = None

    def check_server(self, storage: StorageTarget) -> None:
        # On the storage host, sshd's /run/sshd is there; this machine (--local) has none.
        runner = remote.storage_runner(self.settings, storage)
        remote_one = remote.is_remote_storage(storage.settings)
        script = "id -un; test -d /run/sshd && echo ready\n" if remote_one else "id -un\n"
        done = self.host.netns.inside(lambda: runner.script(script)) if self.host else runner.script(script)
        wanted = (
            [storage.settings["ssh_user"], "ready"]
            if remote.is_remote_storage(storage.settings)
            else ["root"]
        )
        if done.stdout.split() != wanted:
            raise DriverError(f"storage server {storage.name} is not ready: {done.last_error()}")


@dataclass
class Host:
    host: StorageHost
    user_key: Path
    known: str
    other_key: Path

    def on(self, work: Any) -> Any:
        return self.host.netns.inside(work)


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    if os.geteuid() != 0:
        missing("root", "the SSH tests run sshd in a network namespace")
    absent = missing_storage_tools("nsenter", "unshare", "sshd", "ssh", "ssh-keygen")
    if absent:
        missing("OpenSSH", f"apt-get install {' '.join(absent)}")
    work = tmp_path_factory.mktemp("sshhost")
    host = StorageHost("ssh", work / "host", ADDRESS)
    try:
        user_key, known = host.start_sshd()
        other = work / "other"
        import subprocess

        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
        yield Host(host, user_key, known, other)
    finally:
        host.stop()


@pytest.fixture
def plugins(qrm_plugins: Any, ssh_host: Host) -> Any:
    driver = SshProbeStorage(qrm_plugins.settings)
    driver.host = ssh_host.host
    qrm_plugins.add_driver(STORAGE_GROUP, driver)
    return qrm_plugins


def ctx_for(settings: Any, plugins: Any) -> Any:
    return service_context(settings, actor="tester", plugins=plugins)


def add(core: Any, plugins: Any, ssh_host: Host, **kwargs: Any) -> Any:
    options: dict[str, Any] = {"name": "san", "type": "sshprobe", "address": ADDRESS}
    options.update(kwargs)

    with ctx_for(core, plugins) as ctx:
        return storage_service.add_storage(ctx, **options)


def key_files(settings: Any, name: str = "san") -> tuple[Path, Path]:
    return remote.key_file(settings.data_dir, name), remote.known_hosts_file(settings.data_dir, name)


# ---------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------


def test_scripts_run_here_or_over_ssh(ssh_host: Host, tmp_path: Path) -> None:
    local = remote.LocalRunner()
    done = local.script("echo $((6 * 7)); echo secret-123 >&2; exit 3\n", secrets=["secret-123"])
    assert (done.returncode, done.stdout, done.stderr) == (3, "42\n", "********\n")
    data = tmp_path / "data"
    remote.install_key(data, "st", ssh_host.user_key.read_text())
    assert stat.S_IMODE(remote.key_file(data, "st").stat().st_mode) == 0o600
    over = remote.runner_for(data, "st", ADDRESS, {"ssh_user": "root"})
    assert over.where == f"root@{ADDRESS}"
    done = ssh_host.on(
        lambda: over.script("ip -o -4 addr show dev lo | grep -c " + remote.shell_quote(ADDRESS) + "\n")
    )
    assert done.ok and done.stdout.strip() == "1"  # it ran on the storage host
    # The host key was pinned on first use; the exit status comes through.
    assert ADDRESS in remote.known_hosts_file(data, "st").read_text()
    assert ssh_host.on(lambda: over.script("exit 5\n")).returncode == 5
    # A value with shell metacharacters stays one word.
    hostile = "a b; touch /tmp/qrm-owned-$$ `id`"
    assert ssh_host.on(lambda: over.script(f"printf '%s' {remote.shell_quote(hostile)}\n")).stdout == hostile


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"settings": {"ssh_user": "root", "ssh_port": "2222"}}, "nothing listens on its SSH port 2222"),
        ({"key": "other"}, "the server refused qrm's SSH key (is it in root's authorized_keys?)"),
        ({"known": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOmvDQm0Zfm5CJRvq3p1aQZ1cN0pY2FxY2FxY2FxY2Fx"},
         "its SSH host key is not the one qrm pinned (refused; see"),
        ({"address": "10.231.13.99"}, "cannot reach storage server st (root@10.231.13.99)"),
    ],
)  # fmt: skip
def test_ssh_failures_are_one_line_naming_the_server(
    ssh_host: Host, tmp_path: Path, change: dict[str, Any], says: str
) -> None:
    data = tmp_path / "data"
    key = ssh_host.other_key if change.get("key") == "other" else ssh_host.user_key
    remote.install_key(data, "st", key.read_text())
    if "known" in change:
        remote.pin_host_key(data, "st", ADDRESS, 22, change["known"])
    settings = change.get("settings", {"ssh_user": "root"})
    runner = remote.runner_for(data, "st", change.get("address", ADDRESS), settings)
    with pytest.raises(DriverError) as caught:
        ssh_host.on(lambda: runner.script("true\n", timeout=60))
    assert says in caught.value.message and "\n" not in caught.value.message
    assert caught.value.message.startswith("cannot reach storage server st (root@")


def test_keys_and_host_keys_are_checked_before_they_are_kept(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="must be a private key file"):
        remote.install_key(tmp_path, "st", "ssh-ed25519 AAAA... a public key")
    with pytest.raises(InvalidInput, match="invalid storage server name"):
        remote.install_key(tmp_path, "../st", "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n")
    with pytest.raises(InvalidInput, match="TYPE BASE64"):
        remote.pin_host_key(tmp_path, "st", ADDRESS, 22, "not a key")
    with pytest.raises(InvalidInput, match="base64 part is malformed"):
        remote.pin_host_key(tmp_path, "st", ADDRESS, 22, "ssh-ed25519 AAA$(reboot)")
    for user in ("root;x", "-oProxyCommand=x", "ROOT", ""):
        with pytest.raises(InvalidInput, match="is not a user name"):
            remote.check_user(user)
    assert not (tmp_path / "keys").exists() or not any((tmp_path / "keys").iterdir())


# ---------------------------------------------------------------------------
# qrm storage add | set
# ---------------------------------------------------------------------------


def test_a_remote_storage_server_is_checked_kept_and_shown_without_its_key(
    qrm_settings: Any, plugins: Any, ssh_host: Host
) -> None:
    key_text = ssh_host.user_key.read_text()
    ssh = storage_service.SshChange(user="root", key=key_text, host_key=ssh_host.known)
    shown = add(
        qrm_settings, plugins, ssh_host, ssh=ssh, settings={"backing_dir": "/srv/luns"}, comment="QRMSRC"
    )
    assert shown.managed_from == f"root@{ADDRESS}" and shown.settings == {
        "ssh_user": "root",
        "backing_dir": "/srv/luns",
    }
    key, known = key_files(qrm_settings)
    assert key.read_text().strip() == key_text.strip() and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert known.read_text().split()[:2] == [ADDRESS, "ssh-ed25519"]
    with ctx_for(qrm_settings, plugins) as ctx:
        messages = [e.message for e in events.list_events(ctx, limit=10)]
        row = ctx.session.exec(select(StorageServer).where(StorageServer.name == "san")).one()
    assert any(
        f"storage server san added (sshprobe at {ADDRESS}, managed over SSH as root@{ADDRESS})" in m
        for m in messages
    )
    secret_part = key_text.splitlines()[1]
    assert secret_part not in json.dumps(shown.model_dump(mode="json")) + "".join(messages) + json.dumps(
        row.settings
    )
    with pytest.raises(AlreadyExists):
        add(qrm_settings, plugins, ssh_host, ssh=ssh)
    assert key.read_text().strip() == key_text.strip()  # the refused duplicate did not touch it

    # set: another setting, a refused change (the wrong key) that keeps the old state, --local.
    def set_(**kwargs: Any) -> Any:
        with ctx_for(qrm_settings, plugins) as ctx:
            return storage_service.set_storage(ctx, "san", **kwargs)

    changed = set_(settings={"volume_group": "vg0"}, unset=["backing_dir"])
    assert changed.settings == {"ssh_user": "root", "volume_group": "vg0"}
    with pytest.raises(
        DriverError, match=r"^cannot reach storage server san \(root@10.231.13.35\): the server refused"
    ):
        set_(ssh=storage_service.SshChange(key=ssh_host.other_key.read_text()))
    assert key.read_text().strip() == key_text.strip() and known.exists()
    with pytest.raises(DriverError, match="nothing listens on its SSH port 2200"):
        set_(ssh=storage_service.SshChange(port=2200), settings={"backing_dir": "/x"})
    with ctx_for(qrm_settings, plugins) as ctx:
        assert storage_service.show_storage(ctx, "san").settings == {
            "ssh_user": "root",
            "volume_group": "vg0",
        }
    local = set_(ssh=storage_service.SshChange(local=True))
    assert local.managed_from == "this machine" and local.settings == {"volume_group": "vg0"}
    assert not key.exists() and not known.exists()
    # Back to SSH, then removed: the key goes with the server.
    set_(ssh=storage_service.SshChange(user="root", key=key_text))
    with ctx_for(qrm_settings, plugins) as ctx:
        storage_service.remove_storage(ctx, "san")
    assert not key.exists() and not known.exists()


def test_a_server_that_does_not_answer_is_refused_and_nothing_is_kept(
    qrm_settings: Any, plugins: Any, ssh_host: Host
) -> None:
    ssh = storage_service.SshChange(user="root", key=ssh_host.user_key.read_text(), port=2201)
    with pytest.raises(DriverError) as caught:
        add(qrm_settings, plugins, ssh_host, ssh=ssh)
    assert caught.value.message == (
        f"cannot reach storage server san (root@{ADDRESS}:2201): nothing listens on its SSH port 2201"
    )
    with ctx_for(qrm_settings, plugins) as ctx:
        assert storage_service.list_storage(ctx) == []
    assert not any(p.exists() for p in key_files(qrm_settings))
    # --no-check keeps it anyway (the server is not up yet).
    kept = add(qrm_settings, plugins, ssh_host, ssh=ssh, check=False)
    assert kept.managed_from == f"root@{ADDRESS}:2201"


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"settings": {"Bad-Key": "x"}}, "storage setting name 'Bad-Key' must be"),
        ({"settings": {"ok": "two\nlines"}}, "storage setting ok: the value must be 1-255 printable characters"),
        ({"settings": {"ok": ""}}, "storage setting ok: the value must be"),
        ({"settings": {"ssh_user": "root"}}, "set ssh_user with --ssh-user, not as a setting"),
        ({"ssh": storage_service.SshChange(key="-----BEGIN OPENSSH PRIVATE KEY-----\nx\n")},
         "give the SSH user (--ssh-user) that qrm logs in as"),
        ({"ssh": storage_service.SshChange(user="root")}, "storage server san is reached over SSH: give qrm the key"),
        ({"ssh": storage_service.SshChange(user="root;reboot")}, "SSH user 'root;reboot' is not a user name"),
        ({"ssh": storage_service.SshChange(user="root", port=0)}, "SSH port 0 must be a number from 1 to 65535"),
        ({"ssh": storage_service.SshChange(local=True, user="root")}, "--local makes the storage server this machine"),
    ],
)  # fmt: skip
def test_bad_storage_options_are_one_line_and_change_nothing(
    qrm_settings: Any, plugins: Any, ssh_host: Host, kwargs: dict[str, Any], says: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        add(qrm_settings, plugins, ssh_host, **kwargs)
    assert caught.value.message.startswith(says) and "\n" not in caught.value.message
    with ctx_for(qrm_settings, plugins) as ctx:
        assert storage_service.list_storage(ctx) == []
    assert not any(p.exists() for p in key_files(qrm_settings))


def test_set_refuses_what_does_not_exist(qrm_settings: Any, plugins: Any, ssh_host: Host) -> None:
    add(qrm_settings, plugins, ssh_host, type="fake", settings={"a": "1"})
    with ctx_for(qrm_settings, plugins) as ctx:
        with pytest.raises(NotFound, match="storage server 'nosuch' does not exist"):
            storage_service.set_storage(ctx, "nosuch", settings={"a": "2"})
        with pytest.raises(NotFound, match="storage server san has no setting 'b'"):
            storage_service.set_storage(ctx, "san", unset=["b"])
        with pytest.raises(InvalidInput, match="nothing to change"):
            storage_service.set_storage(ctx, "san")
        # What it has already: nothing to do, nothing recorded.
        assert storage_service.set_storage(ctx, "san", settings={"a": "1"}).settings == {"a": "1"}
        assert storage_service.show_storage(ctx, "san").settings == {"a": "1"}


def test_the_commands(qrm_settings: Any, qrm_cli: Any, ssh_host: Host, tmp_path: Path) -> None:
    """``qrm storage add ... --ssh-key FILE --ssh-user root --setting k=v`` and ``qrm storage set``."""
    shutil.copyfile(ssh_host.user_key, tmp_path / "key")
    (tmp_path / "host.pub").write_text(ssh_host.known.split(" ", 1)[1] + "\n")
    added = (
        qrm_cli(
            "storage", "add", "-n", "NFS", "-t", "fake", "-i", ADDRESS, "-c", "QRMSRC",
            "--ssh-key", str(tmp_path / "key"), "--ssh-user", "root", "--ssh-host-key", str(tmp_path / "host.pub"),
            "--setting", "export_root=/srv/nfs",
        )
    )  # fmt: skip
    assert added.exit_code == 0, added.stderr
    assert (
        added.stdout.strip()
        == f"added storage server NFS (fake at {ADDRESS}, managed over SSH as root@{ADDRESS})"
    )
    shown = qrm_cli("storage", "show", "NFS", "-o", "json").json()
    assert shown["settings"] == {"ssh_user": "root", "export_root": "/srv/nfs"}
    assert "PRIVATE KEY" not in json.dumps(shown)
    listed = qrm_cli("storage", "list")
    assert f"root@{ADDRESS}" in listed.stdout
    changed = qrm_cli("storage", "set", "NFS", "--setting", "export_root=/srv/other", "--local")
    assert changed.exit_code == 0, changed.stderr
    assert changed.stdout.strip() == "storage server NFS: managed from this machine; export_root=/srv/other"
    for args, says in (
        (["storage", "set", "NFS", "--setting", "novalue"], "--setting 'novalue': give KEY=VALUE"),
        (
            ["storage", "set", "NFS", "--ssh-key", str(tmp_path / "nokey"), "--ssh-user", "root"],
            "cannot read the SSH key",
        ),
        (["storage", "add", "-n", "X", "-t", "fake", "-i", ADDRESS, "--ssh-port", "22"], "give the SSH user"),
    ):
        bad = qrm_cli(*args)
        assert bad.exit_code == 1 and bad.stderr.count("\n") == 1 and says in bad.stderr, bad.stderr


def test_the_api_gives_ssh_access_to_admins_only(qrm_server: Any, ssh_host: Host) -> None:
    from qrm_core.services import users

    with service_context(qrm_server.settings, plugins=qrm_server.plugins) as ctx:
        users.create_user(ctx, name="op1", password="pw-" + "x" * 8, role="operator")
    key_text = ssh_host.user_key.read_text()
    body = {"name": "san", "type": "fake", "address": ADDRESS, "ssh_user": "root", "ssh_key": key_text}
    with qrm_server.client("op1", "pw-" + "x" * 8) as operator:
        refused = operator.post("/api/v1/storage", json=body)
        assert (
            refused.status_code == 403 and "may not give qrm SSH access" in refused.json()["error"]["message"]
        )
        assert (
            operator.post("/api/v1/storage", json={**body, "ssh_user": None, "ssh_key": None}).status_code
            == 201
        )
        plain = operator.patch("/api/v1/storage/san", json={"settings": {"export_root": "/srv/nfs"}})
        assert plain.status_code == 200 and plain.json()["settings"] == {"export_root": "/srv/nfs"}
    with qrm_server.client() as admin:
        # The server runs outside the storage host's network: the check is skipped here (tested above).
        given = admin.patch(
            "/api/v1/storage/san", json={"ssh_user": "root", "ssh_key": key_text, "check": False}
        )
        assert given.status_code == 200, given.text
        assert given.json()["managed_from"] == f"root@{ADDRESS}" and "PRIVATE" not in given.text
        bad = admin.patch("/api/v1/storage/san", json={"settings": {"x": "a\nb"}})
        assert bad.status_code == 422 and "the value must be 1-255 printable characters" in bad.text
        none = admin.patch("/api/v1/storage/san", json={})
        assert none.status_code == 422 and "nothing to change" in none.text
    assert remote.key_file(qrm_server.settings.data_dir, "san").read_text().strip() == key_text.strip()
