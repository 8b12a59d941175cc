"""The core tables (DESIGN.md section 1) and the public shapes they are shown in.

Conventions, after the FastAPI full-stack template: ``X(table=True)`` is the
database row; ``XPublic`` is what the CLI and the API show (stable JSON).
Table rows never leave the services layer.

The database enforces what it can: unique names and MACs, foreign keys with
RESTRICT (nothing in use can vanish), one VE per resource (a single ``ve_id``
column), allowed enum values and ranges (CHECK constraints), and exactly one
default boot image (a unique nullable marker column, portable to SQLite,
PostgreSQL and MariaDB).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from qrm_core.shapes import (  # noqa: F401 - the public shapes, re-exported
    MAX_ID,
    ApiTokenCreated,
    ApiTokenPublic,
    BootImagePublic,
    EventPublic,
    FilesystemImagePublic,
    HealthPublic,
    HostCapacity,
    ImageSnapshotPublic,
    InitPublic,
    MemberHealthPublic,
    PartitionDetail,
    PartitionPublic,
    PartitionSyncPublic,
    PluginPublic,
    PowerStatePublic,
    ResourceDetail,
    ResourceListPublic,
    ResourcePublic,
    StorageServerPublic,
    UserPublic,
    VirtualEnvironmentDetail,
    VirtualEnvironmentPublic,
)

# Stable constraint names, so that Alembic migrations are identical on every
# database backend.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    Stored as naive UTC (MySQL's DATETIME has no zone) with microseconds
    (``DATETIME(6)`` on MySQL), returned as aware UTC.
    """

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime())

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------
# Enumerations (stored as short strings, checked by the database)
# ---------------------------------------------------------------------------


class StrEnum(enum.StrEnum):
    @classmethod
    def values(cls) -> list[str]:
        return [member.value for member in cls]

    @classmethod
    def sql_in(cls, column: str) -> str:
        allowed = ", ".join(f"'{v}'" for v in cls.values())
        return f"{column} IN ({allowed})"


class ResourceKind(StrEnum):
    PHYSICAL = "physical"
    VIRTUAL = "virtual"


class ResourceState(StrEnum):
    NEW = "new"
    IDLE = "idle"
    ASSIGNED = "assigned"
    BOOTING = "booting"
    ACTIVE = "active"
    # A partition paused on its hypervisor: silent, but not failed (no failover while paused).
    PAUSED = "paused"
    ERROR = "error"
    OFF = "off"


class Deployment(StrEnum):
    SINGLE = "single"
    SHARED = "shared"
    PARTITIONED = "partitioned"


class VEDesiredState(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"


class VEState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"
    STOPPING = "stopping"


class PartitionState(StrEnum):
    CREATING = "creating"
    STOPPED = "stopped"
    RUNNING = "running"
    PAUSED = "paused"
    ERROR = "error"


class ImageOrigin(StrEnum):
    CAPTURED = "captured"
    IMPORTED = "imported"
    EMPTY = "empty"
    AUTO = "auto"


class ImageState(StrEnum):
    READY = "ready"
    CREATING = "creating"
    ERROR = "error"


class EventLevel(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"


NAME_LEN = 64


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


class StorageServer(SQLModel, table=True):
    __tablename__ = "storage_server"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=NAME_LEN, unique=True)
    type: str = Field(max_length=32)
    address: str = Field(max_length=255)
    comment: str = Field(default="", max_length=255)
    # Per-server driver settings (``qrm storage set``): strings, e.g. how to reach it over SSH.
    settings: dict[str, str] | None = Field(default=None, sa_type=sa.JSON)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class FilesystemImage(SQLModel, table=True):
    __tablename__ = "filesystem_image"
    __table_args__ = (
        sa.UniqueConstraint("storage_id", "location"),
        sa.CheckConstraint(ImageOrigin.sql_in("origin"), name="origin"),
        sa.CheckConstraint(ImageState.sql_in("state"), name="state"),
        sa.CheckConstraint("size_mb IS NULL OR size_mb >= 0", name="size"),
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=NAME_LEN, unique=True)
    storage_id: int = Field(
        sa_column=sa.Column(
            sa.Integer, sa.ForeignKey("storage_server.id", ondelete="RESTRICT"), nullable=False
        )
    )
    location: str = Field(max_length=255)
    origin: str = Field(default=ImageOrigin.IMPORTED.value, max_length=16)
    state: str = Field(default=ImageState.READY.value, max_length=16)
    size_mb: int | None = None
    comment: str = Field(default="", max_length=255)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # Where the data came from (``root@10.0.11.172:/``, an archive, another
    # image) and when it was last filled from there; empty for an empty image.
    source: str = Field(default="", max_length=255)
    source_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # What a running job on the image (a capture, a clone) has done so far, one
    # line for people; empty when nothing runs.
    progress: str = Field(default="", max_length=255)


class BootImage(SQLModel, table=True):
    __tablename__ = "boot_image"
    __table_args__ = (
        sa.CheckConstraint("default_marker IS NULL OR default_marker = 1", name="default_marker"),
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=NAME_LEN, unique=True)
    kernel_version: str = Field(max_length=64)
    kernel_path: str | None = Field(default=None, max_length=512)
    initrd_path: str | None = Field(default=None, max_length=512)
    kernel_sha256: str | None = Field(default=None, max_length=64)
    initrd_sha256: str | None = Field(default=None, max_length=64)
    cmdline: str = Field(default="", max_length=512)
    # 1 for the default boot image, NULL otherwise; unique, so at most one default.
    default_marker: int | None = Field(default=None, unique=True)
    comment: str = Field(default="", max_length=255)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)

    @property
    def is_default(self) -> bool:
        return self.default_marker == 1


