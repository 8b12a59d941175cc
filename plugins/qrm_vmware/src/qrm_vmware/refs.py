"""How qrm names vSphere things, without the SDK: host references and the VM marker.

* A host resource of hypervisor ``vmware`` carries a hypervisor URI
  ``vmware://CONNECTION/HostSystem/host-21`` (an ESXi host) or
  ``vmware://CONNECTION/ClusterComputeResource/domain-c7`` (a cluster:
  vCenter picks the host of each VM). ``qrm vmware sync`` sets it; it can be
  set by hand with ``qrm resource set HOST --hypervisor-uri URI``.
* A VM that qrm made carries a marker as the first line of its notes
  (``config.annotation``)::

      qrm: partition=web-1 mac=52:54:00:1a:2b:3c

  which is how qrm tells its partitions from the other VMs of a host in one
  PropertyCollector sweep. ``state=creating`` marks a VM whose creation has
  not finished (qrm removes it, or reports it, if creation fails);
  ``memory_mb=`` and ``cpus=`` are changes asked for the next power-on;
  ``cluster=MOID`` marks a VM placed on a cluster resource (vCenter picks
  and changes its host), which is that cluster's partition, not its host's.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from qrm_core.plugin_api import InvalidInput

SCHEME = "vmware"
KINDS = ("HostSystem", "ClusterComputeResource")
_MOID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,79}$")
_CONNECTION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
MARKER = "qrm:"
_TOKEN = re.compile(r"^[A-Za-z0-9._:-]+$")


@dataclass(frozen=True)
class HostRef:
    connection: str
    kind: str  # HostSystem | ClusterComputeResource
    moid: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}://{self.connection}/{self.kind}/{self.moid}"

    @property
    def is_cluster(self) -> bool:
        return self.kind == "ClusterComputeResource"


def host_uri(connection: str, kind: str, moid: str) -> str:
    return HostRef(connection, kind, moid).uri


def parse_host_uri(uri: str | None, label: str = "the host") -> HostRef:
    """``vmware://CONNECTION/HostSystem/MOID`` -> :class:`HostRef` (one-line error otherwise)."""
    hint = (
        "run 'qrm vmware sync CONNECTION', or set it with 'qrm resource set HOST --hypervisor-uri "
        "vmware://CONNECTION/HostSystem/host-NN'"
    )
    if not uri:
        raise InvalidInput(f"{label} has no vCenter reference (hypervisor URI): {hint}")
    parts = urlsplit(uri)
    pieces = parts.path.strip("/").split("/")
    if (
        parts.scheme != SCHEME
        or not _CONNECTION.match(parts.netloc or "")
        or len(pieces) != 2
        or pieces[0] not in KINDS
        or not _MOID.match(pieces[1])
        or parts.query
        or parts.fragment
    ):
        raise InvalidInput(f"the hypervisor URI {uri!r} of {label} is not a vCenter reference: {hint}")
    return HostRef(parts.netloc, pieces[0], pieces[1])


def host_mac(instance_uuid: str, moid: str) -> str:
    """A stable, locally administered MAC naming a vCenter host or cluster in qrm.

    A host resource needs a MAC (it is how qrm keys machines); an ESXi host
    has several NICs and boots nothing through qrm, so qrm derives one from
    vCenter's instance UUID and the object's id: the same on every sync,
    distinct across vCenters."""
    digest = hashlib.sha256(f"{instance_uuid}/{moid}".encode()).digest()
    octets = [(digest[0] & 0xFC) | 0x02, *digest[1:6]]  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in octets)


@dataclass(frozen=True)
class Marker:
    """What qrm wrote in a VM's notes."""

    partition: str
    mac: str
    creating: bool = False
    pending: dict[str, int] = field(default_factory=dict)
    cluster: str | None = None

    def text(self, note: str = "") -> str:
        words = [MARKER, f"partition={self.partition}", f"mac={self.mac}"]
        if self.cluster:
            words.append(f"cluster={self.cluster}")
        if self.creating:
            words.append("state=creating")
        words.extend(f"{k}={v}" for k, v in sorted(self.pending.items()))
        line = " ".join(words)
        return (
            line
            + "\n"
            + (note or "A partition of qrm: it network-boots into qrm. qrm finds it by this line.")
        )

    def belongs_to(self, ref: HostRef) -> bool:
        """Is this VM (running on ``ref``'s host, or in its cluster) a partition of ``ref``'s resource?"""
        return self.cluster == ref.moid if ref.is_cluster else self.cluster is None

    def with_pending(self, **values: int | None) -> Marker:
        pending = dict(self.pending)
        for key, value in values.items():
            if value is None:
                pending.pop(key, None)
            else:
                pending[key] = value
        return replace(self, pending=pending)


def parse_marker(annotation: str | None) -> Marker | None:
    """The marker in a VM's notes, or None for a VM qrm did not make."""
    if not annotation:
        return None
    first = annotation.split("\n", 1)[0].strip()
    words = first.split()
    if not words or words[0] != MARKER:
        return None
    values: dict[str, str] = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or not _TOKEN.match(value):
            return None
        values[key] = value
    if "partition" not in values or "mac" not in values:
        return None
    pending: dict[str, int] = {
        k: int(values[k]) for k in ("memory_mb", "cpus") if k in values and values[k].isdigit()
    }
    return Marker(
        partition=values["partition"],
        mac=values["mac"].lower(),
        creating=values.get("state") == "creating",
        pending=pending,
        cluster=values.get("cluster") or None,
    )


def vm_name(partition: str, mac: str) -> str:
    """The VM's name in vCenter: the partition's, made unique by its MAC (VM
    names are unique per folder in vCenter; partition names only per host)."""
    return f"{partition}-{mac.replace(':', '')[-6:]}"
