"""``qrm vmware connect|list|show|remove`` against real simulated vCenters (vcsim).

Each TLS case runs its own simulator with the certificate under test: a
server certificate signed by a private CA (trusted with --ca-file), a
self-signed one (refused unless --insecure).
"""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import certs
import pytest
import vcsimkit as kit

from qrm_core.services import service_context

PASSWORD_MARK = "Sekr3t-p4ss"


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls")


@pytest.fixture(scope="module")
def ca_vcsim(vcsim_binary: Path, tls_dir: Path):
    """A vCenter whose certificate a private CA signed; its password is PASSWORD_MARK."""
    ca, cert, key = certs.ca_signed(tls_dir)
    sim = kit.start(
        vcsim_binary,
        "-cert",
        str(cert),
        "-key",
        str(key),
        "-password",
        PASSWORD_MARK,
        "-cluster",
        "0",
        "-standalone-host",
        "1",
        "-vm",
        "0",
    )
    try:
        yield sim, ca
    finally:
        sim.stop()


@pytest.fixture(scope="module")
def self_signed_vcsim(vcsim_binary: Path, tls_dir: Path):
    cert, key = certs.self_signed(tls_dir)
    sim = kit.start(
        vcsim_binary, "-cert", str(cert), "-key", str(key), "-cluster", "0", "-standalone-host", "1"
    )
    try:
        yield sim
    finally:
        sim.stop()


def _everything_logged(settings) -> str:
    logs = settings.effective_log_dir
    return "".join(p.read_text(errors="replace") for p in logs.glob("*.log")) if logs.exists() else ""


def test_connect_with_a_trusted_certificate(qrm_cli, qrm_settings, ca_vcsim) -> None:
    sim, ca = ca_vcsim
    r = qrm_cli(
        "vmware",
        "connect",
        "-n",
        "vc1",
        "--url",
        sim.url,
        "-u",
        sim.username,
        "-p",
        PASSWORD_MARK,
        "--ca-file",
        str(ca),
        "-o",
        "json",
    )
    assert r.exit_code == 0, r.stderr
    shown = r.json()
    assert shown["url"] == sim.url and shown["username"] == "user"
    assert shown["certificate_check"] == "on" and shown["api_type"] == "VirtualCenter"
    assert shown["instance_uuid"]
    listing = qrm_cli("vmware", "list", "-o", "json")
    assert [c["name"] for c in listing.json()] == ["vc1"]
    table = qrm_cli("vmware", "list")
    assert "vc1" in table.stdout and sim.url in table.stdout
    # The password is nowhere a user or an operator can see it: not in any
    # output, event or log line, and not in the database in clear.
    events = qrm_cli("events", "-o", "json").json()
    assert any("vCenter connection vc1 added" in e["message"] for e in events)
    seen = r.stdout + listing.stdout + table.stdout + json.dumps(events) + _everything_logged(qrm_settings)
    seen += qrm_cli("vmware", "show", "vc1", "-o", "json").stdout + qrm_cli("vmware", "show", "vc1").stdout
    assert PASSWORD_MARK not in seen
    import sqlalchemy as sa

    engine = sa.create_engine(qrm_settings.effective_database_url)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT value FROM plugin_data WHERE plugin = 'vmware'")).scalar_one()
    engine.dispose()
    assert PASSWORD_MARK not in str(stored)
    key_file = qrm_settings.data_dir / "vmware-site.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # The stored password works: the connection decrypts and logs in.
    from qrm_vmware import vsphere
    from qrm_vmware.connections import ConnectionStore
    from qrm_vmware.settings import load

    with service_context(qrm_settings) as ctx:
        connection = ConnectionStore(qrm_settings, load()).get(ctx, "vc1")
    assert connection.password == PASSWORD_MARK and PASSWORD_MARK not in repr(connection)
    session = vsphere.Session(connection, load()).login()
    assert session.about.apiType == "VirtualCenter"
    session.logout()


def test_a_bad_password_is_refused_in_one_line(qrm_cli, ca_vcsim) -> None:
    sim, ca = ca_vcsim
    r = qrm_cli(
        "vmware", "connect", "-n", "vc1", "--url", sim.url, "-u", "user", "-p", "wrong", "--ca-file", str(ca)
    )
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [f"error: vCenter refused the login for user ({sim.url})"]
    assert qrm_cli("vmware", "list", "-o", "json").json() == []


def test_an_unreachable_vcenter_is_one_line(qrm_cli) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    r = qrm_cli(
        "vmware", "connect", "-n", "vc1", "--url", f"https://127.0.0.1:{port}/sdk", "-u", "u", "-p", "x"
    )
    assert r.exit_code == 1
    assert (
        r.stderr.strip() == f"error: cannot reach vCenter at https://127.0.0.1:{port}/sdk: connection refused"
    )
    assert qrm_cli("vmware", "list", "-o", "json").json() == []


def test_a_self_signed_certificate_is_refused_unless_insecure(qrm_cli, self_signed_vcsim) -> None:
    sim = self_signed_vcsim
    r = qrm_cli("vmware", "connect", "-n", "vc1", "--url", sim.url, "-u", "user", "-p", "pass")
    assert r.exit_code == 1
    line = r.stderr.strip()
    assert "\n" not in line
    assert f"the certificate of 127.0.0.1:{sim.port} cannot be verified (self-signed certificate)" in line
    assert "--insecure" in line and "--ca-file" in line
    assert qrm_cli("vmware", "list", "-o", "json").json() == []
    ok = qrm_cli("vmware", "connect", "-n", "vc1", "--url", sim.url, "-u", "user", "-p", "pass", "--insecure")
    assert ok.exit_code == 0, ok.stderr
    assert "NOT checked (--insecure)" in ok.stdout
    assert qrm_cli("vmware", "list", "-o", "json").json()[0]["certificate_check"] == "off (--insecure)"
    events = qrm_cli("events", "-o", "json").json()
    assert any("certificate check OFF (--insecure)" in e["message"] for e in events)


