"""The REST API under ``/api/v1``: everything the CLI does, as thin shells over the services."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Path, Query, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field, model_validator

from qrm_core.api.deps import ROLE_RANK, Admin, Ctx, Operator, Principal, Viewer
from qrm_core.api.openapi import errors
from qrm_core.errors import Forbidden, InvalidInput
from qrm_core.models import (
    MAX_ID,
    ApiTokenCreated,
    ApiTokenPublic,
    BootImagePublic,
    Deployment,
    EventLevel,
    EventPublic,
    FilesystemImagePublic,
    ImageSnapshotPublic,
    PartitionDetail,
    PartitionPublic,
    PartitionSyncPublic,
    PluginPublic,
    PowerStatePublic,
    ResourceDetail,
    ResourceKind,
    ResourceListPublic,
    ResourcePublic,
    ResourceState,
    Role,
    StorageServerPublic,
    UserPublic,
    VEState,
    VirtualEnvironmentDetail,
    VirtualEnvironmentPublic,
)
from qrm_core.services import (
    agent,
    boot_images,
    events,
    partitions,
    plugin_state,
    power,
    resources,
    storage,
    tokens,
    users,
)
from qrm_core.services import images as image_service
from qrm_core.services import validation as v
from qrm_core.services import virtual_environments as ves

router = APIRouter(prefix="/api/v1")

Id = Annotated[int, Path(ge=1, le=MAX_ID)]
#: A machine by id, MAC (any notation) or hostname: ASCII only ('²' is a digit
#: to Python, not an id), as long as the longest of them.
Ref = Annotated[
    str,
    Path(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9.:_-]*$",
        description="a resource's id, MAC address or hostname",
    ),
]


def rule(description: str | None = None, default: Any = ..., **schema: Any) -> Any:
    """A field whose rules are written into the OpenAPI document only: the
    services check them (one validation, one message for the CLI and the API),
    and a client reads them here."""
    return Field(default=default, description=description, json_schema_extra=schema or None)


#: The rules of services.validation, as JSON Schema.
NAME = {
    "minLength": 1,
    "maxLength": 64,
    "pattern": r"^(?![0-9]+$)[A-Za-z0-9][A-Za-z0-9._-]*$",
}
COMMENT = {"maxLength": 255, "pattern": r"^[^\x00-\x1f\x7f]*$"}
#: Unicast (the first octet even) and not all zeros, in the usual notations.
MAC = {
    "maxLength": 17,
    "pattern": r"^(?![0:.-]*$)[0-9a-fA-F]?[02468aceACE]([:-])[0-9a-fA-F]{1,2}(\1[0-9a-fA-F]{1,2}){4}$"
    r"|^(?![0.]*$)[0-9a-fA-F][02468aceACE][0-9a-fA-F]{2}\.[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}$"
    r"|^(?!0*$)[0-9a-fA-F][02468aceACE][0-9a-fA-F]{10}$",
}
IP = {"anyOf": [{"type": "string", "format": "ipv4"}, {"type": "string", "format": "ipv6"}]}
HOSTNAME = {"maxLength": 63, "pattern": r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$"}
KERNEL_VERSION = {"minLength": 1, "maxLength": 64, "pattern": r"^[A-Za-z0-9][A-Za-z0-9._+~-]*$"}
KERNEL_ARGS = {"maxLength": 512, "pattern": r"^ *([A-Za-z0-9_.][A-Za-z0-9_.,:/=+@%-]* *)*$"}
MONITOR_CHECK = {
    "type": "string",
    "maxLength": 436,
    "pattern": r"^[a-z][a-z0-9_-]{0,31}(:[A-Za-z0-9._/-]{1,100}){0,4}$",
}
PASSWORD = {"minLength": users.MIN_PASSWORD_LENGTH, "maxLength": users.MAX_PASSWORD_LENGTH}
LABEL = {"minLength": 1, "maxLength": 64, "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]*$"}


class Body(BaseModel):
    """A request body: JSON types as the document says them (no 0 for false, no
    "1" for 1), so what the schema refuses the server refuses too."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        """JSON Schema counts 1.0 as an integer; strict validation would not."""
        if not isinstance(data, dict):
            return data
        ints = {name for name, f in cls.model_fields.items() if f.annotation in (int, int | None)}
        return {
            k: int(x) if k in ints and isinstance(x, float) and x.is_integer() else x for k, x in data.items()
        }


def _wake(request: Request) -> None:
    runner = getattr(request.app.state, "engine", None)
    if runner is not None:
        runner.wake()


# ---------------------------------------------------------------------------
# Health and identity
# ---------------------------------------------------------------------------


class HealthStatus(BaseModel):
    status: Literal["ok"]
    version: str
    leader: bool | None


@router.get("/health", tags=["server"])
def health(request: Request) -> HealthStatus:
    """Liveness; needs no user."""
    from qrm_core import __version__

    runner = getattr(request.app.state, "engine", None)
    return HealthStatus(status="ok", version=__version__, leader=runner.is_leader if runner else None)


class WhoAmI(BaseModel):
    name: str
    role: str
    via: str


@router.get("/auth/whoami", tags=["auth"])
def whoami(user: Viewer) -> WhoAmI:
    return WhoAmI(name=user.name, role=user.role, via=user.via)


class TokenCreate(Body):
    name: str = rule("a name to tell the token by", "cli", **NAME)
    user: str | None = rule("whose token (admins: any user's; default: yours)", None, **NAME)


@router.post("/auth/tokens", tags=["auth"], status_code=201, responses=errors(403, 404))
def create_token(user: Viewer, ctx: Ctx, body: TokenCreate) -> ApiTokenCreated:
    """Create an API token for the calling user (an admin: for any user); the token is shown only here."""
    return tokens.create_token(ctx, name=body.name, user=body.user, admin=user.role == Role.ADMIN)


@router.get("/auth/tokens", tags=["auth"], responses=errors(403, 404))
def list_tokens(
    user: Viewer,
    ctx: Ctx,
    owner: Annotated[str | None, Query(alias="user")] = None,
    all_users: Annotated[bool, Query(alias="all")] = False,
) -> list[ApiTokenPublic]:
    """The calling user's API tokens; an admin may ask for another user's, or every user's
    (``all``; with ``user``, that user's)."""
    return tokens.list_tokens(ctx, user=owner, all_users=all_users, admin=user.role == Role.ADMIN)


@router.delete("/auth/tokens/{token_id}", tags=["auth"], responses=errors(403))
def revoke_token(user: Viewer, ctx: Ctx, token_id: Id) -> ApiTokenPublic:
    """Revoke an API token: its owner or an admin may."""
    return tokens.revoke_token(ctx, token_id, admin=user.role == Role.ADMIN)


# ---------------------------------------------------------------------------
# Storage servers and filesystem images
# ---------------------------------------------------------------------------


class StorageSsh(Body):
    """How qrm reaches a storage server over SSH (the key's text is never sent back)."""

    ssh_user: str | None = Field(default=None, max_length=32, pattern=r"^[a-z_][a-z0-9_-]*$")
    ssh_port: int | None = Field(default=None, ge=1, le=65535)
    ssh_key: str | None = Field(
        default=None,
        max_length=65536,
        description="a private key file's text",
        json_schema_extra={"pattern": r"^\s*-----BEGIN [^\n]*PRIVATE KEY-----"},
    )
    ssh_host_key: str | None = Field(
        default=None,
        max_length=16384,
        description="the server's host key: TYPE BASE64 (its .pub file or an ssh-keyscan line)",
        json_schema_extra={
            "pattern": r"^\s*(\S+\s+)?(ssh-[a-z0-9-]+|ecdsa-sha2-nistp[0-9]+|sk-[a-z0-9@.-]+)\s+[A-Za-z0-9+/]+=*(\s|$)"
        },
    )
    settings: dict[str, str] = Field(
        default_factory=dict,
        max_length=64,
        description="driver settings, KEY: VALUE",
        json_schema_extra={
            "propertyNames": {"pattern": r"^[a-z][a-z0-9_]{0,39}$", "not": {"enum": list(storage.SSH_KEYS)}},
            "additionalProperties": {
                "type": "string",
                "maxLength": 255,
                "pattern": r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$",
            },
        },
    )
    check: bool = True

    def ssh(self, local: bool = False) -> storage.SshChange:
        return storage.SshChange(
            user=self.ssh_user, port=self.ssh_port, key=self.ssh_key, host_key=self.ssh_host_key, local=local
        )

    def wants_admin(self, user: Principal) -> None:
        """Giving qrm a key to another machine is an administrator's decision."""
        if (self.ssh_key is not None or self.ssh_user is not None) and ROLE_RANK[user.role] < ROLE_RANK[
            "admin"
        ]:
            raise Forbidden(f"user {user.name} ({user.role}) may not give qrm SSH access; it needs admin")


class StorageCreate(StorageSsh):
    name: str = rule(None, **NAME)
    type: str = rule("storage type: an installed storage driver's name")
    address: str = rule("the storage server's IP address", **IP)
    comment: str | None = rule(None, None, **COMMENT)


SSH_OPTIONS = ("ssh_user", "ssh_port", "ssh_key", "ssh_host_key")


def _given(*keys: str) -> list[Any]:
    """JSON Schema: the field is there and not null, one each."""
    return [{"required": [key], "properties": {key: {"not": {"type": "null"}}}} for key in keys]


class StorageUpdate(StorageSsh):
    comment: str | None = rule(None, None, **COMMENT)
    unset: list[str] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"items": {"type": "string", "pattern": r"^[a-z][a-z0-9_]{0,39}$"}},
    )
    local: bool = False

    model_config = {
        "json_schema_extra": {
            "allOf": [
                {  # something to change
                    "anyOf": [
                        *_given("comment", "ssh_user", "ssh_port", "ssh_key", "ssh_host_key"),
                        {"required": ["settings"], "properties": {"settings": {"minProperties": 1}}},
                        {"required": ["unset"], "properties": {"unset": {"minItems": 1}}},
                        {"required": ["local"], "properties": {"local": {"const": True}}},
                    ]
                },
                {  # local (this machine) goes with no SSH option
                    "anyOf": [
                        {"properties": {"local": {"const": False}}},
                        {"properties": {k: {"type": "null"} for k in SSH_OPTIONS}},
                    ]
                },
            ]
        }
    }


