"""``qrm lab simulate``: many node agents in one process, speaking the real
protocol over HTTP to a real ``qrm server`` (for demos, tests and benchmarks).

Each simulated machine behaves like the agent in a boot image: it asks what
to boot (``/agent/v1/boot/{mac}``, as PXE would), registers with the boot
generation it got, heartbeats, and obeys: on ``reboot`` it goes quiet for a
moment and boots again (now into whatever qrm assigned), on ``halt`` it stops.
Simulated hypervisor hosts (``--hypervisor-hosts``) report the ``fake``
hypervisor; partitions the engine creates on them through the fake driver are
picked up from its state files and boot as simulated VMs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("qrm.lab")


@dataclass
class NodeSpec:
    mac: str
    ip: str | None = None
    cpus: int = 2
    memory_mb: int = 2048
    hypervisors: list[str] = field(default_factory=list)
    hostname: str | None = None


@dataclass
class SimStats:
    registrations: int = 0
    heartbeats: int = 0
    reboots: int = 0
    halts: int = 0
    errors: int = 0
    first_registration_at: float | None = None
    last_registration_at: float | None = None
    nodes: int = 0
    states: dict[str, str] = field(default_factory=dict)

    def registration_rate(self) -> float:
        if not self.first_registration_at or not self.last_registration_at or self.registrations < 2:
            return 0.0
        span = self.last_registration_at - self.first_registration_at
        return self.registrations / span if span > 0 else 0.0


def ip_for(index: int) -> str:
    """A simulated machine's address, from the benchmarking range 198.18.0.0/15 (never routed)."""
    return str(ipaddress.IPv4Address("198.18.0.0") + (index % 131072))


def mac_for(index: int, prefix: int = 0x02, run: int = 0) -> str:
    """A locally administered unicast MAC for simulated node ``index`` (below
    2**24) of simulation ``run`` (0-255): ``PREFIX:51:RUN:...``."""
    return f"{prefix:02x}:51:{run & 0xFF:02x}:{(index >> 16) & 0xFF:02x}:{(index >> 8) & 0xFF:02x}:{index & 0xFF:02x}"


#: The prefixes of simulated machines' MACs (machines, hypervisor hosts).
SIMULATED_PREFIXES = (0x02, 0x06)


def free_run(known_macs: list[str]) -> int:
    """A run number (1-255) no simulated machine the server knows has, so
    that two ``qrm lab simulate`` runs never share MACs (a MAC is a machine's
    identity: a second run with the same ones would take over the first
    run's machines, or be refused while they heartbeat). Chosen at random
    among the free ones, so that two runs started at the same moment are
    unlikely to pick the same; InvalidInput when all 255 are taken."""
    used = set()
    for mac in known_macs:
        parts = mac.lower().split(":")
        if len(parts) == 6 and parts[1] == "51" and int(parts[0], 16) in SIMULATED_PREFIXES:
            used.add(int(parts[2], 16))
    free = [run for run in range(1, 256) if run not in used]
    if not free:
        from qrm_core.errors import InvalidInput

        raise InvalidInput(
            "every simulated MAC block (255) is taken by a machine the server knows: "
            "remove old simulated resources first (qrm resource remove)"
        )
    return random.choice(free)


