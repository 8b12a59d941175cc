"""``qrm server``: one process serving the REST API, the node-agent endpoints,
the engine, and the background services plugins contribute (TFTP, DHCP, ...)."""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qrm_core import db
from qrm_core.context import BackgroundService, HookContext
from qrm_core.errors import InvalidInput, QrmError
from qrm_core.models import EventLevel

if TYPE_CHECKING:
    from qrm_core.config import Settings
    from qrm_core.plugins import PluginSystem

log = logging.getLogger("qrm.server")

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def default_server_url(host: str, port: int) -> str | None:
    """The URL machines use to reach this server, when it can be told from the bind address."""
    if is_wildcard(host):
        return None
    try:
        address = ipaddress.ip_address(host)
        shown = f"[{address}]" if address.version == 6 else str(address)
    except ValueError:
        shown = host
    return f"http://{shown}:{port}"


def record(
    settings: Settings, plugins: PluginSystem, message: str, level: EventLevel = EventLevel.INFO
) -> None:
    from qrm_core.services import service_context

    try:
        with service_context(settings, actor="server", plugins=plugins) as ctx:
            ctx.record("server", socket.gethostname()[:128], message, level=level)
            ctx.commit()
    except QrmError:
        log.exception("could not record: %s", message)


def prepare_database(settings: Settings, plugins: PluginSystem) -> None:
    """Bring the schema up to date and make sure the admin user exists, as
    ``qrm init`` does (a fresh install needs no separate step)."""
    from qrm_core.services import setup

    result = setup.init(settings, actor="server", plugins=plugins, boot_image=False)
    if result.revision_before != result.revision:
        log.info("database prepared: %s -> %s", result.revision_before, result.revision)


def check_public_bind(settings: Settings, plugins: PluginSystem, host: str) -> None:
    """Refuse to listen beyond loopback while the default admin password is unchanged."""
    if is_loopback(host):
        return
    from qrm_core.services import service_context, users

    with service_context(settings, actor="server", plugins=plugins) as ctx:
        if users.default_password_unchanged(ctx):
            raise InvalidInput(
                f"refusing to listen on {host}: the admin user '{users.DEFAULT_ADMIN}' still has the default "
                "password; set one with 'qrm init --admin-password ...' (or listen on 127.0.0.1)"
            )


@dataclass
class RunningServices:
    started: list[BackgroundService] = field(default_factory=list)

    def stop(self) -> None:
        for service in reversed(self.started):
            try:
                service.stop()
            except Exception:
                log.exception("service %s did not stop cleanly", getattr(service, "name", service))
        self.started.clear()


def start_plugin_services(settings: Settings, plugins: PluginSystem) -> RunningServices:
    """Start every plugin's background service; a failing one is logged and recorded, the rest run."""
    running = RunningServices()
    try:
        services = plugins.hooks.collect_services(HookContext(settings=settings, actor="server"))
    except QrmError as exc:
        log.error("%s", exc.message)
        record(settings, plugins, exc.message, EventLevel.ERROR)
        return running
    for service in services:
        name = getattr(service, "name", type(service).__name__)
        try:
            service.start()
        except Exception as exc:
            log.exception("service %s failed to start", name)
            record(settings, plugins, f"service {name} failed to start: {exc}", EventLevel.ERROR)
            continue
        running.started.append(service)
        log.info("service %s started", name)
    return running


class QrmServer:
    """Everything ``qrm server`` runs, startable and stoppable in-process (tests, benchmarks)."""

    def __init__(
        self, settings: Settings, plugins: PluginSystem, host: str, port: int, *, engine_interval: float = 1.0
    ):
        self.settings = settings
        self.plugins = plugins
        self.host = host
        self.port = port
        self.engine_interval = engine_interval
        self._explicit_url = settings.server_url is not None
        self.server_url = settings.server_url or (default_server_url(host, port) if port else None)
        self._uvicorn: Any = None
        self.engine: Any = None
        self.services = RunningServices()

    def _publish_server_url(self) -> None:
        """Everything the server runs (plugin services, drivers, boot configs) sees the URL machines use."""
        if self.server_url and self.settings.server_url != self.server_url:
            self.settings = self.settings.model_copy(update={"server_url": self.server_url})
            self.plugins.use_settings(self.settings)

    def _bound(self, sock: socket.socket) -> None:
        """The socket is bound: the real port is known, and with it the default URL."""
        self.port = sock.getsockname()[1]
        if not self._explicit_url:
            self.server_url = default_server_url(self.host, self.port)
        self._publish_server_url()

    def prepare(self) -> None:
        prepare_database(self.settings, self.plugins)
        check_public_bind(self.settings, self.plugins, self.host)
        if self.server_url is None:
            log.warning(
                "listening on a wildcard address without QRM_SERVER_URL: booting machines are told no "
                "server URL; set QRM_SERVER_URL=http://<address machines reach>:%d",
                self.port,
            )

    def build(self) -> Any:
        import uvicorn

        from qrm_core.api.app import create_app
        from qrm_core.engine.runner import EngineRunner

        def on_tick(report: Any) -> None:
            metrics = app.state.metrics
            for step, seconds in report.durations.items():
                metrics.reconcile_seconds.labels(step=step).observe(seconds)

        self.engine = EngineRunner(
            self.settings, self.plugins, interval=self.engine_interval, on_tick=on_tick
        )
        app = create_app(self.settings, self.plugins, engine=self.engine, server_url=self.server_url)
        config = uvicorn.Config(
            app,
            host=self.host,
            port=self.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
            backlog=4096,
        )
        self._uvicorn = uvicorn.Server(config)
        return app

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT."""
        self.prepare()
        sock = bind_socket(self.host, self.port)
        self._bound(sock)
        self.build()
        self.services = start_plugin_services(self.settings, self.plugins)
        self.engine.start()
        record(self.settings, self.plugins, f"qrm server started on {self.host}:{self.port}")
        try:
            self._uvicorn.run(sockets=[sock])
        finally:
            self.engine.stop()
            self.services.stop()
            record(self.settings, self.plugins, "qrm server stopped")
            db.dispose_engines()

    def start_in_thread(self) -> threading.Thread:
        """For tests: serve in a thread; returns once the socket listens."""
        self.prepare()
        sock = bind_socket(self.host, self.port)
        self._bound(sock)
        self.build()
        self.services = start_plugin_services(self.settings, self.plugins)
        self.engine.start()
        thread = threading.Thread(
            target=self._uvicorn.run, kwargs={"sockets": [sock]}, name="qrm-http", daemon=True
        )
        thread.start()
        while not self._uvicorn.started and thread.is_alive():
            threading.Event().wait(0.02)
        return thread

    def stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self.engine is not None:
            self.engine.stop()
        self.services.stop()


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so a busy port is a one-line error."""
    if not 0 <= port < 65536:
        raise InvalidInput(f"port {port} is out of range")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidInput(f"cannot listen on {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    # With the protocol given (IPPROTO_TCP), asyncio sets TCP_NODELAY on every
    # accepted connection; without it, replies written in two parts (headers,
    # body) wait ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise InvalidInput(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def serve(settings: Settings, plugins: PluginSystem, host: str, port: int) -> None:
    """Run ``qrm server`` in the foreground until SIGTERM or Ctrl-C.

    uvicorn shuts down gracefully on the signal and then re-raises it; turning
    SIGTERM into KeyboardInterrupt lets the engine and the plugins' services
    (DHCP and TFTP servers, child processes) stop cleanly afterwards.
    """
    server = QrmServer(settings, plugins, host, port)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
