"""Settings of the TFTP service (``QRM_TFTPD_*``, or a ``[tftpd]`` table in ``qrm.toml``).

Precedence, highest first: keyword arguments (the ``qrm tftpd`` command-line
options), environment variables, the ``[tftpd]`` table of the qrm
configuration file, built-in defaults.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    SettingsConfigDict,
)

from qrm_core.plugin_api import InvalidInput, PluginSettings, Settings

#: What a server URL may look like: it is written into iPXE scripts, so no
#: whitespace, quotes, ``$``/``{}`` (iPXE settings expansion), ``#``, ``;``,
#: ``&`` or ``|`` (iPXE command separators) can pass.
URL_RE = re.compile(r"^https?://[A-Za-z0-9._~:/?=%+,@\[\]-]+$")


class TftpSettings(PluginSettings):
    """Everything the TFTP service can be configured with."""

    model_config = SettingsConfigDict(env_prefix="QRM_TFTPD_", extra="ignore")
    plugin_table: ClassVar[str] = "tftpd"

    enabled: bool = True
    """Whether ``qrm server`` runs the TFTP service (the plugin must also be enabled)."""

    listen_address: str | None = None
    """IPv4 address to listen on; ``0.0.0.0`` answers on every interface, each
    transfer from the address the request was sent to. Default: core's
    ``QRM_PROVISIONING_ADDRESS``, else 127.0.0.1 only. Beyond loopback only
    once the admin password is changed (``qrm_core.plugin_api.check_listen``)."""

    port: int = Field(default=69, ge=0, le=65535)
    """UDP port (0 picks a free one, for tests). PXE clients always use 69."""

    root: Path | None = None
    """Directory of static files (default ``<data_dir>/tftpboot``). A file here
    overrides the boot loader of the same name from the Debian packages."""

    source: Literal["local", "remote"] = "local"
    """Where boot configurations come from: ``local`` reads the qrm database,
    ``remote`` asks ``<server_url>/agent/v1/boot/<mac>`` (a TFTP server near
    the machines, away from the database)."""

    server_url: str | None = None
    """The qrm server's URL for kernels/initrds over HTTP and for ``remote``;
    default: the core setting ``QRM_SERVER_URL``. Without one, kernels and
    initrds come over TFTP only."""

    enrollment_token: SecretStr | None = None
    """Bearer token for ``remote`` (the site's enrollment token)."""

    ipxe_dir: Path = Path("/usr/lib/ipxe")
    """Where Debian's ``ipxe`` package puts ``undionly.kpxe`` and ``ipxe.efi``."""

    pxelinux_dir: Path = Path("/usr/lib/PXELINUX")
    """Where Debian's ``pxelinux`` package puts ``pxelinux.0``."""

    syslinux_modules_dir: Path = Path("/usr/lib/syslinux/modules/bios")
    """Where Debian's ``syslinux-common`` puts ``ldlinux.c32`` and the other modules."""

    timeout: float = Field(default=1.0, gt=0, le=255)
    """Seconds before an unacknowledged packet is sent again (clients may ask
    for another value with the ``timeout`` option)."""

    retries: int = Field(default=5, ge=1, le=100)
    """Retransmissions before a silent client's transfer is abandoned."""

    max_sessions: int = Field(default=512, ge=1, le=100000)
    """Transfers at once; requests beyond this get a "server busy" error."""

    max_blksize: int = Field(default=65464, ge=512, le=65464)
    """Largest block size granted to a client that asks for one (RFC 2348)."""

    workers: int = Field(default=4, ge=1, le=64)
    """Threads that look up requested files and boot configurations."""

    cache_mb: int = Field(default=64, ge=0, le=4096)
    """Memory for small static files (boot loaders) that every machine fetches."""

    retry_seconds: int = Field(default=10, ge=1, le=3600)
    """How long a machine with nothing to boot waits before asking again."""

    remote_timeout: float = Field(default=10.0, gt=0, le=300)
    """Seconds to wait for the qrm server in ``remote`` mode."""

    @field_validator("listen_address")
    @classmethod
    def _ipv4(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        try:
            return str(ipaddress.IPv4Address(value.strip()))
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 address") from None

    @field_validator("server_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        value = value.strip().rstrip("/")
        if not URL_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a plain http(s) URL")
        return value

    # -- derived values --------------------------------------------------

    def address(self, core: Settings) -> str:
        """Where to listen: this setting, else the site's provisioning address, else loopback."""
        from qrm_core.plugin_api import listen_address

        address = listen_address(core, self.listen_address, service="tftpd")
        try:
            return str(ipaddress.IPv4Address(address))
        except ValueError:
            raise InvalidInput(
                f"tftpd listens on IPv4 only: QRM_PROVISIONING_ADDRESS {address} is not an IPv4 address; "
                "set QRM_TFTPD_LISTEN_ADDRESS"
            ) from None

    def root_dir(self, core: Settings) -> Path:
        """The static file directory."""
        return self.root if self.root is not None else core.data_dir / "tftpboot"

    def effective_server_url(self, core: Settings) -> str | None:
        """The server URL written into boot scripts, validated like our own setting."""
        if self.server_url:
            return self.server_url
        if core.server_url:
            try:
                return self._url(core.server_url)
            except ValueError as exc:
                raise InvalidInput(f"invalid QRM_SERVER_URL for boot scripts: {exc}") from None
        return None


def load_settings(**overrides: Any) -> TftpSettings:
    """The TFTP settings, with command-line overrides; bad values give one line."""
    return TftpSettings.load(**overrides)