@router.get("/storage", tags=["storage"])
def storage_list(user: Viewer, ctx: Ctx) -> list[StorageServerPublic]:
    return storage.list_storage(ctx)


@router.post("/storage", tags=["storage"], status_code=201, responses=errors(502))
def storage_add(user: Operator, ctx: Ctx, body: StorageCreate) -> StorageServerPublic:
    body.wants_admin(user)
    return storage.add_storage(
        ctx,
        name=body.name,
        type=body.type,
        address=body.address,
        comment=body.comment,
        settings=body.settings,
        ssh=body.ssh(),
        check=body.check,
    )


@router.patch("/storage/{name}", tags=["storage"], responses=errors(502))
def storage_set(user: Operator, ctx: Ctx, name: str, body: StorageUpdate) -> StorageServerPublic:
    """Change a storage server's settings, how qrm reaches it over SSH, or its comment."""
    body.wants_admin(user)
    return storage.set_storage(
        ctx,
        name,
        comment=body.comment,
        settings=body.settings,
        unset=body.unset,
        ssh=body.ssh(local=body.local),
        check=body.check,
    )


@router.get("/storage/{name}", tags=["storage"])
def storage_show(user: Viewer, ctx: Ctx, name: str) -> StorageServerPublic:
    return storage.show_storage(ctx, name)