class SimulatedNode:
    def __init__(self, sim: Simulation, spec: NodeSpec) -> None:
        self.sim = sim
        self.spec = spec
        self.resource_id: int | None = None
        self.token: str | None = None
        self.generation = 0
        self.mode = "idle"
        self.ve: str | None = None
        self.interval = 10.0
        self.stopped = False
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while not self.stopped and not self.sim.stopping.is_set():
            try:
                await self._boot()
                await self._heartbeat_loop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a simulated machine retries like a real one
                self.sim.stats.errors += 1
                log.debug("node %s: %s", self.spec.mac, exc)
                if isinstance(exc, AgentCallError) and exc.status == 401 and exc.enrollment is not None:
                    await self.sim.enrollment_refused(exc.enrollment)
                else:
                    self.sim.tell_once(
                        type(exc).__name__, f"simulated machines hit an error (they retry): {exc}"
                    )
                await self.sim.sleep(min(self.sim.reboot_delay * 4 + 1, 5.0))

    async def _boot(self) -> None:
        sim = self.sim
        config = await sim.call("GET", f"/agent/v1/boot/{self.spec.mac}", token=sim.enrollment_token)
        self.generation = int(config.get("boot_generation", 0))
        self.mode = "ve" if config.get("mode") == "ve" else "idle"
        self.ve = config.get("ve")
        body = {
            "mac": self.spec.mac,
            "ip": self.spec.ip,
            "cpus": self.spec.cpus,
            "memory_mb": self.spec.memory_mb,
            "hypervisors": self.spec.hypervisors,
            "hostname": self.spec.hostname,
            "boot_generation": self.generation,
            "mode": self.mode,
            "ve": self.ve,
        }
        if self.mode == "ve":
            # As the boot image's agent: register from the initrd before mounting the
            # root, and wait while the server holds the boot (its VE is being reset).
            body["stage"] = "initrd"
            while True:
                answer = await sim.call(
                    "POST", "/agent/v1/register", json=body, token=sim.enrollment_token, proof=self.token
                )
                self.token = answer["token"]
                if int(answer.get("boot_generation", self.generation)) != self.generation:
                    raise AgentRebootOrdered("another boot was ordered while this one was held")
                if not answer.get("hold"):
                    break
                await sim.sleep(1.0)
            body["stage"] = "ve"
        # The token of the boot before, if any: a registration after an error (not a
        # reboot) is this agent's own, as the real agent sends it (docs/agent-protocol.md).
        answer = await sim.call(
            "POST", "/agent/v1/register", json=body, token=sim.enrollment_token, proof=self.token
        )
        self.resource_id = answer["resource_id"]
        self.token = answer["token"]
        self.interval = float(answer.get("heartbeat_interval", 10.0)) * sim.interval_scale
        now = time.perf_counter()
        stats = sim.stats
        stats.registrations += 1
        stats.first_registration_at = stats.first_registration_at or now
        stats.last_registration_at = now
        stats.states[self.spec.mac] = answer.get("state", "?")
        if sim.on_register is not None:
            sim.on_register(self)

    async def _heartbeat_loop(self) -> None:
        sim = self.sim
        # Booted into a VE: say "active" at once. Idle: spread the first heartbeats
        # so thousands of nodes do not beat in lock step.
        await sim.sleep(0 if self.mode == "ve" else random.uniform(0, self.interval))
        while not self.stopped and not sim.stopping.is_set():
            body = {
                "resource_id": self.resource_id,
                "state": "active" if self.mode == "ve" else "idle",
                "load": round(random.random(), 2),
                "boot_generation": self.generation,
            }
            answer = await sim.call("POST", "/agent/v1/heartbeat", json=body, token=self.token)
            sim.stats.heartbeats += 1
            command = answer.get("command", "none")
            if command == "reboot":
                sim.stats.reboots += 1
                await sim.sleep(sim.reboot_delay)
                return  # boot again
            if command == "halt":
                sim.stats.halts += 1
                self.stopped = True
                return
            await sim.sleep(self.interval)


class AgentRebootOrdered(RuntimeError):
    """A held boot whose server ordered another one meanwhile: the machine boots again."""


class AgentCallError(RuntimeError):
    """The server refused an agent request; ``enrollment`` is the enrollment
    token the request carried (None for per-machine-token requests)."""

    def __init__(self, text: str, status: int, enrollment: str | None) -> None:
        super().__init__(text)
        self.status = status
        self.enrollment = enrollment


