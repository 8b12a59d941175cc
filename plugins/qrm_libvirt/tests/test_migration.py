"""What LibvirtMigrator asks libvirt for (flags, parameters, downtime), given a request.

The test driver cannot migrate, so the domain here records the calls; the real
migration is tested between two real libvirt daemons (plugins/qrm_qemu/tests/test_real_qemu.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from qrm_libvirt.migration import LibvirtMigrator, MigrationRequest


class RecordingDomain:
    def __init__(self, active: bool) -> None:
        self.active = active
        self.calls: list[tuple[Any, ...]] = []

    def isActive(self) -> int:
        return int(self.active)

    def migrateSetMaxDowntime(self, ms: int, flags: int) -> int:
        self.calls.append(("downtime", ms))
        return 0

    def migrate3(self, dconn: Any, params: dict[str, Any], flags: int) -> None:
        self.calls.append(("migrate3", params, flags))

    def migrateToURI3(self, uri: str, params: dict[str, Any], flags: int) -> None:
        self.calls.append(("migrateToURI3", params, flags))


def request(dom: RecordingDomain, **extra: Any) -> MigrationRequest:
    return MigrationRequest(
        domain=dom, source=None, destination=object(), destination_uri="qemu:///x", live=True, **extra
    )


def test_a_plain_live_move(libvirt) -> None:
    dom = RecordingDomain(active=True)
    LibvirtMigrator().migrate(request(dom, migrate_uri="tcp://10.0.0.2"))
    ((what, params, flags),) = dom.calls
    assert what == "migrate3" and params == {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://10.0.0.2"}
    assert (
        flags
        == libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    )


def test_a_tuned_live_move(libvirt) -> None:
    dom = RecordingDomain(active=True)
    LibvirtMigrator().migrate(request(dom, max_downtime_ms=500, auto_converge=True, parallel_connections=4))
    assert dom.calls[0] == ("downtime", 500)
    _, params, flags = dom.calls[1]
    assert flags & libvirt.VIR_MIGRATE_AUTO_CONVERGE and flags & libvirt.VIR_MIGRATE_PARALLEL
    assert params == {libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS: 4}


@pytest.mark.parametrize("mode", ["managed", "p2p"])
def test_a_stopped_partition_moves_its_definition_untuned(libvirt, mode) -> None:
    dom = RecordingDomain(active=False)
    LibvirtMigrator().migrate(
        request(dom, mode=mode, max_downtime_ms=500, auto_converge=True, parallel_connections=4)
    )
    ((_, params, flags),) = dom.calls
    assert params == {} and flags & libvirt.VIR_MIGRATE_OFFLINE
    assert not flags & (
        libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_AUTO_CONVERGE | libvirt.VIR_MIGRATE_PARALLEL
    )