@router.delete("/storage/{name}", tags=["storage"])
def storage_remove(user: Operator, ctx: Ctx, name: str) -> StorageServerPublic:
    return storage.remove_storage(ctx, name)


class FilesystemImageCreate(Body):
    name: str = rule(None, **NAME)
    storage: str = rule("the storage server holding it", **NAME)
    location: str | None = rule("an existing volume (give it or size_mb)", None, minLength=1, maxLength=255)
    size_mb: int | None = Field(default=None, ge=1, le=v.MAX_INT)
    comment: str | None = rule(None, None, **COMMENT)
    fill_from: str | None = rule(
        "auto image: another image's name, an http(s) URL, or local-disk[:/dev/DEVICE]"
        " (the local disk of the machine that boots it)",
        None,
        maxLength=2048,
        pattern=r"^(https?://[^\s]+|local-disk:/dev/[^\s]+|[A-Za-z0-9][A-Za-z0-9._-]*)$",
    )
    sha256: str | None = rule("the download's SHA-256", None, pattern=r"^[0-9a-fA-F]{64}$")


@router.get("/filesystem-images", tags=["filesystem images"], responses=errors(404))
def fs_list(
    user: Viewer, ctx: Ctx, storage_name: Annotated[str | None, Query(alias="storage")] = None
) -> list[FilesystemImagePublic]:
    return storage.list_filesystem_images(ctx, storage=storage_name)


@router.post("/filesystem-images", tags=["filesystem images"], status_code=201, responses=errors(404, 502))
def fs_add(user: Operator, ctx: Ctx, body: FilesystemImageCreate) -> FilesystemImagePublic:
    if (
        body.fill_from is not None
        and "/" in body.fill_from
        and not body.fill_from.startswith(("http://", "https://", "local-disk:"))
    ):
        raise InvalidInput(
            "through the API, an auto image fills from another image, an http(s) URL or local-disk"
        )
    return storage.add_filesystem_image(
        ctx,
        name=body.name,
        storage=body.storage,
        location=body.location,
        size_mb=body.size_mb,
        comment=body.comment,
        fill_from=body.fill_from,
        sha256=body.sha256,
    )


class CaptureRequest(Body):
    """``qrm filesystem-image create --from``: the machine, and the key or the password that
    logs in to it (one of the two; never stored, logged or returned: kept in the server's
    memory for the job's life)."""

    name: str = rule(None, **NAME)
    storage: str = rule(None, **NAME)
    source: str = Field(max_length=1024)
    identity: str | None = Field(default=None, max_length=65536)
    password: str | None = Field(default=None, max_length=1024)
    host_key: str | None = Field(default=None, max_length=16384)
    port: int | None = Field(default=None, ge=1, le=65535)
    excludes: list[str] = Field(default_factory=list, max_length=64)
    size_mb: int | None = Field(default=None, ge=1, le=v.MAX_INT)
    bwlimit: int | None = Field(default=None, ge=1, le=100_000_000, description="KB/s")
    comment: str | None = rule(None, None, **COMMENT)


class ImportRequest(Body):
    name: str = rule(None, **NAME)
    storage: str = rule(None, **NAME)
    archive: str = rule("an http(s) URL the server fetches", maxLength=2048, pattern=r"^https?://[^\s]+$")
    sha256: str | None = rule("the archive's SHA-256", None, pattern=r"^[0-9a-fA-F]{64}$")
    size_mb: int | None = Field(default=None, ge=1, le=v.MAX_INT)
    comment: str | None = rule(None, None, **COMMENT)


class CaptureAgain(Body):
    identity: str | None = Field(default=None, max_length=65536)
    password: str | None = Field(default=None, max_length=1024)
    host_key: str | None = Field(default=None, max_length=16384)


class CloneRequest(Body):
    name: str = rule(None, **NAME)
    storage: str | None = rule(None, None, **NAME)
    comment: str | None = rule(None, None, **COMMENT)


