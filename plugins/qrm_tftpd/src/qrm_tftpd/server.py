"""The TFTP engine: one epoll loop, many lock-step read transfers.

Why not ``tftpy.TftpServer.listen()`` as it is? tftpy 0.8.7 (the version this
was written against) has faults that matter for a boot server, seen in its
source and on the machine (``../docs/netboot.md`` lists them):

* one bad request ends the whole loop: a non-ASCII file name raises
  ``UnicodeDecodeError`` and ``blksize=abc`` raises ``ValueError`` from inside
  ``listen()``, which only catches ``TftpException``; a ``dyn_file_func``
  that returns ``io.BytesIO`` raises ``AttributeError`` at the end of the
  transfer (``flock=False`` is not passed on, so it locks the object and reads
  its ``.name``). Every machine booting after that gets a timeout;
* files present in the root bypass ``dyn_file_func``, so a stale file can
  shadow a generated boot script; paths are checked with ``abspath``, not by
  what was opened, so a symlink leads out of the root;
* per packet it builds objects, formats log strings eagerly, ``select()``\\ s
  over every session and checks every session's timer; with 200 clients the
  loop spends its time on bookkeeping, and ``select()`` fails beyond 1024
  descriptors.

So this module keeps tftpy's packet codec where it is right (encoding option
acknowledgements), parses requests itself (tftpy drops a request whose
option has an empty value, as RFC 2090 ``multicast`` from some PXE ROMs
has), and does the rest itself:

* ``epoll`` over the listening socket, one *connected* UDP socket per
  transfer (the kernel drops strangers' packets and reports a vanished
  client as ``ECONNREFUSED`` at once), and a wake-up pipe;
* requests are resolved (file lookups, database queries, HTTP fetches) in a
  small thread pool, so a slow database never stalls running transfers;
* the hot path per block is: ``recv`` the 4-byte ACK, ``pread`` (or slice the
  cached bytes), one ``send``; timers are scanned a few times a second, not
  per packet;
* every handler runs under ``except Exception``: a bad client, a bad file or
  a failing lookup ends that one transfer (with an error packet where that
  makes sense) and the loop goes on.

Supported: RRQ in ``octet`` and ``netascii``; options ``blksize`` (RFC 2348),
``tsize`` and ``timeout`` (RFC 2349); block numbers roll over to 0 past
65535, as tftpd-hpa and iPXE expect. Write requests are refused (the boot
root is read-only to clients).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import tftpy

log = logging.getLogger("qrm.tftpd")

OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6

# Error codes (RFC 1350, 2347).
ERR_UNDEFINED = 0
ERR_NOT_FOUND = 1
ERR_ACCESS = 2
ERR_ILLEGAL = 4
ERR_OPTIONS = 8

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux value; Python does not export it
_HEADER = struct.Struct("!HH")
_PKTINFO = struct.Struct("i4s4s")
MAX_NETASCII = 1 << 20  # text files; a bigger file in netascii would cost that much memory per transfer
MAX_REQUEST = 2048


class TftpError(Exception):
    """A request that is answered with a TFTP error packet.

    :ivar code: The TFTP error code (1 not found, 2 access violation, ...).
    :ivar message: One line for the client (and the log).
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Content:
    """What a request resolved to: bytes in memory or an open regular file.

    The server owns it from then on and closes the file when the transfer
    ends. ``what`` says where it came from, for the log.
    """

    size: int
    data: bytes | None = None
    fd: int | None = None
    what: str = ""

    @classmethod
    def of_bytes(cls, data: bytes, what: str) -> Content:
        return cls(size=len(data), data=data, what=what)

    def read_all(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.fd is not None
        chunks, offset = [], 0
        while offset < self.size:
            chunk = os.pread(self.fd, min(1 << 20, self.size - offset), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


@dataclass(frozen=True)
class Request:
    """A read request, as the resolver sees it."""

    filename: str
    mode: str
    client: tuple[str, int]
    local_address: str


Resolver = Callable[[Request], Content]


def to_netascii(data: bytes) -> bytes:
    """RFC 764 line endings: CR becomes CR NUL, LF becomes CR LF."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def error_packet(code: int, message: str) -> bytes:
    text = message.encode("ascii", "replace")[:200]
    return _HEADER.pack(OP_ERROR, code) + text + b"\0"


def oack_packet(options: dict[str, str]) -> bytes:
    packet = tftpy.TftpPacketTypes.TftpPacketOACK()
    packet.options = options
    return bytes(packet.encode().buffer)


@dataclass(frozen=True)
class ParsedRequest:
    filename: str
    mode: str
    options: dict[str, str]


def parse_request(packet: bytes) -> ParsedRequest:
    """Decode an RRQ: file name, mode and options; anything malformed is a :class:`TftpError`.

    Not tftpy's decoder: it drops a whole request when an option has an
    empty value (RFC 2090 ``multicast``, which some PXE ROMs send).
    """
    parts = packet[2:].split(b"\0")
    if len(parts) < 3 or parts[-1] != b"":
        raise TftpError(ERR_ILLEGAL, "malformed request")
    try:
        fields = [part.decode("ascii") for part in parts[:-1]]
    except UnicodeDecodeError:
        raise TftpError(ERR_ILLEGAL, "malformed request: not ASCII") from None
    filename, mode, rest = fields[0], fields[1], fields[2:]
    if not filename:
        raise TftpError(ERR_ILLEGAL, "malformed request: no file name")
    options = {rest[i].lower(): rest[i + 1] for i in range(0, len(rest) - 1, 2) if rest[i]}
    return ParsedRequest(filename=filename, mode=mode.lower(), options=options)


def negotiate(options: dict[str, str], max_blksize: int) -> dict[str, str]:
    """The options this server grants; unknown or invalid ones are left out (RFC 2347)."""
    granted: dict[str, str] = {}
    blksize = options.get("blksize")
    if blksize is not None and blksize.isdigit() and int(blksize) >= 8:
        granted["blksize"] = str(min(int(blksize), max_blksize))
    timeout = options.get("timeout")
    if timeout is not None and timeout.isdigit() and 1 <= int(timeout) <= 255:
        granted["timeout"] = str(int(timeout))
    if "tsize" in options:
        granted["tsize"] = "0"  # replaced by the real size once resolved
    return granted


class Session:
    """One read transfer."""

    __slots__ = (
        "blksize",
        "block",
        "client",
        "content",
        "data",
        "deadline",
        "fd",
        "filename",
        "last_block",
        "oack",
        "retries_left",
        "sock",
        "started",
        "timeout",
    )

    def __init__(
        self,
        sock: socket.socket,
        client: tuple[str, int],
        filename: str,
        content: Content,
        data: bytes | None,
        blksize: int,
        timeout: float,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.client = client
        self.filename = filename
        self.content = content
        self.data = memoryview(data) if data is not None else None
        self.blksize = blksize
        self.timeout = timeout
        self.block = 0
        size = len(data) if data is not None else content.size
        self.last_block = size // blksize + 1
        self.oack: bytes | None = None
        self.deadline = 0.0
        self.retries_left = 0
        self.started = time.monotonic()


@dataclass
class Stats:
    """Counters, for tests, health checks and the log."""

    requests: int = 0
    completed: int = 0
    errors: int = 0
    aborted: int = 0
    timed_out: int = 0
    bad_packets: int = 0
    internal_errors: int = 0
    bytes_sent: int = 0
    peak_sessions: int = 0
    by_error: dict[int, int] = field(default_factory=dict)


class TftpServer:
    """A read-only TFTP server whose files come from ``resolver``.

    ``bind()`` opens the socket (so errors surface before a thread starts),
    ``serve_forever()`` runs the loop until ``stop()``.
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        address: str = "127.0.0.1",
        port: int = 69,
        timeout: float = 1.0,
        retries: int = 5,
        max_sessions: int = 512,
        max_blksize: int = 65464,
        workers: int = 4,
    ) -> None:
        self.resolver = resolver
        self.address = address
        self.port = port
        self.timeout = timeout
        self.retries = retries
        self.max_sessions = max_sessions
        self.max_blksize = max_blksize
        self.workers = workers
        self.stats = Stats()
        self.sock: socket.socket | None = None
        self._sessions: dict[int, Session] = {}
        self._pending: set[tuple[str, int]] = set()
        self._clients: set[tuple[str, int]] = set()
        self._done: deque[tuple[Request, ParsedRequest, dict[str, str], Future[Content]]] = deque()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._wake_r, self._wake_w = -1, -1
        self._epoll: select.epoll | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pktinfo = False

    # -- life cycle ------------------------------------------------------

    def bind(self) -> tuple[str, int]:
        """Open the listening socket; returns the address and port bound."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            if ipaddress.IPv4Address(self.address).is_unspecified:
                # Answer from the address each request was sent to (multi-homed servers).
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                self._pktinfo = True
            sock.bind((self.address, self.port))
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock = sock
        self.port = sock.getsockname()[1]
        return self.address, self.port

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def running(self) -> bool:
        return not self._stopped.is_set()

    def stop(self) -> None:
        """Ask the loop to end; returns at once (join the thread to wait)."""
        self._stopping.set()
        self._wake()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def serve_forever(self) -> None:
        """Run until :meth:`stop`; every transfer is closed on the way out."""
        if self.sock is None:
            self.bind()
        assert self.sock is not None
        self._stopped.clear()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll = select.epoll()
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="qrm-tftpd")
        listen_fd = self.sock.fileno()
        self._epoll.register(listen_fd, select.EPOLLIN)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        log.info("tftp: serving on %s:%d", self.address, self.port)
        try:
            self._loop(listen_fd)
        finally:
            self._shutdown()

    def _loop(self, listen_fd: int) -> None:
        assert self._epoll is not None
        poll = self._epoll.poll
        sessions = self._sessions
        on_ack = self._on_session_packet
        tick = min(0.1, self.timeout / 4)
        next_scan = time.monotonic() + tick
        while not self._stopping.is_set():
            try:
                events = poll(tick)
                for fd, _mask in events:
                    session = sessions.get(fd)
                    if session is not None:
                        on_ack(session)
                    elif fd == listen_fd:
                        self._on_requests()
                    elif fd == self._wake_r:
                        self._on_wake()
                now = time.monotonic()
                if now >= next_scan:
                    next_scan = now + tick
                    self._scan_timers(now)
            except Exception:
                self.stats.internal_errors += 1
                log.exception("tftp: internal error in the server loop; continuing")

    def _shutdown(self) -> None:
        for session in list(self._sessions.values()):
            self._end(session, None)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._drain_done(closing=True)
        if self._epoll is not None:
            self._epoll.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.sock is not None:
            self.sock.close()
        self._stopped.set()
        log.info("tftp: stopped (%s)", self.stats)

    def _wake(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    def _on_wake(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 4096):
                pass
        self._drain_done(closing=False)

    # -- requests --------------------------------------------------------

    def _on_requests(self) -> None:
        assert self.sock is not None
        for _ in range(256):  # a burst of requests, without starving transfers
            try:
                if self._pktinfo:
                    packet, ancillary, _flags, client = self.sock.recvmsg(
                        MAX_REQUEST, socket.CMSG_SPACE(_PKTINFO.size)
                    )
                    local = self.address
                    for level, kind, data in ancillary:
                        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                            local = socket.inet_ntoa(_PKTINFO.unpack(data[: _PKTINFO.size])[1])
                else:
                    packet, client = self.sock.recvfrom(MAX_REQUEST)
                    local = self.address
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP errors for earlier replies land here
                log.debug("tftp: listening socket: %s", exc)
                continue
            try:
                self._on_request(packet, client, local)
            except Exception:
                self.stats.internal_errors += 1
                log.exception("tftp: internal error handling a request from %s:%d", *client)

    def _on_request(self, packet: bytes, client: tuple[str, int], local: str) -> None:
        if len(packet) < 4 or client[1] == 0:
            self.stats.bad_packets += 1
            return
        opcode = (packet[0] << 8) | packet[1]
        if opcode == OP_WRQ:
            self._refuse(client, local, ERR_ACCESS, "this server is read-only")
            return
        if opcode != OP_RRQ:
            self.stats.bad_packets += 1
            if opcode != OP_ERROR:  # never answer an error with an error
                self._refuse(client, local, ERR_ILLEGAL, "expected a read request")
            return
        if client in self._pending or client in self._clients:
            return  # a retransmitted request for a transfer already under way
        self.stats.requests += 1
        try:
            parsed = parse_request(packet)
            if parsed.mode not in ("octet", "netascii"):
                raise TftpError(ERR_ILLEGAL, f"transfer mode {parsed.mode[:20]!r} is not supported")
        except TftpError as exc:
            self.stats.bad_packets += 1
            log.info("tftp: %s:%d: %s: %r", *client, exc.message, packet[:100])
            self._refuse(client, local, exc.code, exc.message)
            return
        if len(self._sessions) + len(self._pending) >= self.max_sessions:
            self._refuse(client, local, ERR_UNDEFINED, "server busy, try again")
            return
        granted = negotiate(parsed.options, self.max_blksize)
        request = Request(filename=parsed.filename, mode=parsed.mode, client=client, local_address=local)
        self._pending.add(client)
        assert self._pool is not None
        future = self._pool.submit(self.resolver, request)
        future.add_done_callback(lambda f: self._resolved(request, parsed, granted, f))

    def _resolved(
        self, request: Request, parsed: ParsedRequest, granted: dict[str, str], future: Future[Content]
    ) -> None:
        """Runs in a worker thread: hand the result to the loop."""
        self._done.append((request, parsed, granted, future))
        self._wake()

    def _drain_done(self, *, closing: bool) -> None:
        while self._done:
            request, parsed, granted, future = self._done.popleft()
            self._pending.discard(request.client)
            try:
                content = future.result()
            except TftpError as exc:
                log.info(
                    "tftp: %s:%d %s: error %d, %s", *request.client, request.filename, exc.code, exc.message
                )
                if not closing:
                    self._refuse(request.client, request.local_address, exc.code, exc.message)
                continue
            except Exception as exc:
                self.stats.internal_errors += 1
                log.error("tftp: %s:%d %s: lookup failed: %s", *request.client, request.filename, exc)
                log.debug("lookup failure", exc_info=True)
                if not closing:
                    self._refuse(request.client, request.local_address, ERR_UNDEFINED, "internal error")
                continue
            if closing or self._stopping.is_set():
                content.close()
                continue
            try:
                self._start(request, parsed, granted, content)
            except Exception:
                content.close()
                self.stats.internal_errors += 1
                log.exception("tftp: could not start the transfer of %s", request.filename)
                self._refuse(request.client, request.local_address, ERR_UNDEFINED, "internal error")

    def _refuse(self, client: tuple[str, int], local: str, code: int, message: str) -> None:
        """Send an error from a fresh port, as a new transfer would (RFC 1350)."""
        self.stats.errors += 1
        self.stats.by_error[code] = self.stats.by_error.get(code, 0) + 1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((local, 0))
                sock.sendto(error_packet(code, message), client)
            except OSError as exc:
                log.debug("tftp: could not send an error to %s:%d: %s", *client, exc)

    def _start(
        self, request: Request, parsed: ParsedRequest, granted: dict[str, str], content: Content
    ) -> None:
        data = content.data
        if request.mode == "netascii":
            if content.size > MAX_NETASCII:
                content.close()
                self._refuse(
                    request.client, request.local_address, ERR_UNDEFINED, "file too large for netascii"
                )
                return
            data = to_netascii(content.read_all())
            content.close()
            content = Content.of_bytes(data, content.what)
        if "tsize" in granted:
            granted["tsize"] = str(len(data) if data is not None else content.size)
        blksize = int(granted.get("blksize", 512))
        timeout = float(granted.get("timeout", self.timeout))
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((request.local_address, 0))
            sock.connect(request.client)
            sock.setblocking(False)
        except OSError:
            sock.close()
            content.close()
            raise
        session = Session(sock, request.client, request.filename, content, data, blksize, timeout)
        assert self._epoll is not None
        self._sessions[session.fd] = session
        self._clients.add(session.client)
        self.stats.peak_sessions = max(self.stats.peak_sessions, len(self._sessions))
        session.retries_left = self.retries
        self._epoll.register(session.fd, select.EPOLLIN)
        log.info(
            "tftp: %s:%d %s: sending %d bytes (%s), blksize %d",
            *request.client,
            request.filename,
            len(data) if data is not None else content.size,
            content.what,
            blksize,
        )
        now = time.monotonic()
        try:
            if granted:
                session.oack = oack_packet(granted)
                self._send(session, session.oack, now)
            else:
                session.block = 1
                self._send_block(session, now)
        except Exception:
            self._end(session, "internal error", aborted=True)
            raise

    # -- transfers -------------------------------------------------------

    def _send(self, session: Session, packet: bytes | memoryview, now: float) -> bool:
        try:
            session.sock.send(packet)
        except (BlockingIOError, InterruptedError):
            pass  # counts as lost; the timer resends it
        except OSError as exc:  # the client went away (ICMP port unreachable)
            self._end(session, f"client gone ({exc.strerror or exc})")
            return False
        session.deadline = now + session.timeout
        return True

    def _send_block(self, session: Session, now: float) -> None:
        offset = (session.block - 1) * session.blksize
        if session.data is not None:
            chunk: bytes | memoryview = session.data[offset : offset + session.blksize]
        else:
            assert session.content.fd is not None
            chunk = os.pread(session.content.fd, session.blksize, offset)
        header = _HEADER.pack(OP_DATA, session.block & 0xFFFF)
        if self._send(session, header + chunk, now):
            self.stats.bytes_sent += len(chunk)

    def _on_session_packet(self, session: Session) -> None:
        try:
            packet = session.sock.recv(1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._end(session, f"client gone ({exc.strerror or exc})")
            return
        try:
            if len(packet) >= 4 and packet[0] == 0:
                opcode = packet[1]
                if opcode == OP_ACK:
                    if ((packet[2] << 8) | packet[3]) == session.block & 0xFFFF:
                        if session.block >= session.last_block:
                            self._end(session, None)
                            return
                        session.block += 1
                        session.retries_left = self.retries
                        self._send_block(session, time.monotonic())
                    # else: a duplicate or late ACK; answering it would double
                    # the traffic for the rest of the transfer (Sorcerer's Apprentice).
                    return
                if opcode == OP_ERROR:
                    self._end(session, "client sent an error", aborted=True)
                    return
            self.stats.bad_packets += 1
            with contextlib.suppress(OSError):
                session.sock.send(error_packet(ERR_ILLEGAL, "expected an acknowledgement"))
            self._end(session, "client sent something other than an ACK", aborted=True)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("tftp: internal error in the transfer of %s", session.filename)
            self._end(session, "internal error", aborted=True)

    def _scan_timers(self, now: float) -> None:
        for session in list(self._sessions.values()):
            if session.deadline > now or session.fd not in self._sessions:
                continue
            try:
                if session.retries_left <= 0:
                    self._end(session, "timed out", timed_out=True)
                    continue
                session.retries_left -= 1
                if session.block == 0 and session.oack is not None:
                    self._send(session, session.oack, now)
                else:
                    self._send_block(session, now)
            except Exception:
                self.stats.internal_errors += 1
                log.exception("tftp: internal error retransmitting %s", session.filename)
                self._end(session, "internal error", aborted=True)

    def _end(
        self, session: Session, problem: str | None, *, aborted: bool = False, timed_out: bool = False
    ) -> None:
        if self._sessions.pop(session.fd, None) is None:
            return
        self._clients.discard(session.client)
        with contextlib.suppress(Exception):
            assert self._epoll is not None
            self._epoll.unregister(session.fd)
        session.sock.close()
        session.content.close()
        elapsed = time.monotonic() - session.started
        if problem is None:
            self.stats.completed += 1
            log.info("tftp: %s:%d %s: done in %.3f s", *session.client, session.filename, elapsed)
        else:
            if timed_out:
                self.stats.timed_out += 1
            else:
                self.stats.aborted += 1
            log.info(
                "tftp: %s:%d %s: ended after %.3f s at block %d: %s",
                *session.client,
                session.filename,
                elapsed,
                session.block,
                problem,
            )