class VirtualEnvironment(SQLModel, table=True):
    __tablename__ = "virtual_environment"
    __table_args__ = (
        sa.CheckConstraint(Deployment.sql_in("deployment"), name="deployment"),
        sa.CheckConstraint(VEDesiredState.sql_in("desired_state"), name="desired_state"),
        sa.CheckConstraint(VEState.sql_in("state"), name="state"),
        sa.CheckConstraint("req_kind IS NULL OR " + ResourceKind.sql_in("req_kind"), name="req_kind"),
        sa.CheckConstraint("pool_size >= 1", name="pool_size_positive"),
        sa.CheckConstraint("deployment = 'shared' OR pool_size = 1", name="pool_size_single"),
        sa.CheckConstraint(
            "deployment <> 'partitioned' OR req_hypervisor IS NOT NULL",
            name="partitioned_hypervisor",
        ),
        sa.CheckConstraint("req_cpus >= 0 AND req_memory_mb >= 0", name="requirements"),
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=NAME_LEN, unique=True)
    boot_image_id: int = Field(
        sa_column=sa.Column(sa.Integer, sa.ForeignKey("boot_image.id", ondelete="RESTRICT"), nullable=False)
    )
    fs_image_id: int = Field(
        sa_column=sa.Column(
            sa.Integer, sa.ForeignKey("filesystem_image.id", ondelete="RESTRICT"), nullable=False
        )
    )
    deployment: str = Field(default=Deployment.SINGLE.value, max_length=16)
    req_kind: str | None = Field(default=None, max_length=16)
    req_hypervisor: str | None = Field(default=None, max_length=32)
    req_cpus: int = 0
    req_memory_mb: int = 0
    pool_size: int = 1
    failover: bool = False
    # Checks monitoring plugins run on every member ("http:80", "tcp:5432"; see
    # services.validation.monitor_checks); their meaning is the plugin's.
    monitor: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    # A member that a monitoring plugin holds down (hard state) counts as failed,
    # like one whose heartbeats stopped (needs failover; off by default).
    monitor_failover: bool = False
    # Keep a snapshot of the filesystem image as it was when the VE first
    # started, so ``qrm ve reset`` can give it back (storage with snapshots).
    pristine: bool = False
    kernel_args: str = Field(default="", max_length=512)
    desired_state: str = Field(default=VEDesiredState.STOPPED.value, max_length=16)
    state: str = Field(default=VEState.STOPPED.value, max_length=16)
    # Why the VE cannot be (fully) placed right now; empty when it can.
    problem: str = Field(default="", max_length=1024)
    # Where a ``qrm ve reset`` of the running VE is (services.images.reset_ve):
    # "rebooting" (its machines were told to reboot; each holds its boot in the
    # initrd once it is down), "reverting" (the image goes back to its first
    # start); empty otherwise. While set, no machine of the VE mounts its image.
    reset_phase: str = Field(default="", max_length=16)
    # Bumped on every start/stop request; lets the reconciler tell requests apart.
    generation: int = 0
    comment: str = Field(default="", max_length=255)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Resource(SQLModel, table=True):
    __tablename__ = "resource"
    __table_args__ = (
        sa.CheckConstraint(ResourceKind.sql_in("kind"), name="kind"),
        sa.CheckConstraint(ResourceState.sql_in("state"), name="state"),
        sa.CheckConstraint("host_id IS NULL OR kind = 'virtual'", name="host_only_for_vms"),
        sa.CheckConstraint("cpus >= 0 AND memory_mb >= 0", name="size"),
        sa.CheckConstraint(
            "ve_id IS NOT NULL OR state NOT IN ('assigned', 'booting', 'active')",
            name="assigned_has_ve",
        ),
        sa.CheckConstraint("pending_command IS NULL OR pending_command IN ('halt')", name="pending_command"),
        sa.CheckConstraint("heartbeat_timeout IS NULL OR heartbeat_timeout > 0", name="heartbeat_timeout"),
    )

    id: int | None = Field(default=None, primary_key=True)
    mac: str = Field(max_length=17, unique=True)
    ip: str | None = Field(default=None, max_length=45, index=True)
    hostname: str | None = Field(default=None, max_length=NAME_LEN)
    kind: str = Field(default=ResourceKind.PHYSICAL.value, max_length=16)
    host_id: int | None = Field(
        default=None,
        sa_column=sa.Column(sa.Integer, sa.ForeignKey("resource.id", ondelete="RESTRICT"), nullable=True),
    )
    hypervisor: str | None = Field(default=None, max_length=32)
    # Hypervisors this machine can host partitions of (reported by its agent).
    capabilities: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    cpus: int = 0
    memory_mb: int = 0
    state: str = Field(default=ResourceState.NEW.value, max_length=16, index=True)
    ve_id: int | None = Field(
        default=None,
        sa_column=sa.Column(
            sa.Integer,
            sa.ForeignKey("virtual_environment.id", ondelete="RESTRICT"),
            nullable=True,
            index=True,
        ),
    )
    # Raised whenever qrm orders a reboot; every boot carries it (qrm.gen=N),
    # so heartbeats from the OS booted before (a lower number) are recognised.
    boot_generation: int = 0
    # The generation of the last registration: lower than boot_generation
    # while a reboot qrm ordered is under way (then the boot timeout applies).
    booted_generation: int = 0
    # A command waiting for the next heartbeat besides reboot (``halt``).
    pending_command: str | None = Field(default=None, max_length=16)
    # Seconds without heartbeats before the resource is in error (None: the site default).
    heartbeat_timeout: float | None = None
    load: float | None = None
    last_seen: datetime | None = Field(default=None, sa_type=UTCDateTime, index=True)
    state_changed_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    token_hash: str | None = Field(default=None, max_length=128)
    comment: str = Field(default="", max_length=255)
    # A hypervisor host: how qrm reaches its hypervisor (a libvirt URI, a vCenter
    # host reference; None: the driver's default from the address), the
    # provisioning network its partitions join, other driver settings.
    hypervisor_uri: str | None = Field(default=None, max_length=512)
    network: str | None = Field(default=None, max_length=64)
    host_settings: dict[str, str] | None = Field(default=None, sa_type=sa.JSON)
    # A machine with a power controller (BMC, PDU): the power driver that fences it.
    power_driver: str | None = Field(default=None, max_length=32)
    power_address: str | None = Field(default=None, max_length=255)
    power_username: str | None = Field(default=None, max_length=64)
    # Secret: never shown, logged or put in an event.
    power_password: str | None = Field(default=None, max_length=255)
    # A host without an agent that another manager knows (``vmware:vc1``):
    # kept by that plugin's sync (services/managed.py), never placed into a
    # VE, never timed out for want of heartbeats.
    managed_by: str | None = Field(default=None, max_length=96, index=True)
    # Memory not in use now, as the host's hypervisor or manager reports it.
    free_memory_mb: int | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Partition(SQLModel, table=True):
    __tablename__ = "partition"
    __table_args__ = (
        sa.UniqueConstraint("host_id", "name"),
        sa.CheckConstraint(PartitionState.sql_in("state"), name="state"),
        sa.CheckConstraint("cpus >= 1 AND memory_mb >= 1", name="size"),
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=NAME_LEN)
    host_id: int = Field(
        sa_column=sa.Column(sa.Integer, sa.ForeignKey("resource.id", ondelete="RESTRICT"), nullable=False)
    )
    hypervisor: str = Field(max_length=32)
    cpus: int = 1
    memory_mb: int = 256
    cpu_pinning: str = Field(default="", max_length=255)
    #: What it may grow to while running, as asked when it was added (None:
    #: the driver's default): whoever makes it (the request, or an engine
    #: pass finishing a ``creating`` row) defines the same domain.
    max_cpus: int | None = None
    max_memory_mb: int | None = None
    mac: str = Field(max_length=17, unique=True)
    state: str = Field(default=PartitionState.CREATING.value, max_length=16)
    resource_id: int | None = Field(
        default=None,
        sa_column=sa.Column(
            sa.Integer,
            sa.ForeignKey("resource.id", ondelete="SET NULL"),
            nullable=True,
            unique=True,
        ),
    )
    ve_id: int | None = Field(
        default=None,
        sa_column=sa.Column(
            sa.Integer,
            sa.ForeignKey("virtual_environment.id", ondelete="SET NULL"),
            nullable=True,
        ),
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class SiteSetting(SQLModel, table=True):
    """Site-wide values shared by every qrm server on one database (enrollment token, ...)."""

    __tablename__ = "site_setting"

    key: str = Field(max_length=64, primary_key=True)
    value: str = Field(sa_type=sa.Text)
    changed_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class PluginData(SQLModel, table=True):
    """A plugin's own records (a vCenter connection, a cursor), as JSON under
    ``(plugin, key)``; shared by every qrm server on one database. Read and
    written through :mod:`qrm_core.services.plugin_data` only. Secrets go in
    encrypted by the plugin."""

    __tablename__ = "plugin_data"

    plugin: str = Field(max_length=NAME_LEN, primary_key=True)
    key: str = Field(max_length=128, primary_key=True)
    value: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    changed_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Event(SQLModel, table=True):
    __tablename__ = "event"
    __table_args__ = (sa.CheckConstraint(EventLevel.sql_in("level"), name="level"),)

    id: int | None = Field(default=None, primary_key=True)
    time: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    actor: str = Field(max_length=64)
    object_type: str = Field(max_length=32)
    object_name: str = Field(default="", max_length=128)
    level: str = Field(default=EventLevel.INFO.value, max_length=16)
    message: str = Field(sa_type=sa.Text)


class User(SQLModel, table=True):
    __tablename__ = "user_account"
    __table_args__ = (sa.CheckConstraint(Role.sql_in("role"), name="role"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=NAME_LEN, unique=True)
    password_hash: str = Field(max_length=255)
    role: str = Field(default=Role.VIEWER.value, max_length=16)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_token"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(
        sa_column=sa.Column(sa.Integer, sa.ForeignKey("user_account.id", ondelete="CASCADE"), nullable=False)
    )
    name: str = Field(max_length=NAME_LEN)
    token_hash: str = Field(max_length=128, unique=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_used: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ConsoleSession(SQLModel, table=True):
    """A login to the web console: the browser holds the secret in a cookie,
    the database a SHA-256 hash of it (logging out deletes the row)."""

    __tablename__ = "console_session"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(max_length=64, unique=True)
    user_id: int = Field(
        sa_column=sa.Column(sa.Integer, sa.ForeignKey("user_account.id", ondelete="CASCADE"), nullable=False)
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)


class LoginFailure(SQLModel, table=True):
    """Failed password logins counted per user name and per client address,
    in the database so that every qrm server on it throttles alike
    (:mod:`qrm_core.services.logins`). ``key`` is ``user:`` or ``address:``
    followed by a SHA-256 of the lower-cased name or the address (no
    collation of any backend can then join two keys)."""

    __tablename__ = "login_failure"

    key: str = Field(max_length=80, primary_key=True)
    failures: int = 0
    first_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class PluginSetting(SQLModel, table=True):
    """Persisted enable/disable state of a plugin (``qrm plugins enable|disable``)."""

    __tablename__ = "plugin_setting"

    name: str = Field(max_length=NAME_LEN, primary_key=True)
    enabled: bool = True
    changed_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