class SnapshotRequest(Body):
    label: str | None = rule("default: the time", None, **LABEL)


class RevertRequest(Body):
    label: str = rule(None, **LABEL)


def _capture_in_background(
    request: Request,
    actor: str,
    name: str,
    identity: str | None,
    host_key: str | None,
    bwlimit: int | None = None,
    password: str | None = None,
) -> None:
    state = request.app.state
    image_service.capture_in_background(
        state.settings, state.plugins, actor, name, identity=identity, host_key=host_key, bwlimit=bwlimit,
        password=password,
    )  # fmt: skip


@router.post(
    "/filesystem-images/capture", tags=["filesystem images"], status_code=202, responses=errors(404, 502)
)
def fs_capture(user: Operator, ctx: Ctx, request: Request, body: CaptureRequest) -> FilesystemImagePublic:
    """Start capturing a running machine: the login is tried and the image made (state
    ``creating``) before this returns; the copy goes on in the background."""
    image_service.check_bwlimit(body.bwlimit)
    image = image_service.start_capture(
        ctx,
        name=body.name,
        storage=body.storage,
        source=body.source,
        identity=body.identity,
        password=body.password,
        host_key=body.host_key,
        port=body.port,
        excludes=body.excludes,
        size_mb=body.size_mb,
        comment=body.comment,
    )
    _capture_in_background(
        request, ctx.actor, image.name, body.identity, body.host_key, body.bwlimit, body.password
    )
    return image


@router.post(
    "/filesystem-images/import", tags=["filesystem images"], status_code=201, responses=errors(404, 502)
)
def fs_import(user: Operator, ctx: Ctx, body: ImportRequest) -> FilesystemImagePublic:
    """A new image from a root filesystem archive at an http(s) URL (checked, then unpacked)."""
    if not body.archive.startswith(("http://", "https://")):
        raise InvalidInput("give the archive as an http(s) URL the server can fetch")
    return image_service.import_filesystem_image(
        ctx, name=body.name, storage=body.storage, archive=body.archive, sha256=body.sha256,
        size_mb=body.size_mb, comment=body.comment,
    )  # fmt: skip


@router.post(
    "/filesystem-images/{name}/capture",
    tags=["filesystem images"],
    status_code=202,
    responses=errors(404, 502),
)
def fs_capture_again(
    user: Operator, ctx: Ctx, request: Request, name: str, body: CaptureAgain
) -> FilesystemImagePublic:
    """Go on with an interrupted capture (or bring a captured image up to date), in the background."""
    image = storage.show_filesystem_image(ctx, name)
    if image.origin != "captured":
        raise InvalidInput(f"filesystem image {name} was not captured from a machine ({image.origin})")
    if (body.identity is None) == (body.password is None):
        raise InvalidInput(
            "give the key (identity) or the password that logs in to the machine, one of the two"
        )
    with image_service.job_lock(ctx, name):
        pass  # InUse (409) now rather than a job that ends at once in the background
    _capture_in_background(request, ctx.actor, name, body.identity, body.host_key, password=body.password)
    return image


@router.post(
    "/filesystem-images/{name}/clone", tags=["filesystem images"], status_code=201, responses=errors(404, 502)
)
def fs_clone(user: Operator, ctx: Ctx, name: str, body: CloneRequest) -> FilesystemImagePublic:
    return image_service.clone_filesystem_image(
        ctx, name, name=body.name, storage=body.storage, comment=body.comment
    )


@router.get("/filesystem-images/{name}/snapshots", tags=["filesystem images"], responses=errors(404, 502))
def fs_snapshots(user: Viewer, ctx: Ctx, name: str) -> list[ImageSnapshotPublic]:
    return image_service.list_image_snapshots(ctx, name)


@router.post(
    "/filesystem-images/{name}/snapshots",
    tags=["filesystem images"],
    status_code=201,
    responses=errors(404, 502),
)
def fs_snapshot(user: Operator, ctx: Ctx, name: str, body: SnapshotRequest) -> ImageSnapshotPublic:
    return image_service.snapshot_filesystem_image(ctx, name, label=body.label)


@router.delete(
    "/filesystem-images/{name}/snapshots/{label}", tags=["filesystem images"], responses=errors(404, 502)
)
def fs_snapshot_remove(
    user: Operator, ctx: Ctx, name: str, label: Annotated[str, Path(json_schema_extra=LABEL)]
) -> ImageSnapshotPublic:
    return image_service.remove_image_snapshot(ctx, name, label)


@router.post("/filesystem-images/{name}/revert", tags=["filesystem images"], responses=errors(404, 502))
def fs_revert(user: Operator, ctx: Ctx, name: str, body: RevertRequest) -> ImageSnapshotPublic:
    return image_service.revert_filesystem_image(ctx, name, label=body.label)


@router.get("/filesystem-images/{name}", tags=["filesystem images"])
def fs_show(user: Viewer, ctx: Ctx, name: str) -> FilesystemImagePublic:
    return storage.show_filesystem_image(ctx, name)


