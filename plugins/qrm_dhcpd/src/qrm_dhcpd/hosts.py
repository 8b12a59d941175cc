"""Host reservations: what one resource becomes in the DHCP server, and the rules for it.

Every value that reaches a configuration file, a database row or an OMAPI
message passes :func:`host_from` first: the MAC must be six lower-case hex
pairs, the hostname a plain DNS label, the address an IPv4 host address of the
subnet. Core validates the same things when a resource is entered; checking
again here means a row written by other means (an old database, a future
import path) still cannot inject configuration. A value that fails is left
out (the reservation keeps what is safe) and the reason is reported.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from qrm_dhcpd.settings import DhcpdSettings

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
HOSTNAME_RE = re.compile(r"^(?=.{1,63}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Host:
    """One reservation: a MAC, and the address and name it gets (either may be absent)."""

    mac: str
    ip: ipaddress.IPv4Address | None = None
    hostname: str | None = None
    resource_id: int | None = None

    @property
    def hex(self) -> str:
        """The MAC as 12 hex digits (``525400123456``)."""
        return self.mac.replace(":", "")

    @property
    def object_name(self) -> str:
        """The name of the host object in ISC dhcpd: ``qrm-<mac hex>``, from the MAC only, so safe."""
        return f"qrm-{self.hex}"


@dataclass
class Problem:
    """Something in the qrm database that could not go into the DHCP server as it is."""

    mac: str
    message: str

    def __str__(self) -> str:
        return f"{self.mac}: {self.message}"


@dataclass
class HostSet:
    """The reservations of a full rewrite, and what had to be left out."""

    hosts: list[Host] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def host_from(
    settings: DhcpdSettings,
    *,
    mac: str,
    ip: str | None,
    hostname: str | None,
    resource_id: int | None = None,
    pinned_in_pool: bool = True,
    problems: list[Problem] | None = None,
) -> Host | None:
    """Build the reservation of one resource, or None when its MAC is unusable.

    ``pinned_in_pool`` says whether an address inside the dynamic pool may be
    reserved (Kea keeps reserved pool addresses away from other clients; ISC
    dhcpd does not, so its backend passes False and such a host keeps only its
    name). Values left out are appended to ``problems``.
    """
    notes = problems if problems is not None else []
    text_mac = mac.strip().lower() if isinstance(mac, str) else ""
    if not MAC_RE.match(text_mac):
        notes.append(Problem(repr(mac), "not a MAC address in aa:bb:cc:dd:ee:ff form; no reservation"))
        return None
    name: str | None = None
    if hostname:
        if isinstance(hostname, str) and HOSTNAME_RE.match(hostname):
            name = hostname
        else:
            notes.append(Problem(text_mac, f"hostname {hostname!r} is not a plain DNS label; left out"))
    address: ipaddress.IPv4Address | None = None
    if ip:
        address = _usable_address(settings, text_mac, ip, pinned_in_pool, notes)
    return Host(mac=text_mac, ip=address, hostname=name, resource_id=resource_id)


def _usable_address(
    settings: DhcpdSettings, mac: str, ip: str, pinned_in_pool: bool, notes: list[Problem]
) -> ipaddress.IPv4Address | None:
    try:
        address = ipaddress.ip_address(ip.strip())
    except (ValueError, AttributeError):
        notes.append(Problem(mac, f"address {ip!r} is not an IP address; reserved without one"))
        return None
    net = settings.subnet
    assert net is not None
    if not isinstance(address, ipaddress.IPv4Address) or address not in net:
        notes.append(Problem(mac, f"address {address} is outside subnet {net}; reserved without one"))
        return None
    if address in (net.network_address, net.broadcast_address):
        notes.append(Problem(mac, f"address {address} is not a host address of {net}; reserved without one"))
        return None
    if address in (settings.router, settings.next_server):
        notes.append(
            Problem(mac, f"address {address} belongs to the router or TFTP server; reserved without one")
        )
        return None
    if not pinned_in_pool and settings.in_pool(address):
        notes.append(
            Problem(mac, f"address {address} is inside the dynamic pool; ISC dhcpd cannot pin it, name only")
        )
        return None
    return address


def build_host_set(
    settings: DhcpdSettings,
    rows: Iterable[tuple[int | None, str, str | None, str | None]],
    *,
    pinned_in_pool: bool = True,
) -> HostSet:
    """Every reservation of a full rewrite from ``(id, mac, ip, hostname)`` rows, in id order.

    Two resources claiming the same address: the one entered first keeps it,
    the other is reserved without an address (and reported), because both
    servers refuse or misbehave on duplicate fixed addresses.
    """
    result = HostSet()
    seen_ips: dict[ipaddress.IPv4Address, str] = {}
    seen_macs: set[str] = set()
    for resource_id, mac, ip, hostname in rows:
        host = host_from(
            settings,
            mac=mac,
            ip=ip,
            hostname=hostname,
            resource_id=resource_id,
            pinned_in_pool=pinned_in_pool,
            problems=result.problems,
        )
        if host is None:
            continue
        if host.mac in seen_macs:
            result.problems.append(Problem(host.mac, "MAC appears twice; the second one is left out"))
            continue
        seen_macs.add(host.mac)
        address = host.ip
        if address is not None:
            owner = seen_ips.get(address)
            if owner is not None:
                result.problems.append(
                    Problem(
                        host.mac, f"address {host.ip} is already reserved for {owner}; reserved without one"
                    )
                )
                host = Host(mac=host.mac, ip=None, hostname=host.hostname, resource_id=host.resource_id)
            else:
                seen_ips[address] = host.mac
        result.hosts.append(host)
    return result
