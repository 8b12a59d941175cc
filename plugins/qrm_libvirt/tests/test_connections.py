"""The connection pool and libvirt's errors as qrm's: against the test driver, a socket
that does not exist, a socket that never answers, and a real libvirtd that goes away
and comes back."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from qrm_core.errors import DriverError, InvalidInput, NotFound, UnsupportedOperation
from qrm_libvirt.connections import ConnectionPool
from qrm_libvirt.errors import HostUnreachable, PartitionStateError, safe_uri, translate
from qrm_libvirt.testing import test_host, wait_until


def test_one_connection_per_uri(libvirt, tmp_path: Path) -> None:
    pool = ConnectionPool()
    host = test_host(tmp_path)
    try:
        first = pool.get(host.uri, "hv1")
        assert pool.get(host.uri, "hv1") is first
        assert pool.open_uris() == [host.uri]
        pool.drop(host.uri)
        assert pool.get(host.uri, "hv1") is not first
    finally:
        pool.close_all()


def test_a_missing_daemon_is_one_line_naming_the_host(libvirt, tmp_path: Path) -> None:
    pool = ConnectionPool()
    uri = f"qemu+unix:///system?socket={tmp_path}/nowhere/libvirt-sock"
    with pytest.raises(HostUnreachable) as info:
        pool.get(uri, "hv9")
    message = info.value.message
    assert message.startswith(f"cannot reach host hv9 ({uri}): ")
    assert "No such file or directory" in message and "\n" not in message
    assert isinstance(info.value, DriverError)
    assert pool.failures[uri][0] == "hv9" and "No such file" in pool.failures[uri][1]


def test_a_host_that_never_answers_is_given_up_after_the_timeout(libvirt, tmp_path: Path) -> None:
    """A socket that accepts connections but says nothing (a hung daemon, a black-holed ssh)."""
    path = tmp_path / "silent.sock"
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(path))
    silent.listen(8)
    try:
        pool = ConnectionPool(connect_timeout=1.0)
        with pytest.raises(HostUnreachable) as info:
            pool.get(f"qemu+unix:///system?socket={path}", "hv2")
        assert info.value.message.endswith("no answer within 1 s")
    finally:
        silent.close()


def test_uris_lose_their_passwords_in_messages() -> None:
    assert safe_uri("qemu+ssh://root:s3cret@10.0.0.5/system") == "qemu+ssh://root@10.0.0.5/system"
    assert safe_uri("qemu+ssh://root@10.0.0.5/system") == "qemu+ssh://root@10.0.0.5/system"


def test_libvirt_errors_become_qrm_errors(libvirt, tmp_path: Path) -> None:
    host = test_host(tmp_path)
    conn = libvirt.open(host.uri)
    try:

        def error_of(call):
            with pytest.raises(libvirt.libvirtError) as info:
                call()
            return translate(
                info.value, host="hv1", uri=host.uri, doing="do it", partition="p1", driver="qemu"
            )

        assert isinstance(error_of(lambda: conn.lookupByName("p1")), NotFound)
        assert (
            error_of(lambda: conn.lookupByName("p1")).message == "partition 'p1' does not exist on host hv1"
        )
        dom = conn.defineXML(
            "<domain type='qemu'><name>p1</name><memory>65536</memory><os><type>hvm</type></os></domain>"
        )
        stopped = error_of(dom.suspend)
        assert isinstance(stopped, (PartitionStateError, DriverError)) and "\n" not in stopped.message
        unsupported = error_of(lambda: dom.migrateToURI3(host.uri, {}, libvirt.VIR_MIGRATE_PEER2PEER))
        assert isinstance(unsupported, UnsupportedOperation)
        assert unsupported.message.startswith("qemu on hv1 cannot do it: ")
        bad = error_of(lambda: conn.defineXML("<domain type='bogus'><name>x</name></domain>"))
        assert isinstance(bad, InvalidInput)
    finally:
        conn.close()


@pytest.mark.slow
def test_a_restarted_daemon_is_reconnected(libvirt, daemon_tools, tmp_path: Path) -> None:
    """Keepalive and the close callback notice the daemon is gone; the next use opens a new
    connection and the open listeners (the state watcher) hear of it."""
    from qrm_core.lab.libvirtd import LibvirtDaemon

    daemon = LibvirtDaemon(tmp_path / "lvd")
    pool = ConnectionPool(keepalive_interval=1, keepalive_count=2)
    opened = []
    pool.add_open_listener(lambda uri, conn: opened.append(conn))
    try:
        daemon.start()
        first = pool.get(daemon.uri, "hv1")
        assert first.getType() == "QEMU"
        daemon.stop()
        wait_until(lambda: daemon.uri not in pool.open_uris(), 10, "the pool to see the daemon gone")
        with pytest.raises(HostUnreachable):
            pool.get(daemon.uri, "hv1")
        daemon.start()
        second = pool.get(daemon.uri, "hv1")
        assert second is not first and second.getType() == "QEMU"
        assert opened == [first, second]
        assert pool.call(daemon.uri, "hv1", lambda conn: conn.getHostname())
    finally:
        pool.close_all()
        daemon.stop()