@router.delete("/filesystem-images/{name}", tags=["filesystem images"], responses=errors(502))
def fs_remove(user: Operator, ctx: Ctx, name: str, purge: bool = False) -> FilesystemImagePublic:
    return storage.remove_filesystem_image(ctx, name, purge=purge)


# ---------------------------------------------------------------------------
# Boot images
# ---------------------------------------------------------------------------


@router.get("/boot-images", tags=["boot images"])
def boot_list(user: Viewer, ctx: Ctx) -> list[BootImagePublic]:
    return boot_images.list_boot_images(ctx)


@router.post("/boot-images", tags=["boot images"], status_code=201)
def boot_add(
    user: Operator,
    ctx: Ctx,
    name: Annotated[str, Form(min_length=1, json_schema_extra=NAME)],
    kernel_version: Annotated[str, Form(min_length=1, json_schema_extra=KERNEL_VERSION)],
    cmdline: Annotated[str | None, Form(json_schema_extra=KERNEL_ARGS)] = None,
    make_default: Annotated[Literal["true", "false"], Form()] = "false",
    comment: Annotated[str | None, Form(json_schema_extra=COMMENT)] = None,
    kernel: Annotated[UploadFile | None, File(json_schema_extra={"minLength": 1})] = None,
    initrd: Annotated[UploadFile | None, File(json_schema_extra={"minLength": 1})] = None,
) -> BootImagePublic:
    """Add a boot image; kernel and initrd are uploaded as files (multipart)."""
    if (kernel is None) != (initrd is None):
        raise InvalidInput("give both kernel and initrd files, or neither")
    with tempfile.TemporaryDirectory(prefix="qrm-upload-") as tmp:
        paths: dict[str, FilePath] = {}
        for label, upload in (("kernel", kernel), ("initrd", initrd)):
            if upload is not None:
                path = FilePath(tmp) / label
                with open(path, "wb") as out:
                    shutil.copyfileobj(upload.file, out, 1 << 20)
                paths[label] = path
        return boot_images.add_boot_image(
            ctx,
            name=name,
            kernel_version=kernel_version,
            kernel=paths.get("kernel"),
            initrd=paths.get("initrd"),
            cmdline=cmdline,
            make_default=make_default == "true",
            comment=comment,
        )


@router.get("/boot-images/{name}", tags=["boot images"])
def boot_show(user: Viewer, ctx: Ctx, name: str) -> BootImagePublic:
    return boot_images.show_boot_image(ctx, name)


@router.post("/boot-images/{name}/default", tags=["boot images"])
def boot_set_default(user: Operator, ctx: Ctx, name: str) -> BootImagePublic:
    return boot_images.set_default_boot_image(ctx, name)


@router.delete("/boot-images/{name}", tags=["boot images"])
def boot_remove(user: Operator, ctx: Ctx, name: str) -> BootImagePublic:
    return boot_images.remove_boot_image(ctx, name)


# ---------------------------------------------------------------------------
# Virtual environments
# ---------------------------------------------------------------------------


class VECreate(Body):
    name: str = rule(None, **NAME)
    boot_image: str = rule(None, **NAME)
    fs_image: str = rule(None, **NAME)
    deployment: Deployment = Field(default=Deployment.SINGLE, strict=False)  # its value, from JSON
    pool_size: int | None = Field(default=None, ge=1, le=10000)
    hypervisor: str | None = rule("an installed hypervisor driver's name", None)
    kind: ResourceKind | None = Field(default=None, strict=False)
    cpus: int | None = Field(default=None, ge=0, le=1024)
    memory_mb: int | None = Field(default=None, ge=0, le=16 * 1024 * 1024)
    failover: bool = False
    kernel_args: str | None = rule(None, None, **KERNEL_ARGS)
    comment: str | None = rule(None, None, **COMMENT)
    monitor: list[str] | None = rule(
        "checks for monitoring plugins, NAME[:ARG...] (http:80)", None, maxItems=16, items=MONITOR_CHECK
    )
    monitor_failover: bool = False
    pristine: bool = False

    model_config = {
        "json_schema_extra": {
            "allOf": [
                {  # failover on monitoring needs failover
                    "anyOf": [
                        {"properties": {"monitor_failover": {"const": False}}},
                        {"required": ["failover"], "properties": {"failover": {"const": True}}},
                    ]
                },
                {  # a pool size is a shared deployment's
                    "anyOf": [
                        {"required": ["deployment"], "properties": {"deployment": {"const": "shared"}}},
                        {"properties": {"pool_size": {"enum": [None, 1]}}},
                    ]
                },
                {  # a partitioned deployment names its hypervisor
                    "anyOf": [
                        {"properties": {"deployment": {"not": {"const": "partitioned"}}}},
                        {"required": ["hypervisor"], "properties": {"hypervisor": {"type": "string"}}},
                    ]
                },
                {  # a hypervisor requirement means virtual resources
                    "anyOf": [
                        {"properties": {"hypervisor": {"type": "null"}}},
                        {"not": {"required": ["hypervisor"]}},
                        {"properties": {"kind": {"not": {"const": "physical"}}}},
                    ]
                },
            ]
        }
    }


