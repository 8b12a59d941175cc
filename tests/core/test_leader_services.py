"""Leader-only background services: several ``qrm server`` on one database run
them exactly once, on the server holding the engine's leader lock, and the next
leader takes them over."""

from __future__ import annotations

import threading

from qrm_core.context import HookContext
from qrm_core.hookspecs import hookimpl
from qrm_core.server import QrmServer
from qrm_core.testkit import free_port, wait_until


class Recorder:
    """A background service that remembers which server runs it, and when."""

    def __init__(self, name: str, server: str, log: list[tuple[str, str, str]], leader_only: bool) -> None:
        self.name = name
        self.server = server
        self.log = log
        self.leader_only = leader_only
        self.running = False

    def start(self) -> None:
        self.running = True
        self.log.append(("start", self.name, self.server))

    def stop(self) -> None:
        self.running = False
        self.log.append(("stop", self.name, self.server))


class Contributor:
    """A plugin giving each server one service every server runs and one only the leader runs."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, str]] = []
        self.services: dict[str, list[Recorder]] = {}
        self.next_server = ""
        self.lock = threading.Lock()

    @hookimpl
    def qrm_collect_services(self, ctx: HookContext) -> list[Recorder]:
        server = self.next_server
        made = [
            Recorder("everywhere", server, self.log, leader_only=False),
            Recorder("once-per-site", server, self.log, leader_only=True),
        ]
        self.services[server] = made
        return made

    def leading(self) -> list[str]:
        return [s for s, made in self.services.items() if made[1].running]


def test_a_leader_only_service_runs_on_one_server_and_moves_with_leadership(
    qrm_settings, qrm_plugins
) -> None:
    plugin = Contributor()
    assert qrm_plugins.register(plugin, "leader-test")
    servers: dict[str, QrmServer] = {}
    threads = []
    try:
        for name in ("a", "b"):
            plugin.next_server = name
            server = QrmServer(qrm_settings, qrm_plugins, "127.0.0.1", free_port(), engine_interval=0.2)
            threads.append(server.start_in_thread())
            servers[name] = server
        wait_until(lambda: len(plugin.leading()) == 1, "one server running the leader-only service", 20)
        assert all(made[0].running for made in plugin.services.values()), "every server runs the others"
        threading.Event().wait(1.0)  # a few engine passes: it stays one
        leader = plugin.leading()
        assert len(leader) == 1
        starts = [entry for entry in plugin.log if entry[:2] == ("start", "once-per-site")]
        assert starts == [("start", "once-per-site", leader[0])]

        servers[leader[0]].stop()  # the leader goes: its lock is released, the other takes over
        other = "b" if leader[0] == "a" else "a"
        wait_until(lambda: plugin.leading() == [other], "the other server taking the service over", 20)
        assert ("stop", "once-per-site", leader[0]) in plugin.log
        assert plugin.log.index(("stop", "once-per-site", leader[0])) < plugin.log.index(
            ("start", "once-per-site", other)
        ), "never two at once"
    finally:
        for server in servers.values():
            server.stop()
        for thread in threads:
            thread.join(10)
    assert plugin.leading() == []
