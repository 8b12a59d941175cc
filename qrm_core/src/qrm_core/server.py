"""``qrm server``: one process serving the REST API, the node-agent endpoints,
the engine, and the background services plugins contribute (TFTP, DHCP, ...)."""

from __future__ import annotations

import gc
import ipaddress
import logging
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qrm_core import db
from qrm_core.context import BackgroundService, HookContext
from qrm_core.errors import InvalidInput, QrmError
from qrm_core.models import EventLevel
from qrm_core.services.listening import check_listen

if TYPE_CHECKING:
    from qrm_core.config import Settings
    from qrm_core.plugins import PluginSystem

log = logging.getLogger("qrm.server")


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


def freeze_startup_objects() -> None:
    """Leave what start-up made (modules, the app and its routes, plugins,
    services: 160,000-180,000 objects) out of the garbage collector's passes.

    They live as long as the process, yet every full pass visited them all
    again, and requests allocate enough for one every few hundred of them:
    in bench_register.py the collector took 1.4-1.9 s of a run of 3,000
    registrations and 4 s of heartbeats, 0.75-1.0 s with this (the standard
    ``gc.freeze()`` of a pre-loaded server)."""
    gc.collect()
    gc.freeze()


def _name(service: BackgroundService) -> str:
    return getattr(service, "name", type(service).__name__)


@dataclass
class RunningServices:
    """The plugins' services of one server: those every server runs, and the
    leader-only ones, run while this server holds the engine's leader lock."""

    started: list[BackgroundService] = field(default_factory=list)
    #: Leader-only services, in the order the plugins gave them.
    leader_only: list[BackgroundService] = field(default_factory=list)
    #: Those of them running now (this server is the leader).
    leading: list[BackgroundService] = field(default_factory=list)
    settings: Settings | None = None
    plugins: PluginSystem | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def leadership(self, leader: bool) -> None:
        """Start the leader-only services when this server becomes the leader, stop them when it is not."""
        with self._lock:
            if leader and not self.leading:
                for service in self.leader_only:
                    if self._start(service):
                        self.leading.append(service)
            elif not leader and self.leading:
                _stop_all(self.leading)

    def _start(self, service: BackgroundService) -> bool:
        try:
            service.start()
        except Exception as exc:
            log.exception("service %s failed to start", _name(service))
            if self.settings is not None and self.plugins is not None:
                record(
                    self.settings,
                    self.plugins,
                    f"service {_name(service)} failed to start: {exc}",
                    EventLevel.ERROR,
                )
            return False
        log.info("service %s started", _name(service))
        return True

    def stop(self) -> None:
        with self._lock:
            _stop_all(self.leading)
            _stop_all(self.started)


def _stop_all(services: list[BackgroundService]) -> None:
    for service in reversed(services):
        try:
            service.stop()
        except Exception:
            log.exception("service %s did not stop cleanly", _name(service))
    services.clear()


def start_plugin_services(settings: Settings, plugins: PluginSystem) -> RunningServices:
    """Start every plugin's background service; a failing one is logged and recorded, the rest run."""
    running = RunningServices(settings=settings, plugins=plugins)
    try:
        services = plugins.hooks.collect_services(HookContext(settings=settings, actor="server"))
    except QrmError as exc:
        log.error("%s", exc.message)
        record(settings, plugins, exc.message, EventLevel.ERROR)
        return running
    for service in services:
        if getattr(service, "leader_only", False):
            running.leader_only.append(service)  # started when this server becomes the leader
        elif running._start(service):
            running.started.append(service)
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
        # The one rule every listener of qrm follows (plugins ask it too).
        check_listen(self.settings, self.host, service="qrm server", plugins=self.plugins)
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
            self.settings,
            self.plugins,
            interval=self.engine_interval,
            on_tick=on_tick,
            on_leadership=lambda leader: self.services.leadership(leader),
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
        self._uvicorn = _UvicornServer(config)
        return app

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT."""
        self.prepare()
        _warnings_to_terminal()
        sock = bind_socket(self.host, self.port)
        self._bound(sock)
        self.build()
        self.services = start_plugin_services(self.settings, self.plugins)
        self.engine.start()
        record(self.settings, self.plugins, f"qrm server started on {self.host}:{self.port}")
        freeze_startup_objects()
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
            from qrm_core import console

            console.stop(self._uvicorn.config.app)  # open pages' live streams end now
        if self.engine is not None:
            self.engine.stop()
        self.services.stop()


class _OneLineForTerminal(logging.Formatter):
    """``qrm server: message[: the exception's one line]``; tracebacks stay in the log file."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f": {record.exc_info[1]}"
        return f"qrm server: {text}"


def _warnings_to_terminal() -> None:
    """``qrm server`` in the foreground: warnings and errors (a service that
    serves loopback only, one that failed to start) also go to its terminal."""
    root = logging.getLogger("qrm")
    if any(getattr(handler, "_qrm_terminal", False) for handler in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_OneLineForTerminal())
    handler._qrm_terminal = True  # type: ignore[attr-defined]
    root.addHandler(handler)


def _uvicorn_server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server; on SIGTERM/SIGINT the console's live streams end
        at once (else the graceful shutdown waits for every open page)."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            from qrm_core import console

            console.stop(self.config.app)
            super().handle_exit(sig, frame)

    return Server


def _UvicornServer(config: Any) -> Any:
    return _uvicorn_server_class()(config)


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
