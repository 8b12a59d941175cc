"""The TFTP service as ``qrm server`` runs it (a :class:`~qrm_core.context.BackgroundService`).

It wires the pieces together - settings, the boot configuration source, the
content resolver and the server - and runs the server loop in its own thread.
``qrm tftpd`` uses the same class in the foreground.
"""

from __future__ import annotations

import errno
import logging
import resource
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from qrm_core.plugin_api import InvalidInput, QrmError, check_listen
from qrm_tftpd.content import ContentResolver
from qrm_tftpd.server import TftpServer
from qrm_tftpd.settings import TftpSettings, load_settings
from qrm_tftpd.sources import LocalSource, RemoteSource

if TYPE_CHECKING:
    from qrm_core.plugin_api import PluginSystem, Settings
    from qrm_tftpd.content import BootSource

log = logging.getLogger("qrm.tftpd")


class ServiceError(QrmError):
    """The TFTP service cannot start (port taken, no permission, bad root)."""


def make_source(settings: Settings, tftp: TftpSettings, plugins: PluginSystem | None = None) -> BootSource:
    """The boot configuration source the settings ask for."""
    server_url = tftp.effective_server_url(settings)
    if tftp.source == "remote":
        if not server_url:
            raise InvalidInput("QRM_TFTPD_SOURCE=remote needs QRM_TFTPD_SERVER_URL (or QRM_SERVER_URL)")
        token = tftp.enrollment_token.get_secret_value() if tftp.enrollment_token else None
        return RemoteSource(server_url, token, timeout=tftp.remote_timeout)
    return LocalSource(settings, server_url=server_url, plugins=plugins)


def make_resolver(settings: Settings, tftp: TftpSettings, source: BootSource) -> ContentResolver:
    root = tftp.root_dir(settings)
    return ContentResolver(
        source,
        root=root,
        ipxe_dir=tftp.ipxe_dir,
        pxelinux_dir=tftp.pxelinux_dir,
        syslinux_modules_dir=tftp.syslinux_modules_dir,
        port=tftp.port or 69,
        retry_seconds=tftp.retry_seconds,
        cache_bytes=tftp.cache_mb << 20,
    )


def _raise_fd_limit(wanted: int) -> None:
    """Each transfer holds a socket and maybe a file: make room for ``max_sessions``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            log.info("tftp: raised the open file limit from %d to %d", soft, new)


class TftpService:
    """The TFTP server in a thread of its own.

    :param settings: qrm's settings (database, data directory, server URL).
    :param tftp: The TFTP settings; read from ``QRM_TFTPD_*`` when omitted.
    :param plugins: The plugin system for boot kernel arguments (default: the process's).
    """

    name = "tftpd"

    def __init__(
        self,
        settings: Settings,
        tftp: TftpSettings | None = None,
        *,
        plugins: PluginSystem | None = None,
    ) -> None:
        self.settings = settings
        self.tftp = tftp if tftp is not None else load_settings()
        self.plugins = plugins
        self.server: TftpServer | None = None
        self.source: BootSource | None = None
        self.resolver: ContentResolver | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the port is the real one when 0 was asked for)."""
        assert self.server is not None, "not started"
        return self.server.address, self.server.port

    def root(self) -> Path:
        return self.tftp.root_dir(self.settings)

    def start(self) -> None:
        """Bind, then serve in a thread; raises a one-line error if it cannot listen."""
        if self._thread is not None:
            return
        address = self.tftp.address(self.settings)
        if self.tftp.source == "local":
            # Core's one rule for every listener (remote mode runs away from
            # the database, on a host the admin set up with the enrollment token).
            check_listen(self.settings, address, service="tftpd", plugins=self.plugins)
        source = make_source(self.settings, self.tftp, self.plugins)
        source.check()
        root = self.root()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceError(f"cannot create the TFTP root {root}: {exc.strerror}") from None
        resolver = make_resolver(self.settings, self.tftp, source)
        server = TftpServer(
            resolver,
            address=address,
            port=self.tftp.port,
            timeout=self.tftp.timeout,
            retries=self.tftp.retries,
            max_sessions=self.tftp.max_sessions,
            max_blksize=self.tftp.max_blksize,
            workers=self.tftp.workers,
        )
        where = f"{address}:{self.tftp.port}"
        try:
            server.bind()
        except PermissionError:
            raise ServiceError(
                f"cannot listen on UDP {where}: permission denied (port 69 needs root or "
                "CAP_NET_BIND_SERVICE; or set QRM_TFTPD_PORT, or QRM_TFTPD_ENABLED=false)"
            ) from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServiceError(
                    f"cannot listen on UDP {where}: the port is in use (another TFTP server?)"
                ) from None
            raise ServiceError(f"cannot listen on UDP {where}: {exc.strerror}") from None
        _raise_fd_limit(2 * self.tftp.max_sessions + 256)
        self.server, self.source, self.resolver = server, source, resolver
        self._thread = threading.Thread(target=server.serve_forever, name="qrm-tftpd", daemon=True)
        self._thread.start()
        log.info(
            "tftp: listening on %s:%d, root %s, boot configurations from %s",
            server.address,
            server.port,
            root,
            source.describe(),
        )

    def stop(self) -> None:
        """Close the socket, end every transfer and join the thread."""
        if self.server is None or self._thread is None:
            return
        self.server.stop()
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            log.error("tftp: the server thread did not stop within 10 s")
        close = getattr(self.source, "close", None)
        if close is not None:
            close()
        self._thread = None

    def wait(self) -> None:
        """Block until the server stops (``qrm tftpd`` in the foreground)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=0.5)