class VEUpdate(Body):
    """What ``PATCH /ves/NAME`` may change; fields left out stay as they are."""

    pool_size: int | None = Field(default=None, ge=1, le=10000)
    monitor: list[str] | None = rule(None, None, maxItems=16, items=MONITOR_CHECK)
    monitor_failover: bool | None = None

    model_config = {"json_schema_extra": {"anyOf": _given("pool_size", "monitor", "monitor_failover")}}


@router.get("/ves", tags=["virtual environments"])
def ve_list(user: Viewer, ctx: Ctx, state: VEState | None = None) -> list[VirtualEnvironmentPublic]:
    return ves.list_ves(ctx, state=state)


@router.post("/ves", tags=["virtual environments"], status_code=201, responses=errors(404))
def ve_create(user: Operator, ctx: Ctx, body: VECreate) -> VirtualEnvironmentPublic:
    return ves.create_ve(ctx, **body.model_dump())


@router.get("/ves/{name}", tags=["virtual environments"])
def ve_show(user: Viewer, ctx: Ctx, name: str) -> VirtualEnvironmentDetail:
    return ves.ve_detail(ctx, name)


@router.delete("/ves/{name}", tags=["virtual environments"])
def ve_remove(user: Operator, ctx: Ctx, name: str) -> VirtualEnvironmentPublic:
    return ves.remove_ve(ctx, name)


@router.post("/ves/{name}/start", tags=["virtual environments"])
def ve_start(user: Operator, ctx: Ctx, request: Request, name: str) -> VirtualEnvironmentPublic:
    result = ves.start_ve(ctx, name)
    _wake(request)
    return result


@router.post("/ves/{name}/stop", tags=["virtual environments"])
def ve_stop(user: Operator, ctx: Ctx, request: Request, name: str) -> VirtualEnvironmentPublic:
    result = ves.stop_ve(ctx, name)
    _wake(request)
    return result


@router.post("/ves/{name}/reset", tags=["virtual environments"])
def ve_reset(user: Operator, ctx: Ctx, request: Request, name: str) -> VirtualEnvironmentPublic:
    """Give a pristine VE back what it started with: stop, revert its image, start again."""
    _wake(request)
    result = image_service.reset_ve(ctx, name, progress=lambda _: _wake(request))
    _wake(request)
    return result


@router.patch("/ves/{name}", tags=["virtual environments"])
def ve_update(
    user: Operator, ctx: Ctx, request: Request, name: str, body: VEUpdate
) -> VirtualEnvironmentPublic:
    if body.pool_size is None and body.monitor is None and body.monitor_failover is None:
        raise InvalidInput("nothing to change: give pool_size, monitor or monitor_failover")
    result = ves.show_ve(ctx, name)
    if body.pool_size is not None and result.deployment != "shared":
        raise InvalidInput("only a shared virtual environment has a pool size")  # before anything changes
    if body.monitor is not None or body.monitor_failover is not None:
        result = ves.set_ve(ctx, name, monitor=body.monitor, monitor_failover=body.monitor_failover)
    if body.pool_size is not None:
        result = ves.resize_ve(ctx, name, body.pool_size)
        _wake(request)
    return result


# ---------------------------------------------------------------------------
# Resources and partitions
# ---------------------------------------------------------------------------


class ResourceCreate(Body):
    mac: str = rule("the machine's MAC address (aa:bb:cc:dd:ee:ff, aa-bb-..., aabb.ccdd.eeff)", **MAC)
    ip: str | None = rule(None, None, **IP)
    hostname: str | None = rule(None, None, **HOSTNAME)
    kind: ResourceKind = Field(default=ResourceKind.PHYSICAL, strict=False)
    host: str | None = rule(
        "a virtual machine's host (a resource's id, MAC or hostname)", None, minLength=1, maxLength=64
    )
    hypervisor: str | None = rule("an installed hypervisor driver's name", None)
    cpus: int = Field(default=0, ge=0, le=4096)
    memory_mb: int = Field(default=0, ge=0, le=64 * 1024 * 1024)
    comment: str | None = rule(None, None, **COMMENT)
    hypervisor_uri: str | None = None
    network: str | None = None

    model_config = {
        "json_schema_extra": {
            "anyOf": [  # only a virtual resource has a host
                {"not": {"required": ["host"]}},
                {"properties": {"host": {"type": "null"}}},
                {"required": ["kind"], "properties": {"kind": {"const": "virtual"}}},
            ]
        }
    }


@router.get("/resources", tags=["resources"], responses=errors(404))
def resource_list(
    user: Viewer,
    ctx: Ctx,
    state: ResourceState | None = None,
    kind: ResourceKind | None = None,
    ve: str | None = None,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int | None, Query(ge=1, le=100000)] = None,
) -> ResourceListPublic:
    return resources.list_resources(ctx, state=state, kind=kind, ve=ve, offset=offset, limit=limit)


@router.post("/resources", tags=["resources"], status_code=201, responses=errors(404))
def resource_add(user: Operator, ctx: Ctx, body: ResourceCreate) -> ResourcePublic:
    return resources.add_resource(ctx, **body.model_dump())


@router.get("/resources/{ref}", tags=["resources"])
def resource_show(user: Viewer, ctx: Ctx, ref: Ref) -> ResourceDetail:
    return resources.resource_detail(ctx, ref)


