"""Plugins told of a machine's registration or release are told with no transaction open (a guard:
the payloads are built by services.public, which ends the read it opens).

A hook may be slow (the DHCP plugin writes a reservation into Kea's database,
the Nagios plugin reloads Nagios) or open a service context of its own (to
record a failure). On SQLite a transaction open meanwhile holds the write
lock (``BEGIN IMMEDIATE``): every registration and heartbeat would wait behind
the hook, and a hook recording an event would wait for itself.
"""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy.engine import make_url

from qrm_core import hookimpl
from qrm_core.services import agent, boot_images, service_context, storage
from qrm_core.services import virtual_environments as ves


@pytest.mark.qrm_backends("sqlite")
def test_registration_and_release_hooks_run_without_the_write_lock(qrm_settings, qrm_plugins) -> None:
    path = make_url(qrm_settings.effective_database_url).database
    seen: list[str] = []

    def probe(what: str) -> None:
        other = sqlite3.connect(path, timeout=0.2, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # 'database is locked' while a transaction is open
            other.execute("ROLLBACK")
        finally:
            other.close()
        seen.append(what)

    class Listener:
        @hookimpl
        def qrm_resource_updated(self, resource, changed, ctx) -> None:
            probe("updated")

        @hookimpl
        def qrm_ve_resource_released(self, ve, resource, ctx) -> None:
            probe("released")

    qrm_plugins.register(Listener(), "listener")
    mac = "02:53:00:00:00:01"
    with service_context(qrm_settings, actor="agent", plugins=qrm_plugins) as ctx:
        first = agent.register(ctx, mac=mac, ip="198.18.9.1", cpus=2, memory_mb=2048)
    # The agent registers again (its own token as proof) reporting a new address.
    with service_context(qrm_settings, actor="agent", plugins=qrm_plugins) as ctx:
        again = agent.register(ctx, mac=mac, ip="198.18.9.2", cpus=2, memory_mb=2048, proof=first.token)
    assert seen == ["updated"]
    # A member released from its VE: the storage driver, then the plugins, are told.
    with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
        storage.add_storage(ctx, name="st", type="fake", address="10.0.0.2")
        storage.add_filesystem_image(ctx, name="root", storage="st", location="/exports/root")
        boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1", make_default=True)
        ves.create_ve(ctx, name="web", boot_image="idle", fs_image="root")
        ves.start_ve(ctx, "web")
        row = agent.authenticate_resource(ctx, again.resource_id, again.token)
        row.ve_id = ves.get_ve_row(ctx, "web").id
        ctx.session.add(row)
        ctx.commit()
        ves.stop_ve(ctx, "web")
    assert seen == ["updated", "released"]
