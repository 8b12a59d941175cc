"""vCenter (and standalone ESXi) connections: what ``qrm vmware connect`` stores.

A connection is a record of the plugin in the site's database (core's
plugin data store), so every qrm server of the site sees it. Its password is
encrypted (Fernet: AES-128-CBC with an HMAC) with the site key, a file
outside the database (``QRM_VMWARE_KEY_FILE``, default
``<data_dir>/vmware-site.key``, mode 0600): a dump or a replica of the
database alone does not give the password away. The password never appears
in a log line, an event, or ``--output json``: :class:`Connection` keeps it
out of its ``repr`` and its public shape.

No SDK is imported here: this module serves the CLI as well as the driver.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from qrm_core.plugin_api import (
    AlreadyExists,
    InvalidInput,
    NotFound,
    QrmError,
    ServiceContext,
    Settings,
    delete_record,
    get_record,
    list_records,
    put_record,
    read_record,
)
from qrm_core.plugin_api import validation as v
from qrm_vmware.settings import VmwareSettings

PLUGIN = "vmware"
PREFIX = "connection/"
_HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
_USER_RE = re.compile(r"^[^\x00-\x1f\x7f\s:]{1,128}$")


class SecretKeyError(QrmError):
    """The site key is missing, unreadable or not the one a secret was stored with."""

    code = "secret_key"
    http_status = 500


@dataclass(frozen=True)
class Connection:
    """One vCenter or ESXi endpoint and how to log in to it."""

    name: str
    url: str
    username: str
    password: str = field(repr=False)
    insecure: bool = False
    ca_file: str | None = None
    created_at: str = ""
    #: The vCenter's instance UUID, learnt at connect (hosts' stable identities derive from it).
    instance_uuid: str = ""
    #: ``VirtualCenter`` or ``HostAgent`` (a standalone ESXi host).
    api_type: str = ""
    last_sync: str | None = None
    last_sync_result: str | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 443

    @property
    def path(self) -> str:
        return urlsplit(self.url).path or "/sdk"

    def public(self) -> dict[str, Any]:
        """What ``qrm vmware list`` shows: everything but the password."""
        return {
            "name": self.name,
            "url": self.url,
            "username": self.username,
            "certificate_check": "off (--insecure)" if self.insecure else "on",
            "ca_file": self.ca_file,
            "api_type": self.api_type,
            "instance_uuid": self.instance_uuid,
            "created_at": self.created_at,
            "last_sync": self.last_sync,
            "last_sync_result": self.last_sync_result,
        }


# ---------------------------------------------------------------------------
# Validation (no I/O)
# ---------------------------------------------------------------------------


def check_name(name: str) -> str:
    name = v.name(name, "connection name")
    if len(name) > 32:
        raise InvalidInput(f"invalid connection name {name!r}: at most 32 characters")
    return name


def normalize_url(url: str) -> str:
    """``https://HOST[:PORT]/sdk``; a bare host name is taken as that."""
    text = (url or "").strip()
    if not text:
        raise InvalidInput("give the vCenter URL, e.g. --url https://vcenter.example.com/sdk")
    if "://" not in text:
        text = "https://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"invalid vCenter URL {url!r}: {exc}") from None
    if parts.scheme != "https":
        raise InvalidInput(f"invalid vCenter URL {url!r}: vCenter and ESXi speak https only")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput(
            "put the user name in -u and the password in -p or --password-file, not in the URL"
        )
    if parts.query or parts.fragment:
        raise InvalidInput(f"invalid vCenter URL {url!r}: no query or fragment")
    host = parts.hostname or ""
    if host.startswith("[") or ":" in host:
        host_text = f"[{v.ip(host.strip('[]'))}]"
    elif _HOST_RE.match(host):
        host_text = host.lower()
    else:
        raise InvalidInput(f"invalid vCenter URL {url!r}: {host!r} is not a host name or address")
    path = parts.path or "/sdk"
    if not re.fullmatch(r"/[A-Za-z0-9._/-]{0,63}", path):
        raise InvalidInput(f"invalid vCenter URL {url!r}: the path must be like /sdk")
    return f"https://{host_text}{'' if port in (None, 443) else f':{port}'}{path}"


def check_username(username: str) -> str:
    if not username or not _USER_RE.match(username):
        raise InvalidInput(
            f"invalid user name {username!r}: 1-128 characters, no spaces, colons or control characters"
        )
    return username


def check_password(password: str) -> str:
    if not password:
        raise InvalidInput("the password is empty")
    if len(password) > 512 or re.search(r"[\x00\r\n]", password):
        raise InvalidInput("the password must be one line of at most 512 characters")
    return password


def read_password_file(path: Path) -> str:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read the password file {path}: {exc.strerror}") from None
    return check_password(text.rstrip("\n"))


def check_ca_file(path: str | None) -> str | None:
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    try:
        text = resolved.read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read the CA file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"the CA file {path} is not PEM text") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise InvalidInput(f"the CA file {path} holds no PEM certificate")
    return str(resolved)


# ---------------------------------------------------------------------------
# The site key
# ---------------------------------------------------------------------------


