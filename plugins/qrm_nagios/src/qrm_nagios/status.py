"""Reading Nagios's ``status.dat``: the state of every host and service.

The file is ``type {`` blocks of ``\\tkey=value`` lines, rewritten by Nagios
every ``status_update_interval`` seconds (written to a temporary file and
renamed, so a reader sees a whole file). For 10,000 hosts it is some 70 MB;
parsing every line in Python takes seconds, so one regular expression picks
out only the keys qrm uses (the scan runs in C) and Python sees those alone.
Nagios's query handler socket offers no status query in Nagios 4, so this
file is the complete source.

Nagios 4 writes the keys of a block in a fixed order, so one expression per
block type takes the fields of a whole block at once (:func:`parse`); should a
file not follow that order (another Nagios version), every block type is read
line by line instead (:func:`parse_lines`), slower but indifferent to order.

A parse is cached per process by the file's identity (inode, size, mtime):
Nagios rewrites the file as a whole, so an unchanged identity is an unchanged
status.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from qrm_core.plugin_api import PluginError

HOST_STATES = {0: "UP", 1: "DOWN", 2: "UNREACHABLE"}
SERVICE_STATES = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}

_KEYS = (
    "host_name",
    "service_description",
    "has_been_checked",
    "current_state",
    "plugin_output",
    "last_check",
    "current_attempt",
    "max_attempts",
    "state_type",
    "last_state_change",
    "last_hard_state_change",
    "is_flapping",
    "created",
    "nagios_pid",
    "program_start",
)
_PAIRS = re.compile(rb"^\t(" + b"|".join(k.encode() for k in _KEYS) + rb")=(.*)$", re.M)
_BLOCKS = re.compile(rb"^(info|programstatus|hoststatus|servicestatus|contactstatus) \{$", re.M)


@dataclass(slots=True)
class ServiceStatus:
    description: str
    state: int = 3
    hard: bool = False
    attempt: int = 1
    max_attempts: int = 1
    output: str = ""
    last_check: int = 0
    last_state_change: int = 0
    checked: bool = False
    flapping: bool = False

    @property
    def state_name(self) -> str:
        return SERVICE_STATES.get(self.state, "UNKNOWN") if self.checked else "PENDING"

    @property
    def kind(self) -> str:
        return "hard" if self.hard else f"soft {self.attempt}/{self.max_attempts}"


@dataclass(slots=True)
class HostStatus:
    name: str
    state: int = 0
    hard: bool = False
    attempt: int = 1
    max_attempts: int = 1
    output: str = ""
    last_check: int = 0
    last_state_change: int = 0
    last_hard_state_change: int = 0
    checked: bool = False
    flapping: bool = False
    services: dict[str, ServiceStatus] = field(default_factory=dict)

    @property
    def state_name(self) -> str:
        return HOST_STATES.get(self.state, "UNKNOWN") if self.checked else "PENDING"

    @property
    def kind(self) -> str:
        return "hard" if self.hard else f"soft {self.attempt}/{self.max_attempts}"


@dataclass
class Status:
    created: int = 0
    pid: int = 0
    program_start: int = 0
    hosts: dict[str, HostStatus] = field(default_factory=dict)


def _int(value: bytes) -> int:
    try:
        return int(value)
    except ValueError:
        return 0


_SKIP = rb"(?:[^\n]*\n)*?"
_HOST_BLOCK = (
    rb"\thas_been_checked=(\d)\n" + _SKIP + rb"\tcurrent_state=(\d+)\n" + _SKIP
    + rb"\tplugin_output=([^\n]*)\n" + _SKIP + rb"\tlast_check=(\d+)\n" + _SKIP
    + rb"\tcurrent_attempt=(\d+)\n\tmax_attempts=(\d+)\n\tstate_type=(\d)\n"
    + rb"\tlast_state_change=(\d+)\n\tlast_hard_state_change=(\d+)\n" + _SKIP
    + rb"\tis_flapping=(\d)\n"
)  # fmt: skip
_SERVICE_BLOCK = (
    rb"\thas_been_checked=(\d)\n" + _SKIP + rb"\tcurrent_state=(\d+)\n" + _SKIP
    + rb"\tcurrent_attempt=(\d+)\n\tmax_attempts=(\d+)\n\tstate_type=(\d)\n"
    + rb"\tlast_state_change=(\d+)\n" + _SKIP
    + rb"\tplugin_output=([^\n]*)\n" + _SKIP + rb"\tlast_check=(\d+)\n" + _SKIP
    + rb"\tis_flapping=(\d)\n"
)  # fmt: skip
_HOSTS = re.compile(rb"^hoststatus \{\n\thost_name=([^\n]*)\n" + _SKIP + _HOST_BLOCK, re.M)
_SERVICES = re.compile(
    rb"^servicestatus \{\n\thost_name=([^\n]*)\n\tservice_description=([^\n]*)\n" + _SKIP + _SERVICE_BLOCK,
    re.M,
)
_CREATED = re.compile(rb"^\tcreated=(\d+)$", re.M)
_PID = re.compile(rb"^\tnagios_pid=(\d+)$", re.M)
_START = re.compile(rb"^\tprogram_start=(\d+)$", re.M)


def _first(pattern: re.Pattern[bytes], data: bytes) -> int:
    found = pattern.search(data, 0, 8192) or pattern.search(data)
    return int(found.group(1)) if found else 0


def parse(data: bytes, only: str | None = None) -> Status:
    """The status in ``data`` (the bytes of a status.dat); ``only`` keeps one host."""
    status = Status(
        created=_first(_CREATED, data), pid=_first(_PID, data), program_start=_first(_START, data)
    )
    if only is not None:
        name = re.escape(only.encode())
        hosts_re = re.compile(rb"\nhoststatus \{\n\thost_name=(" + name + rb")\n" + _SKIP + _HOST_BLOCK)
        services_re = re.compile(
            rb"\nservicestatus \{\n\thost_name=(" + name + rb")\n\tservice_description=([^\n]*)\n"
            + _SKIP + _SERVICE_BLOCK
        )  # fmt: skip
        expected_hosts = None
    else:
        hosts_re, services_re = _HOSTS, _SERVICES
        expected_hosts = data.count(b"\nhoststatus {\n")  # (all of them: before the boundary)
    # Nagios writes every host block before the first service block: each
    # expression scans only its own part of the file.
    boundary = data.find(b"\nservicestatus {\n")
    if boundary < 0:
        boundary = len(data)
    hosts = hosts_re.findall(data, 0, boundary)
    services = services_re.findall(data, boundary)
    if expected_hosts is not None and (
        len(hosts) != expected_hosts or len(services) != data.count(b"\nservicestatus {\n", boundary)
    ):
        return parse_lines(data, only)
    one = b"1"
    by_name = status.hosts
    for name, checked, state, output, last, attempt, most, kind, change, hard_change, flapping in hosts:
        text = name.decode(errors="replace")
        by_name[text] = HostStatus(
            text,
            int(state),
            kind == one,
            int(attempt),
            int(most),
            output.decode(errors="replace"),
            int(last),
            int(change),
            int(hard_change),
            checked == one,
            flapping == one,
            {},
        )
    for (
        host_name,
        description,
        checked,
        state,
        attempt,
        most,
        kind,
        change,
        output,
        last,
        flapping,
    ) in services:
        owner = by_name.get(host_name.decode(errors="replace"))
        if owner is None:
            continue
        text = description.decode(errors="replace")
        owner.services[text] = ServiceStatus(
            text,
            int(state),
            kind == one,
            int(attempt),
            int(most),
            output.decode(errors="replace"),
            int(last),
            int(change),
            checked == one,
            flapping == one,
        )
    if only is not None and not status.hosts and data.count(b"\thost_name=" + only.encode() + b"\n"):
        return parse_lines(data, only)  # the host is there but not in the expected order
    return status


def parse_lines(data: bytes, only: str | None = None) -> Status:
    """:func:`parse` for a file whose keys are in any order (one key at a time)."""
    status = Status()
    # Block boundaries: which block each key belongs to.
    starts = [(m.start(), m.group(1)) for m in _BLOCKS.finditer(data)]
    block_index = 0
    kind = b""
    next_start = starts[0][0] if starts else len(data) + 1
    current: HostStatus | ServiceStatus | None = None
    host_of_service: str | None = None
    services: list[tuple[str, ServiceStatus]] = []
    for match in _PAIRS.finditer(data):
        position = match.start()
        if position > next_start:
            # Entered the next block (or several: blocks without wanted keys).
            while block_index < len(starts) and starts[block_index][0] < position:
                kind = starts[block_index][1]
                block_index += 1
            next_start = starts[block_index][0] if block_index < len(starts) else len(data) + 1
            current = None
        key, value = match.group(1), match.group(2)
        if kind == b"hoststatus":
            if key == b"host_name":
                name = value.decode(errors="replace")
                if only is not None and name != only:
                    current = None
                    continue
                current = status.hosts[name] = HostStatus(name=name)
                continue
            if current is not None:
                _set(current, key, value)
        elif kind == b"servicestatus":
            if key == b"host_name":
                host_of_service = value.decode(errors="replace")
                current = None
                continue
            if key == b"service_description":
                if host_of_service is None or (only is not None and host_of_service != only):
                    current = None
                    continue
                current = ServiceStatus(description=value.decode(errors="replace"))
                services.append((host_of_service, current))
                continue
            if current is not None:
                _set(current, key, value)
        elif kind == b"info" and key == b"created":
            status.created = _int(value)
        elif kind == b"programstatus":
            if key == b"nagios_pid":
                status.pid = _int(value)
            elif key == b"program_start":
                status.program_start = _int(value)
    for host, service in services:
        owner = status.hosts.get(host)
        if owner is not None:
            owner.services[service.description] = service
    return status


def _set(target: HostStatus | ServiceStatus, key: bytes, value: bytes) -> None:
    if key == b"current_state":
        target.state = _int(value)
    elif key == b"state_type":
        target.hard = value == b"1"
    elif key == b"current_attempt":
        target.attempt = _int(value)
    elif key == b"max_attempts":
        target.max_attempts = _int(value)
    elif key == b"plugin_output":
        target.output = value.decode(errors="replace")
    elif key == b"last_check":
        target.last_check = _int(value)
    elif key == b"last_state_change":
        target.last_state_change = _int(value)
    elif key == b"last_hard_state_change" and isinstance(target, HostStatus):
        target.last_hard_state_change = _int(value)
    elif key == b"has_been_checked":
        target.checked = value == b"1"
    elif key == b"is_flapping":
        target.flapping = value == b"1"


class StatusReader:
    """``status.dat`` of one Nagios, parsed again only when Nagios has rewritten it."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._identity: tuple[int, int, int] | None = None
        self._status: Status | None = None

    def identity(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PluginError(f"cannot read Nagios's status {self.path}: {exc.strerror}") from None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def read(self) -> Status | None:
        """The whole status, or None when there is no status file (Nagios never ran)."""
        with self._lock:
            identity = self.identity()
            if identity is None:
                return None
            if identity == self._identity and self._status is not None:
                return self._status
            assert self.path is not None
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise PluginError(f"cannot read Nagios's status {self.path}: {exc.strerror}") from None
            self._status = parse(data)
            self._identity = identity
            return self._status

    def host(self, name: str) -> tuple[Status, HostStatus | None] | None:
        """One host's status without parsing the others (for ``resource show``)."""
        with self._lock:
            if self._status is not None and self.identity() == self._identity:
                return self._status, self._status.hosts.get(name)
        if self.path is None:
            return None
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PluginError(f"cannot read Nagios's status {self.path}: {exc.strerror}") from None
        status = parse(data, only=name)
        return status, status.hosts.get(name)
