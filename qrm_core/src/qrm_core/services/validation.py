"""Input validation shared by every service.

Everything a user types that may later reach a generated configuration file
(DHCP, PXE, exports, Nagios) is restricted here to a safe alphabet, so no name
or comment can inject configuration. Messages are one line and say what is
allowed.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import sqlalchemy as sa

from qrm_core.errors import InvalidInput

#: The largest integer qrm stores or looks up: its integer columns are 32-bit
#: signed on every database. Every count, size and id a user gives is checked
#: against a range inside it (:func:`positive`, :func:`reference_number`), and
#: the REST API declares the same ranges in its OpenAPI document.
MAX_INT = 2**31 - 1

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KERNEL_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}$")
HOSTNAME_RE = re.compile(r"^(?=.{1,63}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$")
KERNEL_ARG_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.,:/=+@%-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def name(value: str, what: str = "name") -> str:
    """Object names: 1-64 of letters, digits, '.', '_', '-', starting with a letter or digit."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise InvalidInput(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if value.isdigit():
        raise InvalidInput(f"invalid {what} {value!r}: a name cannot be only digits")
    return value


def same_name(column: Any, value: str) -> Any:
    """SQL for ``column`` equal to ``value`` regardless of case: names that
    differ only in case (``nfs`` and ``NFS``) are one name to people, to the
    DNS and to MariaDB's default collation, so no two objects of a kind may
    have them (the rule is the services', the same on every backend; names
    are ASCII, so LOWER() agrees everywhere)."""
    return sa.func.lower(column) == value.lower()


def comment(value: str | None, what: str = "comment") -> str:
    """Free text on one line, at most 255 characters, no control characters."""
    if value is None:
        return ""
    if len(value) > 255:
        raise InvalidInput(f"{what} is too long ({len(value)} characters, at most 255)")
    if _CONTROL.search(value):
        raise InvalidInput(f"{what} must be one line without control characters")
    return value


def one_line(value: str) -> str:
    """Text from elsewhere (a program's output) on one line: control characters become spaces."""
    return _CONTROL.sub(" ", value).strip()


def ip(value: str, what: str = "IP address") -> str:
    """An IPv4 or IPv6 address, returned in canonical form."""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except (ValueError, AttributeError):
        raise InvalidInput(f"invalid {what} {value!r}") from None


_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")


def host_ip(value: str, what: str = "IP address") -> str:
    """The address of one machine to connect to: not the unspecified address
    (``0.0.0.0``, ``::`` and the rest of 0.0.0.0/8), not a broadcast
    (``255.255.255.255``) or another address of 240.0.0.0/4, not multicast."""
    text = ip(value, what)
    address = ipaddress.ip_address(text)
    kind = None
    if address.is_unspecified or (address.version == 4 and address in _THIS_NETWORK):
        kind = "the unspecified address ('this network')"
    elif address.is_multicast:
        kind = "a multicast address"
    elif address.version == 4 and address == ipaddress.IPv4Address("255.255.255.255"):
        kind = "the broadcast address"
    elif address.version == 4 and address.is_reserved:
        kind = "a reserved address (240.0.0.0/4)"
    if kind:
        raise InvalidInput(f"invalid {what} {text}: {kind} is not one machine's address")
    return text


_MAC_GROUPS = re.compile(r"^[0-9a-fA-F]{1,2}([:-])[0-9a-fA-F]{1,2}(\1[0-9a-fA-F]{1,2}){4}$")
_MAC_CISCO = re.compile(r"^[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}$")
_MAC_BARE = re.compile(r"^[0-9a-fA-F]{12}$")


def mac(value: str) -> str:
    """A unicast Ethernet MAC in any usual notation, returned as ``aa:bb:cc:dd:ee:ff``."""
    text = value.strip() if isinstance(value, str) else ""
    if _MAC_GROUPS.match(text):
        digits = "".join(part.zfill(2) for part in re.split(r"[:-]", text))
    elif _MAC_CISCO.match(text):
        digits = text.replace(".", "")
    elif _MAC_BARE.match(text):
        digits = text
    else:
        raise InvalidInput(f"invalid MAC address {value!r}")
    digits = digits.lower()
    if int(digits[:2], 16) & 1:
        raise InvalidInput(f"invalid MAC address {value!r}: it is a multicast address")
    if digits == "000000000000":
        raise InvalidInput(f"invalid MAC address {value!r}: it is all zeros")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def looks_like_mac(value: str) -> bool:
    try:
        mac(value)
    except InvalidInput:
        return False
    return True


