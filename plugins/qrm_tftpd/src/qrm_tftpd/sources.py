"""Where boot configurations come from: the qrm database, or a qrm server over HTTP.

``local`` is the default: the TFTP service runs inside ``qrm server`` (or as
``qrm tftpd`` beside it) and asks :func:`qrm_core.services.boot.boot_config`,
the single source of what a MAC boots, on every request - nothing is written
to disk, so there is nothing to get out of step.

``remote`` is for a TFTP server near the machines and away from the
database: it asks ``GET <server_url>/agent/v1/boot/<mac>`` with the site's
enrollment token, and fetches ``<server_url>/boot/<image>/vmlinuz|initrd``
for the TFTP fallback (kept for a short while, since every machine of a VE
asks for the same files).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

from qrm_core.plugin_api import (
    BootConfig,
    QrmError,
    boot_config,
    boot_image_files,
    get_enrollment_token,
    service_context,
)
from qrm_tftpd.content import open_regular
from qrm_tftpd.server import ERR_UNDEFINED, Content, TftpError

if TYPE_CHECKING:
    from qrm_core.plugin_api import PluginSystem, ServiceContext, Settings

log = logging.getLogger("qrm.tftpd")


class SourceError(QrmError):
    """The boot configuration could not be obtained."""


def enrollment_token(ctx: ServiceContext) -> str | None:
    """The site's enrollment token for ``qrm.enroll=``: the one place this is looked up."""
    return get_enrollment_token(ctx)


class LocalSource:
    """Boot configurations straight from the qrm database."""

    def __init__(self, settings: Settings, *, server_url: str | None, plugins: PluginSystem | None = None):
        self.settings = settings
        self.server_url = server_url
        self.plugins = plugins

    def describe(self) -> str:
        return f"local (database {self.settings.effective_database_url.split('@')[-1]})"

    def check(self) -> None:
        """Fail early (one line) if the database is unreachable or not initialised."""
        with service_context(self.settings, actor="tftpd", plugins=self.plugins, check_schema=True):
            pass

    def boot_config(self, mac: str) -> BootConfig:
        with service_context(
            self.settings, actor="tftpd", plugins=self.plugins, check_schema=False, readonly=True
        ) as ctx:
            return boot_config(ctx, mac, server_url=self.server_url, enrollment_token=enrollment_token(ctx))

    def boot_file(self, image: str, which: str) -> Content | None:
        with service_context(
            self.settings, actor="tftpd", plugins=self.plugins, check_schema=False, readonly=True
        ) as ctx:
            kernel, initrd = boot_image_files(ctx, image)
        path = kernel if which == "vmlinuz" else initrd
        if not path:
            return None
        # The path comes from the database (set by an operator), not from the
        # client, so it need not lie under the TFTP root.
        fd, st = open_regular(path)
        return Content(size=st.st_size, fd=fd, what=f"boot image {image} {which}")


class RemoteSource:
    """Boot configurations from a qrm server's ``/agent/v1/boot/<mac>``."""

    def __init__(
        self, server_url: str, token: str | None, *, timeout: float = 10.0, keep_seconds: float = 30.0
    ):
        self.server_url = server_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.keep_seconds = keep_seconds
        self._files: dict[str, tuple[float, int, int]] = {}  # url -> (fetched at, fd, size)
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}

    def describe(self) -> str:
        return f"remote ({self.server_url}/agent/v1/boot/<mac>)"

    def check(self) -> None:
        """Nothing to check before the first request; the server may start later."""

    def _open(self, url: str) -> Any:
        request = urllib.request.Request(url, headers={"Accept": "application/json, */*"})
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise SourceError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SourceError(f"cannot reach the qrm server at {self.server_url}: {reason}") from None

    def boot_config(self, mac: str) -> BootConfig:
        url = f"{self.server_url}/agent/v1/boot/{urllib.parse.quote(mac)}"
        response = self._open(url)
        if response is None:
            raise SourceError(f"{url}: not found")
        with response:
            try:
                config = BootConfig.model_validate(json.loads(response.read(1 << 20)))
            except ValueError as exc:
                raise SourceError(f"{url}: not a boot configuration ({str(exc).splitlines()[0]})") from None
        if config.mac != mac:
            raise SourceError(f"{url}: the answer is for {config.mac}, not {mac}")
        return config

    def boot_file(self, image: str, which: str) -> Content | None:
        url = f"{self.server_url}/boot/{urllib.parse.quote(image)}/{which}"
        with self._lock:
            fetch_lock = self._fetching.setdefault(url, threading.Lock())
        with fetch_lock:  # one download per file, however many machines ask at once
            with self._lock:
                kept = self._files.get(url)
                if kept is not None and time.monotonic() - kept[0] < self.keep_seconds:
                    return Content(
                        size=kept[2], fd=os.dup(kept[1]), what=f"boot image {image} {which} (remote)"
                    )
            try:
                response = self._open(url)
            except SourceError as exc:
                log.error("tftp: %s: %s", url, exc.message)
                raise TftpError(ERR_UNDEFINED, "boot file not available (qrm server)") from None
            if response is None:
                return None
            with response, tempfile.TemporaryFile(prefix="qrm-tftpd-") as spool:
                size = 0
                while chunk := response.read(1 << 20):
                    spool.write(chunk)
                    size += len(chunk)
                spool.flush()
                fd = os.dup(spool.fileno())  # outlives the spool object; reads use pread
            with self._lock:
                old = self._files.pop(url, None)
                self._files[url] = (time.monotonic(), fd, size)
            if old is not None:
                with contextlib.suppress(OSError):
                    os.close(old[1])
            return Content(size=size, fd=os.dup(fd), what=f"boot image {image} {which} (remote)")

    def close(self) -> None:
        with self._lock:
            for _, fd, _ in self._files.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._files.clear()
