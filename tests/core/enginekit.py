"""Test helpers: a fake clock and nodes that follow the agent protocol through the services."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from qrm_core.engine.reconciler import Reconciler
from qrm_core.services import agent, boot, service_context


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Node:
    """A machine running the qrm agent, driven step by step (no threads)."""

    mac: str
    ip: str | None = None
    cpus: int = 2
    memory_mb: int = 2048
    hypervisors: list[str] = field(default_factory=list)
    alive: bool = True
    resource_id: int | None = None
    token: str | None = None
    generation: int = 0
    mode: str = "idle"
    ve: str | None = None
    #: Registered from the initrd and told to hold its boot (its VE is being reset).
    held: bool = False

    def boot(self, settings, plugins, clock: Clock) -> None:
        """Power on / reboot: ask what to boot (like PXE), then register."""
        with service_context(settings, actor="agent", plugins=plugins) as ctx:
            config = boot.boot_config(ctx, self.mac)
        self.generation = config.boot_generation
        self.mode = config.mode if config.mode != "none" else "idle"
        self.ve = config.ve
        if self.ip is None:
            last = [int(x, 16) for x in self.mac.split(":")[-2:]]
            self.ip = f"198.18.{last[0]}.{last[1]}"
        if self.mode == "ve":
            # As the boot image's agent: register from the initrd before mounting the
            # root, and hold while the server says so (services.images.reset_ve).
            reg = self._register(settings, plugins, clock, "initrd", None)
            self.held = bool(reg.hold)
            if self.held:
                return
            self._register(settings, plugins, clock, "ve", self.token)
            return
        self._register(settings, plugins, clock, None, None)

    def _register(
        self, settings, plugins, clock: Clock, stage: str | None, proof: str | None
    ) -> agent.Registration:
        with service_context(settings, actor="agent", plugins=plugins) as ctx:
            reg = agent.register(
                ctx,
                mac=self.mac,
                ip=self.ip,
                cpus=self.cpus,
                memory_mb=self.memory_mb,
                hypervisors=self.hypervisors,
                boot_generation=self.generation,
                mode=self.mode,
                ve=self.ve,
                now=clock(),
                proof=proof,
                stage=stage,
            )
        self.resource_id, self.token = reg.resource_id, reg.token
        return reg

    def beat(self, settings, plugins, clock: Clock) -> str:
        if not self.alive:
            return "dead"
        if self.held:  # asks again from the initrd
            reg = self._register(settings, plugins, clock, "initrd", self.token)
            if reg.boot_generation != self.generation:
                self.held = False
                self.boot(settings, plugins, clock)
                return "reboot"
            if reg.hold:
                return "held"
            self.held = False
            self._register(settings, plugins, clock, "ve", self.token)
            return "booted"
        if self.token is None:
            try:
                self.boot(settings, plugins, clock)
            except agent.RegistrationRefused:
                # Powered on again before its old agent went quiet: the real
                # agent tries again a little later, as this one does next beat.
                return "refused"
            return "booted"
        with service_context(settings, actor="agent", plugins=plugins) as ctx:
            answer = agent.heartbeat(
                ctx,
                resource_id=self.resource_id,
                token=self.token,
                state="active" if self.mode == "ve" else "idle",
                load=0.1,
                boot_generation=self.generation,
                now=clock(),
            )
        if answer.command == "reboot":
            self.boot(settings, plugins, clock)
        elif answer.command == "halt":
            self.alive = False
        return answer.command


class Site:
    """Nodes + reconciler on one database, advanced in lock step."""

    def __init__(self, settings, plugins, *, boot_timeout: float = 60.0) -> None:
        settings = settings.model_copy(update={"boot_timeout": boot_timeout})
        self.settings = settings
        self.plugins = plugins
        self.clock = Clock()
        self.reconciler = Reconciler(settings, plugins, clock=self.clock)
        self.nodes: dict[str, Node] = {}

    def add_node(self, mac: str, **kwargs) -> Node:
        node = Node(mac=mac, **kwargs)
        self.nodes[mac] = node
        node.boot(self.settings, self.plugins, self.clock)
        return node

    def step(self, seconds: float = 1.0) -> None:
        self.clock.advance(seconds)
        for node in list(self.nodes.values()):
            node.beat(self.settings, self.plugins, self.clock)
        self.reconciler.tick()

    def settle(self, steps: int = 10, seconds: float = 1.0) -> None:
        for _ in range(steps):
            self.step(seconds)
