"""A hypervisor that takes 5 s per call does not stop the server answering machines.

The engine calls drivers (a host's inventory, creating and starting a
partition, fencing a failed one) with no database transaction open: on SQLite
an open transaction holds the write lock, and every registration and
heartbeat would wait behind the driver. Machines here are agents speaking the
real protocol over HTTP with the patience a real agent has (a 3 s timeout per
request); the test asserts what they saw: no request refused or timed out,
while the engine spent its time in the slow driver.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from qrm_core.config import Settings
from qrm_core.drivers.base import HostInfo, HostTarget, PartitionInfo, PartitionSpec
from qrm_core.drivers.fake import FakeHypervisor
from qrm_core.plugins import HYPERVISOR_GROUP, PluginSystem
from qrm_core.services import boot_images, partitions, resources, service_context, storage
from qrm_core.services import virtual_environments as ves
from qrm_core.testing import RunningServer, running_server
from qrm_core.testkit import wait_until

DELAY = 5.0
AGENT_TIMEOUT = 3.0


class SlowHypervisor(FakeHypervisor):
    """The fake hypervisor, taking DELAY seconds for every call that reaches the backend."""

    name = "slow"
    description = "the fake hypervisor, slowly"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.calls: list[str] = []
        self.delay = DELAY

    def _slow(self, what: str) -> None:
        self.calls.append(what)
        time.sleep(self.delay)

    def host_info(self, host: HostTarget) -> HostInfo:
        self._slow("host_info")
        return super().host_info(host)

    def list_partitions(self, host: HostTarget) -> list[PartitionInfo]:
        self._slow("list_partitions")
        return super().list_partitions(host)

    def create_partition(self, host: HostTarget, spec: PartitionSpec) -> PartitionInfo:
        self._slow("create_partition")
        return super().create_partition(host, spec)

    def start_partition(self, host: HostTarget, name: str) -> None:
        self._slow("start_partition")
        super().start_partition(host, name)

    def stop_partition(self, host: HostTarget, name: str, force: bool = False) -> None:
        self._slow("stop_partition")
        super().stop_partition(host, name, force)


@dataclass
class Agents:
    """Machines that register and heartbeat over HTTP every 0.3 s, counting what goes wrong.

    A machine in ``dying`` stops as soon as qrm orders it to reboot (it never
    comes back: a failed partition)."""

    url: str
    enroll: str
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    dying: set[str] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, mac: str, ip: str, hypervisors: tuple[str, ...] = ()) -> None:
        thread = threading.Thread(target=self.run, args=(mac, ip, hypervisors))
        self.threads.append(thread)
        thread.start()

    def run(self, mac: str, ip: str, hypervisors: tuple[str, ...]) -> None:
        with httpx.Client(base_url=self.url, timeout=AGENT_TIMEOUT) as http:
            auth = {"Authorization": f"Bearer {self.enroll}"}
            body = {"mac": mac, "ip": ip, "cpus": 8, "memory_mb": 8192, "hypervisors": list(hypervisors)}
            token, rid = None, None
            while not self.stop.is_set():
                try:
                    if token is None:
                        answer = http.post("/agent/v1/register", json=body, headers=auth)
                        answer.raise_for_status()
                        token, rid = answer.json()["token"], answer.json()["resource_id"]
                    else:
                        answer = http.post(
                            "/agent/v1/heartbeat",
                            json={"resource_id": rid, "state": "idle"},
                            headers={"Authorization": f"Bearer {token}"},
                        )
                        answer.raise_for_status()
                        if answer.json().get("command") == "reboot" and mac in self.dying:
                            return
                    self.answered += 1
                except httpx.HTTPError as exc:
                    self.failures.append(f"{mac}: {type(exc).__name__}: {exc}")
                self.stop.wait(0.3)

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


@pytest.fixture
def server(qrm_settings: Settings) -> Iterator[tuple[RunningServer, SlowHypervisor]]:
    settings = qrm_settings.model_copy(update={"heartbeat_timeout": 2.0, "boot_timeout": 2.0})
    plugins = PluginSystem(settings).load()
    slow = SlowHypervisor(settings)
    plugins.add_driver(HYPERVISOR_GROUP, slow)
    with running_server(settings, plugins=plugins, engine_interval=0.2) as running:
        try:
            yield running, slow
        finally:
            slow.delay = 0  # a call under way ends soon, so the server stops promptly


@pytest.mark.qrm_backends("sqlite")
@pytest.mark.slow
def test_machines_are_answered_while_the_engine_waits_for_a_slow_hypervisor(server, qrm_backend) -> None:
    running, slow = server
    settings, plugins = running.settings, running.plugins
    with service_context(settings, plugins=plugins) as ctx:
        storage.add_storage(ctx, name="st", type="fake", address="10.0.0.2")
        storage.add_filesystem_image(ctx, name="root", storage="st", location="/exports/root")
        boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1", make_default=True)
        ves.create_ve(
            ctx,
            name="vms",
            boot_image="idle",
            fs_image="root",
            deployment="partitioned",
            hypervisor="slow",
            failover=True,
        )
    agents = Agents(running.url, running.enrollment_token())
    macs = [f"02:51:00:00:07:{i:02x}" for i in range(3)]
    try:
        agents.start(macs[0], "198.18.7.1", hypervisors=("slow",))  # the hypervisor host
        for i, mac in enumerate(macs[1:], start=2):
            agents.start(mac, f"198.18.7.{i}")
        # 1. The engine makes a partition: four slow calls, 20 s.
        with service_context(settings, plugins=plugins) as ctx:
            ves.start_ve(ctx, "vms")
        running.server.engine.wake()
        wait_until(lambda: _partition_state(running) == "running", "the partition", 6 * DELAY + 20, 0.2)
        assert slow.calls[:4] == ["host_info", "list_partitions", "create_partition", "start_partition"]
        # 2. It boots, serves the VE, and dies: the engine fences it, one slow call.
        vm_mac = _partition_mac(running)
        agents.dying.add(vm_mac)
        agents.start(vm_mac, "198.18.7.100")
        wait_until(lambda: "stop_partition" in slow.calls, "the fencing", 60, 0.2)
        wait_until(
            lambda: _partition_state(running) == "stopped", "the fencing's outcome", 2 * DELAY + 10, 0.2
        )
    finally:
        agents.join()
    # Every machine was answered all along: registered, and heartbeating.
    assert agents.failures == []
    assert agents.answered >= 3 * (5 * DELAY / 0.3) * 0.5
    with service_context(settings, plugins=plugins) as ctx:
        listed = resources.list_resources(ctx, state="idle").items
        assert {r.mac for r in listed} >= set(macs)


def _partition_state(running: RunningServer) -> str | None:
    with service_context(running.settings, plugins=running.plugins) as ctx:
        rows = partitions.list_partitions(ctx)
    return rows[0].state if rows else None


def _partition_mac(running: RunningServer) -> str:
    with service_context(running.settings, plugins=running.plugins) as ctx:
        return partitions.list_partitions(ctx)[0].mac