class SiteKey:
    """The Fernet key in a file of mode 0600, created on first use by whoever stores a secret."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> bytes:
        try:
            mode = self.path.stat().st_mode
            data = self.path.read_bytes().strip()
        except FileNotFoundError:
            raise SecretKeyError(
                f"the site key {self.path} is missing: copy it from the qrm server where "
                "'qrm vmware connect' ran, or connect again"
            ) from None
        except OSError as exc:
            raise SecretKeyError(f"cannot read the site key {self.path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretKeyError(
                f"the site key {self.path} can be read by others (mode {stat.S_IMODE(mode):o}); chmod 600 it"
            )
        return data

    def _create(self) -> bytes:
        from cryptography.fernet import Fernet

        key = Fernet.generate_key()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return self._read()  # another process made it first
        with os.fdopen(fd, "wb") as handle:
            handle.write(key + b"\n")
        return key

    def _fernet(self, create: bool) -> Any:
        from cryptography.fernet import Fernet

        key = self._create() if create and not self.path.exists() else self._read()
        try:
            return Fernet(key)
        except ValueError:
            raise SecretKeyError(f"the site key {self.path} is not a valid key") from None

    def encrypt(self, secret: str) -> str:
        return str(self._fernet(create=True).encrypt(secret.encode()).decode())

    def decrypt(self, token: str, what: str) -> str:
        from cryptography.fernet import InvalidToken

        try:
            return str(self._fernet(create=False).decrypt(token.encode()).decode())
        except InvalidToken:
            raise SecretKeyError(
                f"cannot decrypt the password of {what}: the site key {self.path} is not the one it was "
                "stored with (copy the key from the server that ran 'qrm vmware connect', or connect again)"
            ) from None


# ---------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ConnectionStore:
    """Connections in core's plugin data store; passwords encrypted with the site key."""

    def __init__(self, core: Settings, settings: VmwareSettings) -> None:
        self.key = SiteKey(settings.effective_key_file(core))

    @staticmethod
    def _key(name: str) -> str:
        return PREFIX + name

    def _from_record(self, name: str, record: dict[str, Any], *, with_password: bool) -> Connection:
        password = (
            self.key.decrypt(str(record["password"]), f"vCenter connection {name}") if with_password else ""
        )
        return Connection(
            name=name,
            url=str(record["url"]),
            username=str(record["username"]),
            password=password,
            insecure=bool(record.get("insecure", False)),
            ca_file=record.get("ca_file"),
            created_at=str(record.get("created_at", "")),
            instance_uuid=str(record.get("instance_uuid", "")),
            api_type=str(record.get("api_type", "")),
            last_sync=record.get("last_sync"),
            last_sync_result=record.get("last_sync_result"),
        )

    def get(self, ctx: ServiceContext, name: str, *, with_password: bool = True) -> Connection:
        record = get_record(ctx, PLUGIN, self._key(check_name(name)))
        if record is None:
            raise NotFound(f"vCenter connection {name!r} does not exist (see 'qrm vmware list')")
        return self._from_record(name, record, with_password=with_password)

    def read(self, core: Settings, name: str) -> Connection:
        """:meth:`get` without a service context (for the driver: no plugin system, no write lock)."""
        record = read_record(core, PLUGIN, self._key(check_name(name)))
        if record is None:
            raise NotFound(f"vCenter connection {name!r} does not exist (see 'qrm vmware list')")
        return self._from_record(name, record, with_password=True)

    def list(self, ctx: ServiceContext) -> list[Connection]:
        return [
            self._from_record(key.removeprefix(PREFIX), record, with_password=False)
            for key, record in list_records(ctx, PLUGIN, PREFIX).items()
        ]

    def exists(self, ctx: ServiceContext, name: str) -> bool:
        return get_record(ctx, PLUGIN, self._key(name)) is not None

    def put(self, ctx: ServiceContext, connection: Connection, *, replace_existing: bool) -> None:
        """Store in the current transaction (the caller records the event and commits)."""
        if not replace_existing and self.exists(ctx, connection.name):
            raise AlreadyExists(
                f"vCenter connection {connection.name!r} already exists; remove it first or connect with --replace"
            )
        put_record(ctx, PLUGIN, self._key(connection.name), self._record(connection))

    def _record(self, connection: Connection) -> dict[str, Any]:
        return {
            "url": connection.url,
            "username": connection.username,
            "password": self.key.encrypt(connection.password),
            "insecure": connection.insecure,
            "ca_file": connection.ca_file,
            "created_at": connection.created_at or now_text(),
            "instance_uuid": connection.instance_uuid,
            "api_type": connection.api_type,
            "last_sync": connection.last_sync,
            "last_sync_result": connection.last_sync_result,
        }

    def note_sync(self, ctx: ServiceContext, name: str, result: str) -> None:
        """Remember when and how the last sync of ``name`` went (current transaction)."""
        record = get_record(ctx, PLUGIN, self._key(name))
        if record is None:
            return  # removed meanwhile
        record["last_sync"] = now_text()
        record["last_sync_result"] = result[:512]
        put_record(ctx, PLUGIN, self._key(name), record)

    def remove(self, ctx: ServiceContext, name: str) -> None:
        if not delete_record(ctx, PLUGIN, self._key(check_name(name))):
            raise NotFound(f"vCenter connection {name!r} does not exist (see 'qrm vmware list')")


def with_identity(connection: Connection, instance_uuid: str, api_type: str) -> Connection:
    return replace(connection, instance_uuid=instance_uuid, api_type=api_type)