@router.delete("/resources/{ref}", tags=["resources"])
def resource_remove(user: Operator, ctx: Ctx, ref: Ref) -> ResourcePublic:
    return resources.remove_resource(ctx, ref)


@router.post("/resources/{ref}/reboot", tags=["resources"])
def resource_reboot(user: Operator, ctx: Ctx, ref: Ref) -> ResourcePublic:
    agent.order_reboot(ctx, ref)
    return resources.show_resource(ctx, ref)


@router.post("/resources/{ref}/halt", tags=["resources"])
def resource_halt(user: Operator, ctx: Ctx, ref: Ref) -> ResourcePublic:
    agent.order_halt(ctx, ref)
    return resources.show_resource(ctx, ref)


class ResourceSettings(Body):
    """``qrm resource set``: only what is given changes; an empty string clears a value."""

    hypervisor: str | None = None
    hypervisor_uri: str | None = None
    network: str | None = None
    host_settings: dict[str, str] | None = None
    power_driver: str | None = None
    power_address: str | None = None
    power_username: str | None = None
    power_password: str | None = None


@router.patch("/resources/{ref}", tags=["resources"])
def resource_set(user: Operator, ctx: Ctx, ref: Ref, body: ResourceSettings) -> ResourceDetail:
    """Set how qrm reaches a machine's hypervisor and power controller (the password is never shown)."""
    return resources.set_resource(ctx, ref, **body.model_dump(exclude_none=True))


@router.get("/resources/{ref}/power", tags=["resources"], responses=errors(502))
def resource_power_status(user: Viewer, ctx: Ctx, ref: Ref) -> PowerStatePublic:
    return power.power(ctx, ref, "status")


@router.post("/resources/{ref}/power/{action}", tags=["resources"], responses=errors(502))
def resource_power(
    user: Operator, ctx: Ctx, ref: Ref, action: Literal["on", "off", "reset"]
) -> PowerStatePublic:
    """Turn a machine on or off, or reset it, through its power controller."""
    return power.power(ctx, ref, action)


@router.post("/resources/{ref}/sync", tags=["partitions"], responses=errors(502))
def resource_sync(user: Operator, ctx: Ctx, ref: Ref) -> PartitionSyncPublic:
    """Reconcile qrm's records of a host's partitions with what its hypervisor lists."""
    return partitions.sync_host(ctx, ref)


class PartitionCreate(Body):
    host: str = rule("the host (a resource's id, MAC or hostname)", minLength=1, maxLength=64)
    count: int = Field(default=1, ge=1, le=partitions.MAX_COUNT)
    cpus: int = Field(ge=1, le=partitions.MAX_CPUS)
    memory_mb: int = Field(ge=1, le=partitions.MAX_MEMORY_MB)
    hypervisor: str | None = rule("an installed hypervisor driver's name", None)
    name: str | None = rule("name prefix: partitions are PREFIX-1, PREFIX-2, ...", None, **NAME)
    max_cpus: int | None = Field(default=None, ge=1, le=partitions.MAX_CPUS)
    max_memory_mb: int | None = Field(default=None, ge=1, le=partitions.MAX_MEMORY_MB)


class PartitionResize(Body):
    memory_mb: int | None = Field(default=None, ge=1, le=partitions.MAX_MEMORY_MB)
    cpus: int | None = Field(default=None, ge=1, le=partitions.MAX_CPUS)
    mode: Literal["both", "live", "config"] = "both"

    model_config = {"json_schema_extra": {"anyOf": _given("memory_mb", "cpus")}}


class PartitionPin(Body):
    pinning: str = rule(
        "VCPU:CPULIST separated by ';', e.g. 0:2,3;1:4",
        minLength=3,
        maxLength=255,
        pattern=r"^[0-9]{1,4}:[0-9]{1,4}(,[0-9]{1,4})*(;[0-9]{1,4}:[0-9]{1,4}(,[0-9]{1,4})*)*$",
    )
    mode: Literal["both", "live", "config"] = "both"


class PartitionMigrate(Body):
    to: str = rule("the destination host (a resource's id, MAC or hostname)", minLength=1, maxLength=64)
    offline: bool = False


class PartitionForce(Body):
    force: bool = rule("stop or pause even if the partition does not answer (ignored by the others)", False)


@router.get("/partitions", tags=["partitions"], responses=errors(404))
def partition_list(user: Viewer, ctx: Ctx, host: str | None = None) -> list[PartitionPublic]:
    return partitions.list_partitions(ctx, host)


@router.post("/partitions", tags=["partitions"], status_code=201, responses=errors(404, 502))
def partition_add(user: Operator, ctx: Ctx, body: PartitionCreate) -> list[PartitionPublic]:
    """Make COUNT partitions of one size on a host: they network-boot and register as idle resources."""
    return partitions.add_partitions(ctx, **body.model_dump(exclude={"name"}), prefix=body.name)


@router.get("/partitions/{name}", tags=["partitions"], responses=errors(502))
def partition_show(user: Viewer, ctx: Ctx, name: str, host: str | None = None) -> PartitionDetail:
    return partitions.show_partition(ctx, name, host)


