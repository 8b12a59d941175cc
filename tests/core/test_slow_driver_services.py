"""Operators' commands that wait for a slow driver do not stop the server answering machines.

The rule: no driver call inside a database transaction (read, commit, call,
record). On SQLite a service's transaction takes the write lock at its first
statement (``BEGIN IMMEDIATE``), so one left open across a storage server's
or a hypervisor's answer stops every registration and heartbeat behind it.
Here the services an operator's ``qrm storage add``, ``filesystem-image
add/remove/clone/snapshot/revert/capture`` and ``partition add/set/migrate/
pause`` run call drivers that take DELAY seconds, while machines (agents
speaking the real protocol over HTTP, with a timeout shorter than DELAY)
keep registering and heartbeating; each case asserts what they saw (nothing
refused, nothing timed out) and that the slow call did happen. One server
and one set of machines serve every case (the engine's own driver calls are
in test_slow_drivers.py).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from test_slow_drivers import Agents

from qrm_core import db
from qrm_core.config import Settings, reset_settings_cache
from qrm_core.drivers.base import HostTarget, PartitionSpec, StorageTarget, VolumeInfo
from qrm_core.drivers.fake import FakeHypervisor, FakeStorage
from qrm_core.errors import DriverError
from qrm_core.models import FilesystemImage, ImageOrigin, ImageState
from qrm_core.plugins import HYPERVISOR_GROUP, STORAGE_GROUP, PluginSystem, set_plugin_system
from qrm_core.services import ServiceContext, images, partitions, resources, service_context, storage
from qrm_core.testing import RunningServer, create_test_database, empty_database, running_server
from qrm_core.testkit import wait_until

pytestmark = [pytest.mark.qrm_backends("sqlite"), pytest.mark.slow]

DELAY = 4.0
KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-real-key\n-----END OPENSSH PRIVATE KEY-----"


class _Slow:
    """Sleeps ``delay`` seconds in each call named in ``slow`` (recording it in ``calls``)."""

    delay = DELAY
    slow: frozenset[str] = frozenset()

    def _slow(self, what: str) -> None:
        if what in self.slow:
            self.calls.append(what)
            time.sleep(self.delay)


class SlowStorage(_Slow, FakeStorage):
    name = "slowfs"
    description = "the fake storage, slowly"
    slow = frozenset(
        {"check_server", "create_volume", "remove_volume", "clone_volume", "snapshot_volume", "revert_volume",
         "open_tree", "export_readiness"}
    )  # fmt: skip

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.calls: list[str] = []

    def check_server(self, storage: StorageTarget) -> None:
        self._slow("check_server")

    def export_readiness(self, storage: StorageTarget) -> str | None:
        self._slow("export_readiness")  # cheap by contract; slow here to show no lock is held
        return None

    def create_volume(self, storage: StorageTarget, name: str, size_mb: int) -> VolumeInfo:
        self._slow("create_volume")
        return super().create_volume(storage, name, size_mb)

    def remove_volume(self, storage: StorageTarget, location: str) -> None:
        self._slow("remove_volume")
        super().remove_volume(storage, location)

    def clone_volume(self, storage: StorageTarget, location: str, name: str) -> VolumeInfo:
        self._slow("clone_volume")
        return super().clone_volume(storage, location, name)

    def snapshot_volume(self, storage: StorageTarget, location: str, label: str) -> None:
        self._slow("snapshot_volume")
        super().snapshot_volume(storage, location, label)

    def revert_volume(self, storage: StorageTarget, location: str, label: str) -> None:
        self._slow("revert_volume")
        super().revert_volume(storage, location, label)

    def open_tree(self, storage: StorageTarget, location: str) -> str:
        # A storage server that takes its time, then cannot be reached: a capture
        # goes no further (nothing is sent to the machine it names).
        self._slow("open_tree")
        raise DriverError(f"cannot reach storage server {storage.name} over SSH: connection timed out")


class SlowHypervisor(_Slow, FakeHypervisor):
    name = "slow"
    description = "the fake hypervisor, slowly"
    slow = frozenset(
        {"create_partition", "start_partition", "set_memory", "migrate_partition", "pause_partition"}
    )

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.calls: list[str] = []

    def create_partition(self, host: HostTarget, spec: PartitionSpec):
        self._slow("create_partition")
        return super().create_partition(host, spec)

    def start_partition(self, host: HostTarget, name: str) -> None:
        self._slow("start_partition")
        super().start_partition(host, name)

    def set_memory(self, host: HostTarget, name: str, memory_mb: int, **kwargs: bool) -> None:
        self._slow("set_memory")
        super().set_memory(host, name, memory_mb, **kwargs)

    def migrate_partition(
        self, host: HostTarget, name: str, destination: HostTarget, live: bool = True
    ) -> None:
        self._slow("migrate_partition")
        super().migrate_partition(host, name, destination, live=live)

    def pause_partition(self, host: HostTarget, name: str) -> None:
        self._slow("pause_partition")
        super().pause_partition(host, name)


@dataclass
class Lab:
    running: RunningServer
    storage: SlowStorage
    hypervisor: SlowHypervisor
    agents: Agents
    hosts: list[str]

    @property
    def settings(self) -> Settings:
        return self.running.settings

    @contextmanager
    def ctx(self) -> Iterator[ServiceContext]:
        with service_context(self.settings, plugins=self.running.plugins, actor="operator") as ctx:
            yield ctx

    @contextmanager
    def fast(self) -> Iterator[None]:
        """Set-up steps: the drivers answer at once."""
        self.storage.delay = self.hypervisor.delay = 0
        try:
            yield
        finally:
            self.storage.delay = self.hypervisor.delay = DELAY

    @contextmanager
    def machines_answered(self, *calls: str) -> Iterator[None]:
        """While the block runs, every machine's request is answered in time;
        ``calls`` (the slow driver calls the block makes) did happen."""
        self.agents.failures.clear()
        made = len(self.storage.calls), len(self.hypervisor.calls)
        before, started = self.agents.answered, time.monotonic()
        yield
        took = time.monotonic() - started
        assert self.agents.failures == []
        # (The engine may make a partition being added too: what exists is not made twice.)
        assert not Counter(calls) - Counter(self.storage.calls[made[0] :] + self.hypervisor.calls[made[1] :])
        # Four machines asking every 0.3 s were answered all along: at least once
        # every 2 s each even on a loaded machine (a server stopped behind a lock
        # answers no one for DELAY seconds).
        assert self.agents.answered - before >= 4 * took / 2, (self.agents.answered - before, took)


@pytest.fixture(scope="module")
def lab(qrm_backend: str, _qrm_databases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    database = _qrm_databases.get(qrm_backend)
    if database is None:
        database = _qrm_databases[qrm_backend] = create_test_database(
            qrm_backend, tmp_path_factory.mktemp("db")
        )
    with pytest.MonkeyPatch.context() as env:
        for key in list(os.environ):
            if key.startswith("QRM_") and not key.startswith("QRM_TEST_"):
                env.delenv(key)
        env.setenv("QRM_DATA_DIR", str(tmp_path_factory.mktemp("slowservices") / "data"))
        env.setenv("QRM_DATABASE_URL", database.url)
        env.setenv("QRM_ACTOR", "tester")
        env.setenv("QRM_INIT_BOOT_IMAGE", "false")
        reset_settings_cache()
        set_plugin_system(None)
        settings = Settings()
        plugins = PluginSystem(settings).load()
        slow_storage, slow_hypervisor = SlowStorage(settings), SlowHypervisor(settings)
        plugins.add_driver(STORAGE_GROUP, slow_storage)
        plugins.add_driver(HYPERVISOR_GROUP, slow_hypervisor)
        try:
            with running_server(settings, plugins=plugins, engine_interval=0.2) as running:
                agents = Agents(running.url, running.enrollment_token())
                macs = [f"02:52:00:00:00:{i:02x}" for i in range(4)]
                try:
                    for i, mac in enumerate(macs):
                        agents.start(mac, f"198.18.8.{i + 1}", hypervisors=("slow",) if i < 2 else ())
                    wait_until(lambda: agents.answered >= 8, "the machines' registrations", 30, 0.1)
                    with service_context(settings, plugins=plugins) as ctx:
                        by_mac = {r.mac: r for r in resources.list_resources(ctx).items}
                    hosts = [str(by_mac[mac].id) for mac in macs[:2]]
                    lab = Lab(running, slow_storage, slow_hypervisor, agents, hosts)
                    with lab.fast(), lab.ctx() as ctx:
                        storage.add_storage(ctx, name="san", type="slowfs", address="10.0.0.2")
                    yield lab
                finally:
                    slow_storage.delay = slow_hypervisor.delay = 0  # a call under way ends soon
                    agents.join()
        finally:
            set_plugin_system(None)
            reset_settings_cache()
            db.dispose_engines()
            empty_database(database.engine)


def test_storage_add_and_set(lab: Lab) -> None:
    with lab.machines_answered("check_server", "export_readiness", "check_server"), lab.ctx() as ctx:
        storage.add_storage(ctx, name="nas", type="slowfs", address="10.0.0.3")
        changed = storage.set_storage(ctx, "nas", settings={"pool": "fast"})
    assert changed.settings == {"pool": "fast"}


def test_filesystem_image_add_and_remove(lab: Lab) -> None:
    with lab.machines_answered("create_volume", "remove_volume"), lab.ctx() as ctx:
        made = storage.add_filesystem_image(ctx, name="scratch", storage="san", size_mb=64)
        storage.remove_filesystem_image(ctx, "scratch", purge=True)
    assert made.location == "/volumes/scratch"
    with lab.ctx() as ctx:
        assert [i.name for i in storage.list_filesystem_images(ctx)] == []
        assert lab.storage.list_volumes(storage.target(storage.get_storage_row(ctx, "san"))) == []


def test_clone_snapshot_revert(lab: Lab) -> None:
    with lab.fast(), lab.ctx() as ctx:
        storage.add_filesystem_image(ctx, name="golden", storage="san", size_mb=64)
    with lab.machines_answered("clone_volume", "snapshot_volume", "revert_volume"), lab.ctx() as ctx:
        clone = images.clone_filesystem_image(ctx, "golden", name="copy")
        images.snapshot_filesystem_image(ctx, "copy", label="before")
        images.revert_filesystem_image(ctx, "copy", label="before")
    assert clone.source == "clone of golden"


def test_capture_resumed_against_a_slow_storage_server(lab: Lab) -> None:
    with lab.ctx() as ctx:
        row = storage.get_storage_row(ctx, "san")
        ctx.session.add(
            FilesystemImage(
                name="captured",
                storage_id=row.id,
                location="/volumes/captured",
                origin=ImageOrigin.CAPTURED.value,
                state=ImageState.CREATING.value,
                source="root@198.18.8.99:/",
                progress="capturing: starting",
            )
        )
        ctx.commit()
    with lab.machines_answered("open_tree"), lab.ctx() as ctx:
        with pytest.raises(DriverError, match="connection timed out"):
            images.run_capture(ctx, "captured", identity=KEY)
    with lab.ctx() as ctx:
        shown = storage.show_filesystem_image(ctx, "captured")
    assert shown.state == ImageState.ERROR.value and "capture interrupted" in (shown.progress or "")


def test_partition_add_set_migrate_pause(lab: Lab) -> None:
    with lab.machines_answered("create_partition", "start_partition"), lab.ctx() as ctx:
        made = partitions.add_partitions(
            ctx, host=lab.hosts[0], cpus=1, memory_mb=512, max_memory_mb=2048, prefix="vm"
        )
    name = made[0].name
    assert made[0].state == "running"
    with lab.machines_answered("set_memory", "migrate_partition", "pause_partition"), lab.ctx() as ctx:
        partitions.set_partition(ctx, name, memory_mb=1024)
        partitions.migrate_partition(ctx, name, lab.hosts[1])
        paused = partitions.pause_partition(ctx, name)
    assert (paused.state, paused.memory_mb) == ("paused", 1024)
