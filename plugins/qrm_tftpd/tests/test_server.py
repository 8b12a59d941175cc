"""The TFTP server over real UDP on loopback: real clients (curl, tftp-hpa, our own), safety, load."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from conftest import IPXE_DIR, make_resolver, need_file, need_tool
from tftp_client import TftpFailure, exchange, fetch, fetch_sync, parse_error, rrq

from qrm_tftpd.server import Content, Request, TftpError


def curl(port: int, name: str, out: Path, blksize: int | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [need_tool("curl", "curl"), "-sS", "--max-time", "60", "-o", str(out)]
    if blksize:
        cmd += ["--tftp-blksize", str(blksize)]
    return subprocess.run([*cmd, f"tftp://127.0.0.1:{port}/{name}"], capture_output=True, text=True)


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# -- real clients ------------------------------------------------------------


def test_curl_fetches_static_files_and_debian_boot_loaders(serve, tftp_root: Path, tmp_path: Path) -> None:
    loader = need_file(IPXE_DIR / "undionly.kpxe", "ipxe")
    server = serve(make_resolver(tftp_root))
    out = tmp_path / "out"
    for name, expected, blksize in [
        ("sub/file.bin", (tftp_root / "sub" / "file.bin").read_bytes(), None),
        (
            "/sub/file.bin",
            (tftp_root / "sub" / "file.bin").read_bytes(),
            1468,
        ),  # leading slash: root-relative
        ("undionly.kpxe", loader.read_bytes(), 1468),
        ("boot.ipxe", None, None),
    ]:
        result = curl(server.port, name, out, blksize)
        assert result.returncode == 0, result.stderr
        if expected is not None:
            assert out.read_bytes() == expected
    assert out.read_bytes().startswith(b"#!ipxe\n")
    assert wait_for(lambda: server.session_count == 0)


def test_a_file_in_the_root_overrides_the_packaged_boot_loader(serve, tftp_root: Path) -> None:
    need_file(IPXE_DIR / "undionly.kpxe", "ipxe")
    (tftp_root / "undionly.kpxe").write_bytes(b"custom build")
    server = serve(make_resolver(tftp_root))
    assert fetch_sync("127.0.0.1", server.port, "undionly.kpxe").data == b"custom build"


def test_large_file_with_block_number_rollover(serve, tftp_root: Path, tmp_path: Path) -> None:
    # 600 kB in 8-byte blocks is 75,000 blocks: past 65535 the number rolls over to 0.
    data = os.urandom(600_000)
    (tftp_root / "big.bin").write_bytes(data)
    server = serve(make_resolver(tftp_root, cache_bytes=0))
    result = curl(server.port, "big.bin", tmp_path / "out", blksize=8)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256((tmp_path / "out").read_bytes()).digest() == hashlib.sha256(data).digest()


def test_options_are_negotiated(serve, tftp_root: Path) -> None:
    server = serve(make_resolver(tftp_root))
    size = (tftp_root / "sub" / "file.bin").stat().st_size
    got = fetch_sync(
        "127.0.0.1",
        server.port,
        "sub/file.bin",
        options={"blksize": "1432", "tsize": "0", "timeout": "3", "windowsize": "8", "multicast": ""},
    )
    assert got.options == {"blksize": "1432", "tsize": str(size), "timeout": "3"}
    assert got.data == (tftp_root / "sub" / "file.bin").read_bytes()
    # too large a block size is lowered to the server's limit; nonsense is ignored
    got = fetch_sync("127.0.0.1", server.port, "sub/file.bin", options={"blksize": "99999"})
    assert got.options == {"blksize": "65464"}
    got = fetch_sync("127.0.0.1", server.port, "sub/file.bin", options={"blksize": "abc", "tsize": "0"})
    assert got.options == {"tsize": str(size)}


def test_tftp_hpa_client_in_netascii_and_binary(serve, tftp_root: Path, tmp_path: Path) -> None:
    tftp = need_tool("tftp", "tftp-hpa")
    server = serve(make_resolver(tftp_root))
    for mode, name in (("netascii", "hello.txt"), ("binary", "sub/file.bin")):
        out = tmp_path / f"out-{mode}"
        result = subprocess.run(
            [tftp, "-m", mode, "127.0.0.1", str(server.port), "-c", "get", name, str(out)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr + result.stdout
        assert out.read_bytes() == (tftp_root / name).read_bytes()
    # what went over the wire in netascii: CR LF line ends, a lone CR as CR NUL
    raw = fetch_sync("127.0.0.1", server.port, "hello.txt", mode="netascii")
    assert raw.data == b"hello\nworld\r\n"


# -- safety -------------------------------------------------------------------


def test_path_escapes_and_unknown_files_get_error_packets(serve, tftp_root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (tftp_root / "escape").symlink_to(outside)
    (tftp_root / "escape-dir").symlink_to(tmp_path)
    (tftp_root / "inside").symlink_to(tftp_root / "hello.txt")
    os.mkfifo(tftp_root / "fifo")
    server = serve(make_resolver(tftp_root))
    cases = {
        "../secret.txt": 2,
        "sub/../../secret.txt": 2,
        "./hello.txt": 2,
        ".hidden": 2,
        "sub\\..\\hello.txt": 2,
        str(outside): 1,  # absolute: taken relative to the root, where it does not exist
        "/etc/passwd": 1,
        "//etc/passwd": 1,
        "escape": 2,  # symlink out of the root
        "escape-dir/secret.txt": 2,
        "fifo": 2,
        "sub": 2,  # a directory
        "nothing-here": 1,
        "ipxe/not-a-mac.ipxe": 1,
        "ipxe/01-00-5e-00-00-01.ipxe": 1,  # multicast MAC
    }
    for name, code in cases.items():
        with pytest.raises(TftpFailure) as failure:
            fetch_sync("127.0.0.1", server.port, name)
        assert failure.value.code == code, (name, failure.value)
    # a symlink that stays inside the root is fine
    assert fetch_sync("127.0.0.1", server.port, "inside").data == b"hello\nworld\r\n"
    # nothing outside was sent
    assert server.stats.bytes_sent < 100
    assert wait_for(lambda: server.session_count == 0)


def test_curl_sees_not_found(serve, tftp_root: Path, tmp_path: Path) -> None:
    server = serve(make_resolver(tftp_root))
    result = curl(server.port, "missing.bin", tmp_path / "out")
    assert result.returncode == 68  # CURLE_TFTP_NOTFOUND


def test_write_requests_and_bad_packets_do_not_stop_the_loop(serve, tftp_root: Path) -> None:
    server = serve(make_resolver(tftp_root))
    answers = {
        "wrq": exchange(server.port, rrq("hello.txt", opcode=2)),
        "data to the main port": exchange(server.port, struct.pack("!HH", 3, 1) + b"x"),
        "unknown opcode": exchange(server.port, struct.pack("!H", 99) + b"xx"),
        "non-ascii name": exchange(server.port, rrq("h\xe9llo".encode("latin-1"))),
        "no mode": exchange(server.port, b"\0\1hello.txt"),
        "odd options": exchange(server.port, rrq("hello.txt") + b"blksize\0"),
        "mail mode": exchange(server.port, rrq("hello.txt", mode="mail")),
        "empty name": exchange(server.port, b"\0\1\0octet\0"),
        "long name": exchange(server.port, rrq("a" * 1000)),
        "control chars": exchange(server.port, rrq("hello\n.txt")),
    }
    codes = {what: parse_error(answer[0]) if answer else None for what, answer in answers.items()}
    assert codes["wrq"] == (2, "this server is read-only")
    assert codes["data to the main port"][0] == 4
    for what in ("non-ascii name", "no mode", "mail mode", "empty name"):
        assert codes[what][0] == 4, what
    # an option without a value is ignored, the file is served
    assert answers["odd options"][0][:4] == b"\0\3\0\1"
    assert codes["long name"][0] in (2, 4)
    assert codes["control chars"][0] == 2
    # an ERROR to the main port is never answered (no error ping-pong)
    assert exchange(server.port, struct.pack("!HH", 5, 0) + b"x\0", timeout=0.3) is None
    # a short junk datagram is dropped
    assert exchange(server.port, b"\0", timeout=0.3) is None
    assert fetch_sync("127.0.0.1", server.port, "hello.txt").data == b"hello\nworld\r\n"


def test_a_failing_lookup_costs_one_request(serve, tftp_root: Path) -> None:
    resolver = make_resolver(tftp_root)

    def flaky(request: Request) -> Content:
        if request.filename == "boom":
            raise RuntimeError("bug in a lookup")
        if request.filename == "bytesio":
            return Content(size=10, data=None, fd=None, what="broken content")  # neither bytes nor file
        return resolver(request)

    server = serve(flaky)
    with pytest.raises(TftpFailure) as failure:
        fetch_sync("127.0.0.1", server.port, "boom")
    assert failure.value.code == 0
    with pytest.raises((TftpFailure, TimeoutError)):
        fetch_sync("127.0.0.1", server.port, "bytesio", timeout=0.5, retries=2)
    assert fetch_sync("127.0.0.1", server.port, "hello.txt").data == b"hello\nworld\r\n"
    assert server.stats.internal_errors >= 2
    assert wait_for(lambda: server.session_count == 0)


def test_a_vanishing_client_costs_nothing(serve, tftp_root: Path) -> None:
    data = os.urandom(200_000)
    (tftp_root / "kernel").write_bytes(data)
    server = serve(make_resolver(tftp_root), timeout=0.3, retries=3)

    async def scenario() -> None:
        # 1: reads one block and closes its socket: the kernel answers the next
        #    block with ICMP port unreachable and the transfer ends at once.
        await fetch("127.0.0.1", server.port, "kernel", stop_after_blocks=1)
        # 2: reads one block and then stays silent with its socket open: the
        #    transfer times out after the retries. Meanwhile others are served.
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        silent.sendto(rrq("kernel"), ("127.0.0.1", server.port))
        silent.settimeout(2)
        packet, _ = silent.recvfrom(1024)
        assert packet[:4] == b"\0\3\0\1"
        started = time.monotonic()
        got = await fetch("127.0.0.1", server.port, "kernel")
        assert got.data == data
        assert time.monotonic() - started < 2.0
        assert wait_for(lambda: server.session_count == 0, timeout=5)
        silent.close()

    asyncio.run(scenario())
    assert server.stats.aborted >= 1  # the first: client gone
    assert server.stats.timed_out >= 1  # the second: silent
    assert server.stats.completed >= 1


def test_client_error_and_tsize_probe_end_the_transfer(serve, tftp_root: Path) -> None:
    # PXE ROMs often ask for tsize, read the OACK and abort with an ERROR, then ask again.
    server = serve(make_resolver(tftp_root))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2)
        sock.sendto(rrq("sub/file.bin", options={"tsize": "0"}), ("127.0.0.1", server.port))
        oack, addr = sock.recvfrom(1024)
        assert oack == b"\0\6tsize\x005000\0"
        sock.sendto(struct.pack("!HH", 5, 8) + b"abort\0", addr)
    assert wait_for(lambda: server.session_count == 0)
    assert (
        fetch_sync("127.0.0.1", server.port, "sub/file.bin").data
        == (tftp_root / "sub" / "file.bin").read_bytes()
    )


def test_retransmits_when_an_ack_is_lost(serve, tftp_root: Path) -> None:
    server = serve(make_resolver(tftp_root), timeout=0.2, retries=5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2)
        sock.sendto(rrq("sub/file.bin"), ("127.0.0.1", server.port))
        first, addr = sock.recvfrom(1024)
        again, addr2 = sock.recvfrom(1024)  # no ACK sent: the same block comes again
        assert first == again and first[:4] == b"\0\3\0\1" and addr == addr2
        # a duplicate ACK for an old block is not answered (Sorcerer's Apprentice)
        sock.sendto(b"\0\4\0\1", addr)
        second, _ = sock.recvfrom(1024)
        assert second[:4] == b"\0\3\0\2"
        sock.sendto(b"\0\4\0\1", addr)
        sock.settimeout(0.1)
        with pytest.raises(TimeoutError):
            sock.recvfrom(1024)


def test_busy_server_says_so(serve, tftp_root: Path) -> None:
    server = serve(make_resolver(tftp_root), max_sessions=1, timeout=1.0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2)
        sock.sendto(rrq("sub/file.bin"), ("127.0.0.1", server.port))
        sock.recvfrom(1024)  # holds the only session
        with pytest.raises(TftpFailure, match="busy"):
            fetch_sync("127.0.0.1", server.port, "hello.txt")


def test_200_concurrent_clients(serve, tftp_root: Path) -> None:
    loader = need_file(IPXE_DIR / "undionly.kpxe", "ipxe").read_bytes()
    server = serve(make_resolver(tftp_root), timeout=1.0, retries=5)

    async def many() -> list[object]:
        jobs = []
        for i in range(200):
            name, options = (
                ("undionly.kpxe", {"blksize": "1432", "tsize": "0"}) if i % 2 else ("boot.ipxe", None)
            )
            jobs.append(fetch("127.0.0.1", server.port, name, options=options, timeout=3.0))
        return await asyncio.gather(*jobs, return_exceptions=True)

    started = time.monotonic()
    results = asyncio.run(many())
    elapsed = time.monotonic() - started
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == [], failures[:3]
    for i, result in enumerate(results):
        if i % 2:
            assert result.data == loader  # type: ignore[union-attr]
        else:
            assert result.data.startswith(b"#!ipxe")  # type: ignore[union-attr]
    # the server counts a transfer when the last ACK arrives, maybe after the client returned
    assert wait_for(lambda: server.stats.completed == 200), server.stats
    assert server.stats.peak_sessions >= 50  # they really overlapped
    assert wait_for(lambda: server.session_count == 0)
    print(f"200 concurrent clients: {elapsed:.2f} s, 0 failures, {server.stats.peak_sessions} at once")


def test_stop_releases_the_port(serve, tftp_root: Path) -> None:
    server = serve(make_resolver(tftp_root))
    port = server.port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.sendto(rrq("sub/file.bin"), ("127.0.0.1", port))  # a transfer under way
        sock.settimeout(2)
        sock.recvfrom(1024)
        server.stop()
        assert server.wait_stopped(5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(("127.0.0.1", port))  # free again


def test_resolver_errors_map_to_tftp_codes(serve, tftp_root: Path) -> None:
    def resolver(request: Request) -> Content:
        raise TftpError(2, "no, " + request.filename)

    server = serve(resolver)
    with pytest.raises(TftpFailure) as failure:
        fetch_sync("127.0.0.1", server.port, "x")
    assert (failure.value.code, failure.value.message) == (2, "no, x")