def test_connect_replace_and_remove(qrm_cli, vcsim, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(vcsim.password + "\n")
    args = ["vmware", "connect", "-n", "vc1", "--url", vcsim.url, "-u", vcsim.username, "--insecure"]
    assert qrm_cli(*args, "--password-file", str(pw)).exit_code == 0
    again = qrm_cli(*args, "--password-file", str(pw))
    assert again.exit_code == 1
    assert (
        again.stderr.strip()
        == "error: vCenter connection 'vc1' already exists; remove it first or connect with --replace"
    )
    assert qrm_cli(*args, "--password-file", str(pw), "--replace").exit_code == 0
    removed = qrm_cli("vmware", "remove", "vc1")
    assert removed.exit_code == 0 and "vCenter connection vc1 removed" in removed.stdout
    assert qrm_cli("vmware", "list", "-o", "json").json() == []
    gone = qrm_cli("vmware", "remove", "vc1")
    assert gone.exit_code == 1
    assert gone.stderr.strip() == "error: vCenter connection 'vc1' does not exist (see 'qrm vmware list')"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--url", "http://vc/sdk", "-p", "x"],
            "invalid vCenter URL 'http://vc/sdk': vCenter and ESXi speak https only",
        ),
        (
            ["--url", "https://admin:pw@vc/sdk", "-p", "x"],
            "put the user name in -u and the password in -p or --password-file, not in the URL",
        ),
        (
            ["--url", "https://vc/sdk?x=1", "-p", "x"],
            "invalid vCenter URL 'https://vc/sdk?x=1': no query or fragment",
        ),
        (
            ["--url", "https://bad host/sdk", "-p", "x"],
            "invalid vCenter URL 'https://bad host/sdk': 'bad host' is not a host name or address",
        ),
        (["--url", "https://vc/sdk"], "give the password with -p PASSWORD or --password-file FILE"),
        (["--url", "https://vc/sdk", "-p", ""], "the password is empty"),
        (
            ["--url", "https://vc/sdk", "-p", "x", "--password-file", "/nonexistent"],
            "give the password with -p or --password-file, not both",
        ),
        (
            ["--url", "https://vc/sdk", "--password-file", "/nonexistent/pw"],
            "cannot read the password file /nonexistent/pw: No such file or directory",
        ),
        (
            ["--url", "https://vc/sdk", "-p", "x", "--insecure", "--ca-file", "/etc/hostname"],
            "--insecure turns the certificate check off; --ca-file makes no sense with it",
        ),
        (
            ["--url", "https://vc/sdk", "-p", "x", "--ca-file", "/etc/hostname"],
            "the CA file /etc/hostname holds no PEM certificate",
        ),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(qrm_cli, args, message) -> None:
    r = qrm_cli("vmware", "connect", "-n", "vc1", "-u", "user", *args)
    assert (r.exit_code, r.stderr.strip()) == (1, f"error: {message}")
    assert qrm_cli("vmware", "list", "-o", "json").json() == []


def test_bad_names_are_refused(qrm_cli) -> None:
    r = qrm_cli("vmware", "connect", "-n", "no/slash", "--url", "https://vc", "-u", "u", "-p", "x")
    assert r.exit_code == 1 and "invalid connection name 'no/slash'" in r.stderr
    r = qrm_cli("vmware", "connect", "-n", "vc1", "--url", "https://vc", "-u", "bad user", "-p", "x")
    assert r.exit_code == 1 and "invalid user name 'bad user'" in r.stderr


def test_a_missing_or_foreign_site_key_is_one_line(qrm_cli, qrm_settings, vcsim) -> None:
    assert (
        qrm_cli(
            "vmware", "connect", "-n", "vc1", "--url", vcsim.url, "-u", "user", "-p", "pass", "--insecure"
        ).exit_code
        == 0
    )
    from qrm_vmware.connections import ConnectionStore, SecretKeyError
    from qrm_vmware.settings import load

    key = qrm_settings.data_dir / "vmware-site.key"
    key.rename(key.with_name("moved"))
    with service_context(qrm_settings) as ctx, pytest.raises(SecretKeyError) as missing_key:
        ConnectionStore(qrm_settings, load()).get(ctx, "vc1")
    assert "the site key" in missing_key.value.message and "is missing" in missing_key.value.message
    from cryptography.fernet import Fernet

    key.write_bytes(Fernet.generate_key())
    os.chmod(key, 0o600)
    with service_context(qrm_settings) as ctx, pytest.raises(SecretKeyError) as foreign:
        ConnectionStore(qrm_settings, load()).get(ctx, "vc1")
    assert "is not the one it was stored with" in foreign.value.message
    os.chmod(key, 0o644)
    with service_context(qrm_settings) as ctx, pytest.raises(SecretKeyError) as readable:
        ConnectionStore(qrm_settings, load()).get(ctx, "vc1")
    assert "can be read by others" in readable.value.message


def test_remote_use_is_refused(qrm_cli) -> None:
    r = qrm_cli("--server", "http://127.0.0.1:9", "vmware", "list")
    assert r.exit_code == 1
    assert "run it on a qrm server's machine, without --server" in r.stderr
