"""Settings of the DHCP service (``QRM_DHCPD_*``, or a ``[dhcpd]`` table in ``qrm.toml``).

Precedence, highest first: keyword arguments, environment variables, the
``[dhcpd]`` table of the qrm configuration file, built-in defaults.

The plugin is *configured* once ``QRM_DHCPD_SUBNET`` is set; until then every
hook does nothing and the ``qrm dhcpd`` commands say what to set. Every value
that ends up in a generated configuration file is checked here against a
strict alphabet, so a setting cannot smuggle configuration into Kea's JSON or
ISC dhcpd's ``dhcpd.conf`` either.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    NoDecode,
    SettingsConfigDict,
)

from qrm_core.plugin_api import InvalidInput, PluginSettings, Settings

ENV_PREFIX = "QRM_DHCPD_"

#: Linux interface names (IFNAMSIZ is 16 with the NUL).
INTERFACE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
#: A DNS domain name: dot-separated labels of letters, digits and '-'.
DOMAIN_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
#: OMAPI key names and network namespace names.
TOKEN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
#: Paths go into Kea's JSON (escaped anyway) and onto command lines (no shell):
#: refuse control characters and quotes so that nothing odd reaches a log line either.
_BAD_PATH = re.compile(r"[\x00-\x1f\x7f\"'\\]")
#: Longest path a unix socket can bind to (sun_path is 108 bytes with the NUL).
UNIX_PATH_MAX = 107


class DhcpdSettings(PluginSettings):
    """Everything the DHCP service can be configured with."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")
    plugin_table: ClassVar[str] = "dhcpd"

    backend: Literal["kea", "isc"] = "kea"
    """``kea`` (Kea DHCPv4; live changes over its control socket or its hosts
    database) or ``isc`` (ISC dhcpd 4.4, as openQRM used it; live changes
    through OMAPI)."""

    manage: bool = False
    """Run the DHCP server from ``qrm server`` (started and stopped with it).
    Without it, qrm drives a server someone else runs: it writes the
    configuration file and changes the running server live."""

    interface: str | None = None
    """Interface the DHCP server answers on (the provisioning network). Required."""

    subnet: ipaddress.IPv4Network | None = None
    """The provisioning subnet, e.g. ``10.0.0.0/24``. Setting it configures the plugin."""

    pool_start: ipaddress.IPv4Address | None = None
    """First address of the dynamic pool from which new machines get an address
    while they are discovered."""

    pool_end: ipaddress.IPv4Address | None = None
    """Last address of the dynamic pool."""

    router: ipaddress.IPv4Address | None = None
    """Default gateway handed out (option 3), if any."""

    dns_servers: Annotated[list[ipaddress.IPv4Address], NoDecode] = Field(default_factory=list)
    """Name servers handed out (option 6), comma-separated in the environment."""

    domain: str | None = None
    """Domain name handed out (option 15)."""

    lease_time: int = Field(default=3600, ge=60, le=30 * 86400)
    """Lease time in seconds for dynamic and reserved addresses."""

    next_server: ipaddress.IPv4Address | None = None
    """The TFTP server's address (siaddr / next-server). Required."""

    boot_loader: Literal["ipxe", "pxelinux"] = "ipxe"
    """``ipxe``: BIOS PXE gets ``undionly.kpxe``, UEFI x86-64 gets ``ipxe.efi``,
    iPXE gets ``boot.ipxe``. ``pxelinux``: every PXE client gets
    ``pxelinux.0`` (openQRM's way)."""

    state_dir: Path | None = None
    """Where the generated configuration, leases, pid file and control socket
    live (default ``<data_dir>/dhcpd``)."""

    config_path: Path | None = None
    """The configuration file qrm writes (default ``<state_dir>/kea-dhcp4.json``
    or ``<state_dir>/dhcpd.conf``). When driving an existing server, point this
    at the file that server reads."""

    lease_path: Path | None = None
    """Lease file (default ``<state_dir>/kea-leases4.csv`` or ``<state_dir>/dhcpd.leases``)."""

    pid_path: Path | None = None
    """ISC dhcpd's pid file (default ``<state_dir>/dhcpd.pid``); Kea writes its
    own into ``KEA_PIDFILE_DIR``, which qrm sets to the state directory."""

    log_path: Path | None = None
    """Where the managed server's output goes (default ``<state_dir>/<backend>.log``)."""

    kea_control_socket: Path | None = None
    """Kea's unix control socket (default ``<state_dir>/kea4.sock``)."""

    kea_subnet_id: int = Field(default=1, ge=1, le=4294967294)
    """Kea's id for the subnet; reservations in the hosts database are filed under it."""

    kea_hosts_database: SecretStr | None = None
    """Kea's hosts database as a URL, e.g. ``postgresql://kea@/kea?host=/run/postgresql``
    or ``mysql://root@localhost/kea``. With it, one reservation change is one
    row change (independent of the number of resources) instead of a new
    configuration sent to Kea. Create the schema with ``qrm dhcpd db-init``."""

    kea_dhcp4: str = "kea-dhcp4"
    """The ``kea-dhcp4`` program."""

    kea_admin: str = "kea-admin"
    """The ``kea-admin`` program (``qrm dhcpd db-init``)."""

    dhcpd: str = "dhcpd"
    """ISC's ``dhcpd`` program."""

    isc_omapi_host: str = "127.0.0.1"
    """Where ISC dhcpd's OMAPI listens (seen from ``netns`` if set)."""

    isc_omapi_port: int = Field(default=7911, ge=1, le=65535)
    """ISC dhcpd's OMAPI port."""

    isc_omapi_key_name: str = "qrm-omapi"
    """Name of the OMAPI HMAC-MD5 key."""

    isc_omapi_secret: SecretStr | None = None
    """Base64 secret of the OMAPI key. When qrm manages dhcpd and none is set,
    one is generated into ``<state_dir>/omapi.secret`` (mode 0600)."""

    isc_ping_check: bool = True
    """ISC dhcpd pings a pool address before offering it and waits a second
    for an answer (its default). Safer on a network with hand-configured
    machines; ``false`` saves the second on every first boot."""

    netns: str | None = None
    """Network namespace the DHCP server lives in: the managed server is
    started there, the configuration is checked there, and OMAPI connections
    are made from there (a provisioning network kept apart from the host's)."""

    timeout: float = Field(default=10.0, gt=0, le=300)
    """Seconds to wait for the DHCP server (start, control socket, OMAPI)."""

    # -- validation ------------------------------------------------------

    @field_validator("interface")
    @classmethod
    def _interface(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not INTERFACE_RE.match(value) or value in (".", ".."):
            raise ValueError(f"{value!r} is not an interface name")
        return value

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        value = value.rstrip(".")
        if not DOMAIN_RE.match(value):
            raise ValueError(f"{value!r} is not a domain name (letters, digits, '-' and dots)")
        return value.lower()

    @field_validator("isc_omapi_key_name", "netns")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not TOKEN_RE.match(value):
            raise ValueError(f"{value!r} is not allowed: use letters, digits, '.', '_' and '-'")
        return value

    @field_validator("isc_omapi_host")
    @classmethod
    def _host(cls, value: str) -> str:
        try:
            return str(ipaddress.IPv4Address(value.strip()))
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 address") from None

    @field_validator("isc_omapi_secret")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None
        check_secret(value.get_secret_value())
        return value

    @field_validator(
        "state_dir",
        "config_path",
        "lease_path",
        "pid_path",
        "log_path",
        "kea_control_socket",
    )
    @classmethod
    def _path(cls, value: Path | None) -> Path | None:
        if value is None or str(value) == "":
            return None
        if _BAD_PATH.search(str(value)):
            raise ValueError(f"{str(value)!r} contains quotes, backslashes or control characters")
        return value

    @field_validator("kea_dhcp4", "kea_admin", "dhcpd")
    @classmethod
    def _program(cls, value: str) -> str:
        if not value or _BAD_PATH.search(value) or " " in value:
            raise ValueError(f"{value!r} is not a program name or path")
        return value

    @field_validator("dns_servers", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _network(self) -> DhcpdSettings:
        if self.subnet is None:
            return self
        net = self.subnet
        if net.prefixlen > 30:
            raise ValueError(f"QRM_DHCPD_SUBNET {net} is too small for a DHCP pool (use /30 or larger)")
        if self.pool_start is None or self.pool_end is None:
            raise ValueError("the dynamic pool is not set: set QRM_DHCPD_POOL_START and QRM_DHCPD_POOL_END")
        for what, addr in (("pool start", self.pool_start), ("pool end", self.pool_end)):
            if addr not in net or addr in (net.network_address, net.broadcast_address):
                raise ValueError(
                    f"{what} {addr} (QRM_DHCPD_{what.upper().replace(' ', '_')}) is not a host address of subnet {net}"
                )
        if int(self.pool_start) > int(self.pool_end):
            raise ValueError(
                f"QRM_DHCPD_POOL_START {self.pool_start} is after QRM_DHCPD_POOL_END {self.pool_end}"
            )
        if self.router is not None and (
            self.router not in net or self.router in (net.network_address, net.broadcast_address)
        ):
            raise ValueError(f"QRM_DHCPD_ROUTER {self.router} is not a host address of subnet {net}")
        if self.router is not None and self.in_pool(self.router):
            raise ValueError(f"QRM_DHCPD_ROUTER {self.router} lies inside the dynamic pool")
        if self.next_server is None:
            raise ValueError("the TFTP server address is not set: set QRM_DHCPD_NEXT_SERVER")
        if self.interface is None:
            raise ValueError("the interface is not set: set QRM_DHCPD_INTERFACE")
        if len(self.dns_servers) > 8:
            raise ValueError("QRM_DHCPD_DNS_SERVERS: at most 8 DNS servers")
        return self

    # -- derived values --------------------------------------------------

    @property
    def configured(self) -> bool:
        """Whether the plugin has a network to serve (``QRM_DHCPD_SUBNET`` is set)."""
        return self.subnet is not None

    def in_pool(self, addr: ipaddress.IPv4Address) -> bool:
        assert self.pool_start is not None and self.pool_end is not None
        return int(self.pool_start) <= int(addr) <= int(self.pool_end)

    def effective_state_dir(self, core: Settings) -> Path:
        return self.state_dir if self.state_dir is not None else core.data_dir / "dhcpd"

    def paths(self, core: Settings) -> DhcpdPaths:
        """Every file the backend uses, with defaults filled in and unix-socket length checked."""
        state = self.effective_state_dir(core)
        kea = self.backend == "kea"
        paths = DhcpdPaths(
            state_dir=state,
            config=self.config_path or state / ("kea-dhcp4.json" if kea else "dhcpd.conf"),
            leases=self.lease_path or state / ("kea-leases4.csv" if kea else "dhcpd.leases"),
            pid=self.pid_path or state / ("kea-dhcp4.pid" if kea else "dhcpd.pid"),
            log=self.log_path or state / ("kea-dhcp4.log" if kea else "dhcpd.log"),
            control_socket=self.kea_control_socket or state / "kea4.sock",
            omapi_secret=state / "omapi.secret",
        )
        for path in (paths.state_dir, paths.config, paths.leases, paths.pid, paths.log, paths.control_socket):
            if _BAD_PATH.search(str(path)):
                raise InvalidInput(f"path {str(path)!r} contains quotes, backslashes or control characters")
        if kea and len(os.fsencode(paths.control_socket)) > UNIX_PATH_MAX:
            raise InvalidInput(
                f"Kea control socket path {paths.control_socket} is longer than {UNIX_PATH_MAX} bytes; "
                "set QRM_DHCPD_KEA_CONTROL_SOCKET to a shorter path"
            )
        return paths


class DhcpdPaths:
    """The files of one backend (a plain value object)."""

    def __init__(
        self,
        *,
        state_dir: Path,
        config: Path,
        leases: Path,
        pid: Path,
        log: Path,
        control_socket: Path,
        omapi_secret: Path,
    ) -> None:
        self.state_dir = state_dir
        self.config = config
        self.leases = leases
        self.pid = pid
        self.log = log
        self.control_socket = control_socket
        self.omapi_secret = omapi_secret


def check_secret(value: str) -> bytes:
    """An OMAPI secret must be base64 of at least 16 bytes; it goes into dhcpd.conf quoted."""
    if not re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", value):
        raise ValueError("the OMAPI secret must be base64 (letters, digits, '+', '/', '=')")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the OMAPI secret is not valid base64") from None
    if len(raw) < 16:
        raise ValueError("the OMAPI secret is too short (at least 16 bytes of key)")
    return raw


def load_settings(**overrides: Any) -> DhcpdSettings:
    """The DHCP settings; a bad value gives one line naming the variable.

    Without overrides they are kept until the environment or qrm.toml
    changes: the resource hooks ask for them on every registration, and
    building them cost 1-2 ms of CPU, half of a registration's (bench/server)."""
    if overrides:
        return DhcpdSettings.load(**overrides)
    return DhcpdSettings.cached()


def require_configured(settings: DhcpdSettings) -> DhcpdSettings:
    """Commands that need a network raise a one-line hint when the plugin is not configured."""
    if not settings.configured:
        raise InvalidInput(
            "the DHCP service is not configured: set QRM_DHCPD_SUBNET, QRM_DHCPD_POOL_START, "
            "QRM_DHCPD_POOL_END, QRM_DHCPD_INTERFACE and QRM_DHCPD_NEXT_SERVER (see the qrm-dhcpd README)"
        )
    return settings
