"""The REST API under ``/api/v1``: everything the CLI does, as thin shells over the services."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path as FilePath
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Path, Query, Request, UploadFile
from pydantic import BaseModel, Field

from qrm_core.api.deps import Admin, Ctx, Operator, Viewer
from qrm_core.client import HealthPublic, PluginPublic, ResourceDetail, ResourceListPublic
from qrm_core.errors import InvalidInput
from qrm_core.models import (
    ApiTokenCreated,
    ApiTokenPublic,
    BootImagePublic,
    EventPublic,
    FilesystemImagePublic,
    PartitionPublic,
    ResourcePublic,
    Role,
    StorageServerPublic,
    UserPublic,
    VirtualEnvironmentPublic,
)
from qrm_core.services import (
    agent,
    boot_images,
    events,
    partitions,
    plugin_state,
    resources,
    storage,
    tokens,
    users,
)
from qrm_core.services import virtual_environments as ves

router = APIRouter(prefix="/api/v1")

MAX_ID = 2**31 - 1  # ids and counters fit every database's integer column
Id = Annotated[int, Path(ge=1, le=MAX_ID)]


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


class TokenCreate(BaseModel):
    name: str = "cli"
    user: str | None = None


@router.post("/auth/tokens", tags=["auth"], status_code=201)
def create_token(user: Viewer, ctx: Ctx, body: TokenCreate) -> ApiTokenCreated:
    """Create an API token for the calling user (an admin: for any user); the token is shown only here."""
    return tokens.create_token(ctx, name=body.name, user=body.user, admin=user.role == Role.ADMIN)


@router.get("/auth/tokens", tags=["auth"])
def list_tokens(
    user: Viewer,
    ctx: Ctx,
    owner: Annotated[str | None, Query(alias="user")] = None,
    all_users: Annotated[bool, Query(alias="all")] = False,
) -> list[ApiTokenPublic]:
    """The calling user's API tokens; an admin may ask for another user's, or every user's."""
    return tokens.list_tokens(ctx, user=owner, all_users=all_users, admin=user.role == Role.ADMIN)


@router.delete("/auth/tokens/{token_id}", tags=["auth"])
def revoke_token(user: Viewer, ctx: Ctx, token_id: Id) -> ApiTokenPublic:
    """Revoke an API token: its owner or an admin may."""
    return tokens.revoke_token(ctx, token_id, admin=user.role == Role.ADMIN)


# ---------------------------------------------------------------------------
# Storage servers and filesystem images
# ---------------------------------------------------------------------------


class StorageCreate(BaseModel):
    name: str
    type: str
    address: str
    comment: str | None = None


@router.get("/storage", tags=["storage"])
def storage_list(user: Viewer, ctx: Ctx) -> list[StorageServerPublic]:
    return storage.list_storage(ctx)


@router.post("/storage", tags=["storage"], status_code=201)
def storage_add(user: Operator, ctx: Ctx, body: StorageCreate) -> StorageServerPublic:
    return storage.add_storage(
        ctx, name=body.name, type=body.type, address=body.address, comment=body.comment
    )


@router.get("/storage/{name}", tags=["storage"])
def storage_show(user: Viewer, ctx: Ctx, name: str) -> StorageServerPublic:
    return storage.show_storage(ctx, name)


@router.delete("/storage/{name}", tags=["storage"])
def storage_remove(user: Operator, ctx: Ctx, name: str) -> StorageServerPublic:
    return storage.remove_storage(ctx, name)


class FilesystemImageCreate(BaseModel):
    name: str
    storage: str
    location: str | None = None
    size_mb: int | None = None
    comment: str | None = None


@router.get("/filesystem-images", tags=["filesystem images"])
def fs_list(
    user: Viewer, ctx: Ctx, storage_name: Annotated[str | None, Query(alias="storage")] = None
) -> list[FilesystemImagePublic]:
    return storage.list_filesystem_images(ctx, storage=storage_name)


@router.post("/filesystem-images", tags=["filesystem images"], status_code=201)
def fs_add(user: Operator, ctx: Ctx, body: FilesystemImageCreate) -> FilesystemImagePublic:
    return storage.add_filesystem_image(
        ctx,
        name=body.name,
        storage=body.storage,
        location=body.location,
        size_mb=body.size_mb,
        comment=body.comment,
    )


@router.get("/filesystem-images/{name}", tags=["filesystem images"])
def fs_show(user: Viewer, ctx: Ctx, name: str) -> FilesystemImagePublic:
    return storage.show_filesystem_image(ctx, name)


@router.delete("/filesystem-images/{name}", tags=["filesystem images"])
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
    name: Annotated[str, Form()],
    kernel_version: Annotated[str, Form()],
    cmdline: Annotated[str | None, Form()] = None,
    make_default: Annotated[bool, Form()] = False,
    comment: Annotated[str | None, Form()] = None,
    kernel: Annotated[UploadFile | None, File()] = None,
    initrd: Annotated[UploadFile | None, File()] = None,
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
            make_default=make_default,
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