@router.patch("/partitions/{name}", tags=["partitions"], responses=errors(502))
def partition_set(
    user: Operator, ctx: Ctx, name: str, body: PartitionResize, host: str | None = None
) -> PartitionPublic:
    """Change a partition's memory and/or virtual CPUs."""
    return partitions.set_partition(ctx, name, host, memory_mb=body.memory_mb, cpus=body.cpus, mode=body.mode)


@router.post("/partitions/{name}/pin", tags=["partitions"], responses=errors(502))
def partition_pin(
    user: Operator, ctx: Ctx, name: str, body: PartitionPin, host: str | None = None
) -> PartitionPublic:
    return partitions.pin_partition(ctx, name, body.pinning, host, mode=body.mode)


@router.post("/partitions/{name}/migrate", tags=["partitions"], responses=errors(502))
def partition_migrate(
    user: Operator, ctx: Ctx, name: str, body: PartitionMigrate, host: str | None = None
) -> PartitionPublic:
    return partitions.migrate_partition(ctx, name, body.to, host, offline=body.offline)


@router.post("/partitions/{name}/{action}", tags=["partitions"], responses=errors(502))
def partition_action(
    user: Operator,
    ctx: Ctx,
    name: str,
    action: Literal["start", "stop", "pause", "resume", "reboot"],
    host: str | None = None,
    body: PartitionForce | None = None,
) -> PartitionPublic:
    """Start, stop, pause, resume or reboot a partition (``force``: stop or pause anyway)."""
    force = bool(body and body.force) and action in ("stop", "pause")
    return partitions.partition_action(ctx, name, action, host, force=force)


@router.delete("/partitions/{name}", tags=["partitions"], responses=errors(502))
def partition_remove(user: Operator, ctx: Ctx, name: str, host: str | None = None) -> PartitionPublic:
    return partitions.remove_partition(ctx, name, host)


# ---------------------------------------------------------------------------
# Events, plugins, users
# ---------------------------------------------------------------------------


@router.get("/events", tags=["events"])
def event_list(
    user: Viewer,
    ctx: Ctx,
    limit: Annotated[int, Query(ge=1, le=10000)] = 50,
    after_id: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    object_type: str | None = None,
    object_name: str | None = None,
    level: EventLevel | None = None,
) -> list[EventPublic]:
    return events.list_events(
        ctx, limit=limit, after_id=after_id, object_type=object_type, object_name=object_name, level=level
    )


@router.get("/plugins", tags=["plugins"])
def plugin_list(user: Viewer, ctx: Ctx) -> list[PluginPublic]:
    return [PluginPublic(**r.to_dict()) for r in plugin_state.list_plugins(ctx.plugins)]


class Changed(BaseModel):
    changed: bool
    note: str = ""


_RESTART_NOTE = "takes effect when the server restarts"


@router.post("/plugins/{name}/enable", tags=["plugins"])
def plugin_enable(user: Admin, ctx: Ctx, name: str) -> Changed:
    return Changed(changed=plugin_state.set_enabled(ctx, name, True), note=_RESTART_NOTE)


@router.post("/plugins/{name}/disable", tags=["plugins"])
def plugin_disable(user: Admin, ctx: Ctx, name: str) -> Changed:
    return Changed(changed=plugin_state.set_enabled(ctx, name, False), note=_RESTART_NOTE)


class UserCreate(Body):
    name: str = rule(None, **NAME)
    password: str = rule(None, **PASSWORD)
    role: Role = Field(default=Role.VIEWER, strict=False)


class PasswordChange(Body):
    password: str = rule(None, **PASSWORD)
    current_password: str | None = None
    """Required to change your own password (an admin resetting another user's gives none)."""


@router.get("/users", tags=["users"])
def user_list(user: Admin, ctx: Ctx) -> list[UserPublic]:
    return users.list_users(ctx)


@router.post("/users", tags=["users"], status_code=201)
def user_add(user: Admin, ctx: Ctx, body: UserCreate) -> UserPublic:
    return users.create_user(ctx, name=body.name, password=body.password, role=body.role)


@router.post("/users/{name}/password", tags=["users"], responses=errors(403))
def user_password(user: Viewer, ctx: Ctx, name: str, body: PasswordChange, request: Request) -> UserPublic:
    """Users change their own password, giving the current one; admins reset anyone's."""
    return users.set_password(
        ctx,
        name=name,
        password=body.password,
        by=user.name,
        current_password=body.current_password,
        address=request.client.host if request.client else None,
    )


@router.delete("/users/{name}", tags=["users"])
def user_remove(user: Admin, ctx: Ctx, name: str) -> UserPublic:
    return users.remove_user(ctx, name)


class EnrollmentToken(BaseModel):
    token: str


@router.get("/site/enrollment-token", tags=["site"])
def enrollment_token(user: Admin, ctx: Ctx) -> EnrollmentToken:
    """The token booting machines register with (for boot services and simulators elsewhere)."""
    from qrm_core.services import site

    return EnrollmentToken(token=site.get_enrollment_token(ctx))


@router.post("/site/enrollment-token/rotate", tags=["site"])
def rotate_enrollment_token(user: Admin, ctx: Ctx) -> EnrollmentToken:
    from qrm_core.services import site

    return EnrollmentToken(token=site.rotate_enrollment_token(ctx))