def hostname(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if not HOSTNAME_RE.fullmatch(value):
        raise InvalidInput(f"invalid hostname {value!r}: use letters, digits and '-', at most 63 characters")
    return value


def kernel_version(value: str) -> str:
    if not isinstance(value, str) or not KERNEL_VERSION_RE.fullmatch(value):
        raise InvalidInput(
            f"invalid kernel version {value!r}: use letters, digits and '.', '_', '+', '~', '-'"
        )
    return value


def kernel_args(value: str | list[str] | None, what: str = "kernel arguments") -> list[str]:
    """Kernel command-line tokens: each ``key`` or ``key=value``, no quotes or spaces inside."""
    if value is None:
        return []
    tokens = value.split() if isinstance(value, str) else list(value)
    for token in tokens:
        if not KERNEL_ARG_RE.fullmatch(token) or len(token) > 255:
            raise InvalidInput(f"invalid {what}: {token!r} is not a plain key or key=value token")
    joined = " ".join(tokens)
    if len(joined) > 512:
        raise InvalidInput(f"{what} are too long ({len(joined)} characters, at most 512)")
    return tokens


#: One monitoring check a VE asks for: ``NAME`` or ``NAME:ARG[:ARG...]`` (``http:80``,
#: ``http:8080:/health``, ``tcp:5432``). The alphabet leaves out everything that
#: means something in a Nagios object definition (``;``, ``{``, ``}``, newlines),
#: a check command line (``!``, ``$``) or a shell (quotes, spaces, ``|&<>`` ...).
MONITOR_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
MONITOR_ARG_RE = re.compile(r"^[A-Za-z0-9._/-]{1,100}$")
MAX_MONITOR_CHECKS = 16
MAX_MONITOR_ARGS = 4


def monitor_checks(values: list[str] | None) -> list[str]:
    """The checks a virtual environment asks monitoring plugins to run, in order, without duplicates."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    result: list[str] = []
    for raw in values:
        text = raw.strip() if isinstance(raw, str) else ""
        name, *args = text.split(":")
        if not MONITOR_NAME_RE.fullmatch(name):
            raise InvalidInput(
                f"invalid monitor check {raw!r}: NAME[:ARG...] where NAME is 1-32 lower-case letters, digits, "
                "'_' or '-' starting with a letter (e.g. http:80)"
            )
        if len(args) > MAX_MONITOR_ARGS:
            raise InvalidInput(f"invalid monitor check {raw!r}: at most {MAX_MONITOR_ARGS} arguments")
        for arg in args:
            if not MONITOR_ARG_RE.fullmatch(arg):
                raise InvalidInput(
                    f"invalid monitor check {raw!r}: each argument is 1-100 letters, digits, '.', '_', '/' or '-'"
                )
        if text not in result:
            result.append(text)
    if len(result) > MAX_MONITOR_CHECKS:
        raise InvalidInput(f"at most {MAX_MONITOR_CHECKS} monitor checks per virtual environment")
    return result


def positive(value: int, what: str, minimum: int = 1, maximum: int = MAX_INT) -> int:
    """An integer in ``minimum..maximum`` (by default at most :data:`MAX_INT`, what the database holds)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be a whole number (got {value!r})")
    if value < minimum:
        raise InvalidInput(f"{what} must be at least {minimum} (got {value})")
    if value > min(maximum, MAX_INT):
        raise InvalidInput(f"{what} must be at most {min(maximum, MAX_INT)} (got {value})")
    return value


def reference_number(ref: str | int) -> int | None:
    """A reference to an object by number (``12``): the number, or None when
    ``ref`` is not written in ASCII digits ('²' and '٣' are digits to Python,
    not numbers here). A number outside ``1..MAX_INT`` refers to nothing (0)."""
    if isinstance(ref, bool):
        return None
    if isinstance(ref, int):
        number = ref
    else:
        text = ref.strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 12:
            return 0 if text.isascii() and text.isdigit() else None
        number = int(text)
    return number if 1 <= number <= MAX_INT else 0