class VECreate(BaseModel):
    name: str
    boot_image: str
    fs_image: str
    deployment: str = "single"
    pool_size: int | None = None
    hypervisor: str | None = None
    kind: str | None = None
    cpus: int | None = None
    memory_mb: int | None = None
    failover: bool = False
    kernel_args: str | None = None
    comment: str | None = None


class VEResize(BaseModel):
    pool_size: int = Field(ge=1, le=10000)


@router.get("/ves", tags=["virtual environments"])
def ve_list(user: Viewer, ctx: Ctx, state: str | None = None) -> list[VirtualEnvironmentPublic]:
    return ves.list_ves(ctx, state=state)


@router.post("/ves", tags=["virtual environments"], status_code=201)
def ve_create(user: Operator, ctx: Ctx, body: VECreate) -> VirtualEnvironmentPublic:
    return ves.create_ve(ctx, **body.model_dump())


@router.get("/ves/{name}", tags=["virtual environments"])
def ve_show(user: Viewer, ctx: Ctx, name: str) -> VirtualEnvironmentPublic:
    return ves.show_ve(ctx, name)


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


@router.patch("/ves/{name}", tags=["virtual environments"])
def ve_resize(
    user: Operator, ctx: Ctx, request: Request, name: str, body: VEResize
) -> VirtualEnvironmentPublic:
    result = ves.resize_ve(ctx, name, body.pool_size)
    _wake(request)
    return result


# ---------------------------------------------------------------------------
# Resources and partitions
# ---------------------------------------------------------------------------


class ResourceCreate(BaseModel):
    mac: str
    ip: str | None = None
    hostname: str | None = None
    kind: str = "physical"
    host: str | None = None
    hypervisor: str | None = None
    cpus: int = 0
    memory_mb: int = 0
    comment: str | None = None


@router.get("/resources", tags=["resources"])
def resource_list(
    user: Viewer,
    ctx: Ctx,
    state: str | None = None,
    kind: str | None = None,
    ve: str | None = None,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int | None, Query(ge=1, le=100000)] = None,
) -> ResourceListPublic:
    page = resources.list_resources(ctx, state=state, kind=kind, ve=ve, offset=offset, limit=limit)
    return ResourceListPublic(items=page.items, total=page.total, offset=page.offset, limit=page.limit)


@router.post("/resources", tags=["resources"], status_code=201)
def resource_add(user: Operator, ctx: Ctx, body: ResourceCreate) -> ResourcePublic:
    return resources.add_resource(ctx, **body.model_dump())


@router.get("/resources/{ref}", tags=["resources"])
def resource_show(user: Viewer, ctx: Ctx, ref: str) -> ResourceDetail:
    resource = resources.show_resource(ctx, ref)
    health = ctx.hooks.collect_health(resource, ctx.hook_ctx)
    return ResourceDetail(
        **resource.model_dump(),
        health=[HealthPublic(source=h.source, status=h.status, message=h.message) for h in health],
    )


@router.delete("/resources/{ref}", tags=["resources"])
def resource_remove(user: Operator, ctx: Ctx, ref: str) -> ResourcePublic:
    return resources.remove_resource(ctx, ref)


@router.post("/resources/{ref}/reboot", tags=["resources"])
def resource_reboot(user: Operator, ctx: Ctx, ref: str) -> ResourcePublic:
    agent.order_reboot(ctx, ref)
    return resources.show_resource(ctx, ref)


@router.post("/resources/{ref}/halt", tags=["resources"])
def resource_halt(user: Operator, ctx: Ctx, ref: str) -> ResourcePublic:
    agent.order_halt(ctx, ref)
    return resources.show_resource(ctx, ref)


@router.get("/partitions", tags=["partitions"])
def partition_list(user: Viewer, ctx: Ctx) -> list[PartitionPublic]:
    return partitions.list_partitions(ctx)


@router.delete("/partitions/{name}", tags=["partitions"])
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
    level: str | None = None,
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


class UserCreate(BaseModel):
    name: str
    password: str
    role: str = "viewer"


class PasswordChange(BaseModel):
    password: str


@router.get("/users", tags=["users"])
def user_list(user: Admin, ctx: Ctx) -> list[UserPublic]:
    return users.list_users(ctx)


@router.post("/users", tags=["users"], status_code=201)
def user_add(user: Admin, ctx: Ctx, body: UserCreate) -> UserPublic:
    return users.create_user(ctx, name=body.name, password=body.password, role=body.role)


@router.post("/users/{name}/password", tags=["users"])
def user_password(user: Viewer, ctx: Ctx, name: str, body: PasswordChange) -> UserPublic:
    """Users change their own password; admins anyone's."""
    if name != user.name and user.role != "admin":
        from qrm_core.errors import Forbidden

        raise Forbidden("only an admin may change another user's password")
    return users.set_password(ctx, name=name, password=body.password)


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