class Simulation:
    """Simulated machines. ``enrollment`` fetches the site's current
    enrollment token: when the server refuses the one the machines have (it
    was rotated), they take the new one and register again, as machines
    booting with a regenerated boot configuration would. Without it, or
    when the new one is refused too, ``report`` is told once, in one line."""

    def __init__(
        self,
        server: str,
        enrollment_token: str,
        *,
        reboot_delay: float = 1.0,
        interval_scale: float = 1.0,
        concurrency: int = 200,
        on_register: Callable[[SimulatedNode], None] | None = None,
        fake_state_dir: Path | None = None,
        enrollment: Callable[[], str] | None = None,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.enrollment_token = enrollment_token
        self.enrollment = enrollment
        self.report = report
        self._told: set[str] = set()
        self._enrollment_lock: asyncio.Lock | None = None
        self.reboot_delay = reboot_delay
        self.interval_scale = interval_scale
        self.concurrency = concurrency
        self.on_register = on_register
        self.fake_state_dir = fake_state_dir
        self.stats = SimStats()
        self.nodes: dict[str, SimulatedNode] = {}
        self.stopping = asyncio.Event()
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        #: Hypervisor hosts whose fake-hypervisor partitions boot as simulated VMs.
        self._hosts: dict[str, NodeSpec] = {}
        self._watcher: asyncio.Task[None] | None = None

    async def sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=max(seconds, 0))
        except TimeoutError:
            pass

    async def call(
        self, method: str, path: str, *, json: Any = None, token: str | None = None, proof: str | None = None
    ) -> Any:
        assert self._client is not None and self._slots is not None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if proof:
            headers["X-Qrm-Agent-Token"] = proof  # a live agent registering again is itself
        async with self._slots:
            response = await self._client.request(method, path, json=json, headers=headers)
        if response.status_code >= 400:
            raise AgentCallError(
                f"{method} {path}: {response.status_code} {response.text[:200]}",
                response.status_code,
                token if token is not None and token == self.enrollment_token else None,
            )
        return response.json()

    def tell_once(self, key: str, text: str) -> None:
        """Say ``text`` to the person running the simulation, once per ``key``
        (a warning in the log as well)."""
        if key in self._told:
            return
        self._told.add(key)
        log.warning("%s", text)
        if self.report is not None:
            self.report(text)

    async def enrollment_refused(self, refused: str) -> None:
        """The server refused enrollment token ``refused``: fetch the current
        one (once for all machines), or say that they cannot register."""
        if self._enrollment_lock is None:
            self._enrollment_lock = asyncio.Lock()
        async with self._enrollment_lock:
            if self.enrollment_token != refused:
                return  # another machine fetched the new one meanwhile
            why = "no way to fetch a new one was given"
            if self.enrollment is not None:
                try:
                    current = await asyncio.to_thread(self.enrollment)
                except Exception as exc:  # noqa: BLE001 - reported below, in one line
                    current, why = None, f"fetching the current one failed: {exc}"
                if current and current != refused:
                    self.enrollment_token = current
                    self._told.discard("enrollment")
                    self.tell_once(
                        "enrollment-changed",
                        "the site's enrollment token changed: simulated machines register with the new one",
                    )
                    self._told.discard("enrollment-changed")
                    return
                if current == refused:
                    why = "the site's current token is the same"
            self.tell_once(
                "enrollment",
                f"the server refuses the simulated machines' enrollment token ({why}): they cannot "
                "register; run 'qrm lab simulate' again with --enroll set to 'qrm site enrollment-token'",
            )

    def add(self, spec: NodeSpec) -> SimulatedNode:
        node = SimulatedNode(self, spec)
        self.nodes[spec.mac] = node
        node.task = asyncio.create_task(node.run(), name=f"node-{spec.mac}")
        self.stats.nodes = len(self.nodes)
        if spec.hypervisors and self.fake_state_dir is not None:
            self._hosts[spec.mac] = spec  # a host added while running is watched too
            if self._watcher is None:
                self._watcher = asyncio.create_task(self._watch_partitions(self._hosts))
        return node

    def remove(self, mac: str) -> None:
        node = self.nodes.pop(mac, None)
        if node is not None:
            node.stopped = True
            if node.task is not None:
                node.task.cancel()
        self.stats.nodes = len(self.nodes)

    async def _watch_partitions(self, hosts: dict[str, NodeSpec]) -> None:
        """Boot a simulated VM for each running partition of the fake hypervisor on our hosts."""
        assert self.fake_state_dir is not None
        directory = self.fake_state_dir / "fake-hypervisor"
        vms: set[str] = set()
        while not self.stopping.is_set():
            running: dict[str, dict[str, Any]] = {}
            for host_mac in hosts:
                path = directory / f"host-{host_mac.replace(':', '')}.json"
                try:
                    state = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                for partition in state.get("partitions", {}).values():
                    if partition.get("state") == "running":
                        running[partition["mac"]] = partition
            for mac, partition in running.items():
                if mac not in vms:
                    vms.add(mac)
                    tail = [int(part, 16) for part in mac.split(":")[3:]]
                    ip = f"100.{64 + (tail[0] & 63)}.{tail[1]}.{tail[2]}"  # shared address space
                    self.add(
                        NodeSpec(mac=mac, ip=ip, cpus=partition["cpus"], memory_mb=partition["memory_mb"])
                    )
            for mac in list(vms - set(running)):
                vms.discard(mac)
                self.remove(mac)  # powered off or fenced: the VM's agent goes silent
            await self.sleep(0.5)

    async def run(self, specs: list[NodeSpec], duration: float | None = None, ramp: float = 0.0) -> SimStats:
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.server, limits=limits, timeout=60.0) as client:
            self._client = client
            self._slots = asyncio.Semaphore(self.concurrency)
            for index, spec in enumerate(specs):
                self.add(spec)
                if ramp and index % 100 == 99:
                    await asyncio.sleep(ramp)
            if duration is not None:
                await self.sleep(duration)
                self.stopping.set()
            else:
                await self.stopping.wait()
            tasks = [n.task for n in self.nodes.values() if n.task is not None]
            if self._watcher is not None:
                tasks.append(self._watcher)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return self.stats


def node_specs(
    count: int,
    *,
    cpus: int = 2,
    memory_mb: int = 2048,
    hypervisor_hosts: int = 0,
    start: int = 1,
    run: int = 0,
) -> list[NodeSpec]:
    # Each machine has an address, as a DHCP lease gives a real one: a VE's
    # storage exports name it (a machine without one cannot mount its root).
    base = (run & 0xFF) << 9  # runs apart, as their MACs are

    def ip(index: int) -> str:
        return ip_for(base + index)

    specs = [
        NodeSpec(mac=mac_for(start + i, run=run), ip=ip(start + i), cpus=cpus, memory_mb=memory_mb)
        for i in range(count)
    ]
    for i in range(hypervisor_hosts):
        specs.append(
            NodeSpec(
                mac=mac_for(start + count + i, prefix=0x06, run=run),
                ip=ip(start + count + i),
                cpus=16,
                memory_mb=65536,
                hypervisors=["fake"],
                hostname=f"hv{i + 1}",  # what 'qrm partition add --host hv1' names
            )
        )
    return specs
