"""Input validation shared by every service.

Everything a user types that may later reach a generated configuration file
(DHCP, PXE, exports, Nagios) is restricted here to a safe alphabet, so no name
or comment can inject configuration. Messages are one line and say what is
allowed.
"""

from __future__ import annotations

import ipaddress
import re

from qrm_core.errors import InvalidInput

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KERNEL_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}$")
HOSTNAME_RE = re.compile(r"^(?=.{1,63}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$")
KERNEL_ARG_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.,:/=+@%-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def name(value: str, what: str = "name") -> str:
    """Object names: 1-64 of letters, digits, '.', '_', '-', starting with a letter or digit."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InvalidInput(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if value.isdigit():
        raise InvalidInput(f"invalid {what} {value!r}: a name cannot be only digits")
    return value


def comment(value: str | None, what: str = "comment") -> str:
    """Free text on one line, at most 255 characters, no control characters."""
    if value is None:
        return ""
    if len(value) > 255:
        raise InvalidInput(f"{what} is too long ({len(value)} characters, at most 255)")
    if _CONTROL.search(value):
        raise InvalidInput(f"{what} must be one line without control characters")
    return value


def ip(value: str, what: str = "IP address") -> str:
    """An IPv4 or IPv6 address, returned in canonical form."""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except (ValueError, AttributeError):
        raise InvalidInput(f"invalid {what} {value!r}") from None


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
    if not HOSTNAME_RE.match(value):
        raise InvalidInput(f"invalid hostname {value!r}: use letters, digits and '-', at most 63 characters")
    return value


def kernel_version(value: str) -> str:
    if not isinstance(value, str) or not KERNEL_VERSION_RE.match(value):
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
        if not KERNEL_ARG_RE.match(token) or len(token) > 255:
            raise InvalidInput(f"invalid {what}: {token!r} is not a plain key or key=value token")
    joined = " ".join(tokens)
    if len(joined) > 512:
        raise InvalidInput(f"{what} are too long ({len(joined)} characters, at most 512)")
    return tokens


def positive(value: int, what: str, minimum: int = 1, maximum: int | None = None) -> int:
    if value < minimum:
        raise InvalidInput(f"{what} must be at least {minimum} (got {value})")
    if maximum is not None and value > maximum:
        raise InvalidInput(f"{what} must be at most {maximum} (got {value})")
    return value
