"""Moving a partition between two hosts of the same hypervisor.

:class:`LibvirtMigrator` is the real thing, in one of two modes:

* ``managed`` (default): qrm holds a connection to both hosts and libvirt's
  client library runs the migration between them (``migrate3`` with the
  destination connection). Works wherever qrm reaches both hosts, which it
  must anyway.
* ``p2p``: the source host's libvirtd connects to the destination URI itself
  (``migrateToURI3`` with ``VIR_MIGRATE_PEER2PEER``); the hosts need to reach
  each other (ssh keys between them for ``+ssh`` URIs), qrm only the source.

A running partition moves live by default (``VIR_MIGRATE_LIVE``): its memory
is copied while it runs and it pauses only for the last pages. A stopped one
moves its definition (``VIR_MIGRATE_OFFLINE``). Either way the destination
keeps the definition (``PERSIST_DEST``) and the source forgets it
(``UNDEFINE_SOURCE``). The data stream goes to ``migrate_uri``
(``tcp://<destination address>``) when given.

Tuning of a live move (QEMU only; the qemu plugin's settings, see
docs/hypervisors.md): ``max_downtime_ms`` (``migrateSetMaxDowntime`` on the
source before the move; None: QEMU's own 300 ms), ``auto_converge``
(``VIR_MIGRATE_AUTO_CONVERGE``: QEMU slows a guest that dirties memory faster
than it can be sent, so that the move ends) and ``parallel_connections``
(``VIR_MIGRATE_PARALLEL``: multifd over that many connections). All are off
by default: measured between two libvirtds on one machine (docs/benchmarks.md)
each made a 256 MB guest's move slower, not faster.

libvirt's test driver cannot migrate. The drivers take a :class:`Migrator`
as a seam (``driver.migrator``): tests on the test driver that check what
qrm does around a migration substitute a migrator that moves the definition
(see ``qrm_libvirt.testing.DefinitionMover``); real migration is tested
between two real libvirt daemons running QEMU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from qrm_libvirt.binding import libvirt

MODES = ("managed", "p2p")


@dataclass(frozen=True)
class MigrationRequest:
    """One migration: ``domain`` (on ``source``) to the host at ``destination_uri``."""

    domain: Any
    source: Any
    destination: Any
    destination_uri: str
    live: bool
    mode: str = "managed"
    migrate_uri: str | None = None
    bandwidth_mib: int | None = None
    max_downtime_ms: int | None = None
    auto_converge: bool = False
    parallel_connections: int = 0


class Migrator(Protocol):
    def can_migrate(self, source_uri: str, destination_uri: str | None = None) -> bool:
        """Whether migrations from (and to) these hosts can work at all (no I/O)."""

    def migrate(self, request: MigrationRequest) -> None:
        """Move the domain; raise ``libvirtError`` as libvirt does."""


class LibvirtMigrator:
    """Migration done by libvirt (QEMU, libxl); not possible on the test driver."""

    def can_migrate(self, source_uri: str, destination_uri: str | None = None) -> bool:
        uris = [source_uri] + ([destination_uri] if destination_uri else [])
        return not any(u.startswith("test:") for u in uris)

    def migrate(self, request: MigrationRequest) -> None:
        lv = libvirt()
        active = bool(request.domain.isActive())
        flags = lv.VIR_MIGRATE_PERSIST_DEST | lv.VIR_MIGRATE_UNDEFINE_SOURCE
        params: dict[str, Any] = {}
        if active:
            if request.live:
                flags |= lv.VIR_MIGRATE_LIVE
            if request.migrate_uri:
                params[lv.VIR_MIGRATE_PARAM_URI] = request.migrate_uri
            if request.bandwidth_mib:
                params[lv.VIR_MIGRATE_PARAM_BANDWIDTH] = request.bandwidth_mib
            if request.auto_converge:
                flags |= lv.VIR_MIGRATE_AUTO_CONVERGE
            if request.parallel_connections:
                flags |= lv.VIR_MIGRATE_PARALLEL
                params[lv.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = request.parallel_connections
            if request.max_downtime_ms:
                # Held by the source's QEMU until the move ends (its destination starts afresh).
                request.domain.migrateSetMaxDowntime(request.max_downtime_ms, 0)
        else:
            flags |= lv.VIR_MIGRATE_OFFLINE
        if request.mode == "p2p":
            request.domain.migrateToURI3(request.destination_uri, params, flags | lv.VIR_MIGRATE_PEER2PEER)
        else:
            request.domain.migrate3(request.destination, params, flags)
