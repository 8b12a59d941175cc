"""libvirt's errors as qrm's: one line each, naming the host and the partition.

libvirt reports an error as a code (``VIR_ERR_NO_DOMAIN``), a domain (where
it happened: ``VIR_FROM_RPC`` for the connection) and a message. qrm users see
a :class:`~qrm_core.errors.QrmError` whose class says what kind of problem it
is (not found, refused, not supported, the host is unreachable) and whose
message has the host and the partition in it. URIs in messages lose any
password (libvirt URIs rarely carry one, but ``user:secret@`` is valid syntax).
"""

from __future__ import annotations

import re
from typing import Any

from qrm_core.plugin_api import DriverError, InvalidInput, NotFound, QrmError, UnsupportedOperation
from qrm_libvirt.binding import libvirt

# Codes and domains by name: a binding that lacks one simply never matches it.
_NOT_FOUND = ("VIR_ERR_NO_DOMAIN",)
_UNSUPPORTED = ("VIR_ERR_NO_SUPPORT", "VIR_ERR_ARGUMENT_UNSUPPORTED", "VIR_ERR_OPERATION_UNSUPPORTED")
_INVALID = (
    "VIR_ERR_INVALID_ARG",
    "VIR_ERR_XML_ERROR",
    "VIR_ERR_XML_DETAIL",
    "VIR_ERR_XML_INVALID_SCHEMA",
    "VIR_ERR_CONFIG_UNSUPPORTED",
    "VIR_ERR_INVALID_MAC",
)
_CONFLICT = ("VIR_ERR_OPERATION_INVALID", "VIR_ERR_DOM_EXIST", "VIR_ERR_RESOURCE_BUSY")
_CONNECTION_CODES = ("VIR_ERR_SYSTEM_ERROR", "VIR_ERR_INTERNAL_ERROR", "VIR_ERR_NO_CONNECT", "VIR_ERR_RPC")
_CONNECTION_DOMAINS = ("VIR_FROM_RPC", "VIR_FROM_REMOTE", "VIR_FROM_SSH", "VIR_FROM_LIBSSH")
_AUTH = ("VIR_ERR_AUTH_FAILED", "VIR_ERR_AUTH_CANCELLED", "VIR_ERR_AUTH_UNAVAILABLE", "VIR_ERR_ACCESS_DENIED")

_USERINFO_SECRET = re.compile(r"(//[^/@:]*):[^/@]*@")


class HostUnreachable(DriverError):
    """The host's libvirt daemon cannot be reached (or the connection broke)."""

    code = "host_unreachable"
    http_status = 503


class PartitionStateError(DriverError):
    """The partition is not in a state that allows the operation (pausing a stopped one)."""

    code = "partition_state"
    http_status = 409


class LimitExceeded(DriverError):
    """A size beyond what the partition was made for (memory above its maximum)."""

    code = "limit_exceeded"
    http_status = 422


def safe_uri(uri: str) -> str:
    """``uri`` without a password in its user part (``qemu+ssh://u:pw@h/`` -> ``qemu+ssh://u@h/``)."""
    return _USERINFO_SECRET.sub(r"\1@", uri)


def _codes(names: tuple[str, ...]) -> set[int]:
    module = libvirt()
    return {getattr(module, n) for n in names if hasattr(module, n)}


def one_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return "; ".join(lines) or "unknown error"


def message_of(exc: Any) -> str:
    """libvirt's own message of a ``libvirtError``, as one line."""
    getter = getattr(exc, "get_error_message", None)
    return one_line(getter() if getter is not None else str(exc))


def is_connection_error(exc: Any) -> bool:
    """Whether a ``libvirtError`` says the connection failed or broke (not the operation)."""
    code, domain = exc.get_error_code(), exc.get_error_domain()
    if code == getattr(libvirt(), "VIR_ERR_INVALID_CONN", -1):
        return True
    return code in _codes(_CONNECTION_CODES) and domain in _codes(_CONNECTION_DOMAINS)


def unreachable(host: str, uri: str, reason: str) -> HostUnreachable:
    return HostUnreachable(f"cannot reach host {host} ({safe_uri(uri)}): {reason}", host=host)


def translate(
    exc: Any,
    *,
    host: str,
    uri: str,
    doing: str,
    partition: str | None = None,
    driver: str = "libvirt",
    operation: str | None = None,
) -> QrmError:
    """The :class:`QrmError` for a ``libvirtError`` raised while ``doing`` something.

    :param doing: what was being done, for the message (``pause partition p1``).
    :param operation: the optional driver operation, for
        :class:`~qrm_core.errors.UnsupportedOperation`'s details.
    """
    code = exc.get_error_code()
    text = message_of(exc)
    if is_connection_error(exc):
        return unreachable(host, uri, text)
    if code in _codes(_AUTH):
        return DriverError(f"host {host} ({safe_uri(uri)}) refused qrm: {text}", host=host)
    if code in _codes(_NOT_FOUND):
        what = f"partition {partition!r}" if partition else "the partition"
        return NotFound(f"{what} does not exist on host {host}", host=host)
    if code in _codes(_UNSUPPORTED):
        return UnsupportedOperation(
            f"{driver} on {host} cannot {doing}: {text}", driver=driver, operation=operation or doing
        )
    if code in _codes(_INVALID):
        return InvalidInput(f"{doing} on host {host}: {text}")
    if code in _codes(_CONFLICT):
        return PartitionStateError(f"cannot {doing} on host {host}: {text}", host=host)
    return DriverError(f"{doing} on host {host} failed: {text}", host=host)
