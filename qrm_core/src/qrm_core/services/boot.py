"""What a machine should boot now: the boot configuration per MAC.

This is the single source for every boot service (the TFTP/iPXE plugin, the
legacy pxelinux files, the server's ``/agent/v1/boot/{mac}`` endpoint):

* a machine that is unknown, idle, new, off or in error boots the **default
  boot image** (``mode = "idle"``): its agent registers and heartbeats;
* a machine assigned to a virtual environment (``assigned``, ``booting``,
  ``active``) that should run boots **the VE's boot image** with the root filesystem its
  storage driver describes, the VE's kernel arguments and whatever plugins add
  through :func:`~qrm_core.hookspecs.qrm_boot_kernel_args` (``mode = "ve"``);
* with no default boot image there is nothing to boot (``mode = "none"``).

Every boot carries ``qrm.gen=N``, the resource's boot generation: the server
bumps it whenever it commands a reboot, so heartbeats from the OS that was
running before (a lower generation) are recognised and ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel
from sqlmodel import select

from qrm_core.errors import Conflict, InvalidInput, PluginError
from qrm_core.models import (
    BootImage,
    Deployment,
    FilesystemImage,
    Resource,
    ResourceState,
    StorageServer,
    VEDesiredState,
    VirtualEnvironment,
)
from qrm_core.services import ServiceContext, local_fill, public
from qrm_core.services import validation as v
from qrm_core.services.boot_images import default_boot_image_row
from qrm_core.services.storage import driver_for, export_client, target

VE_BOOT_STATES = frozenset(
    {ResourceState.ASSIGNED.value, ResourceState.BOOTING.value, ResourceState.ACTIVE.value}
)


class BootConfig(BaseModel):
    """The boot of one machine, as every boot service renders it."""

    mac: str
    mode: Literal["idle", "ve", "none"]
    resource_id: int | None = None
    boot_generation: int = 0
    boot_image: str | None = None
    kernel_version: str | None = None
    #: Files on the server (absent for a boot image recorded without files).
    kernel_path: str | None = None
    initrd_path: str | None = None
    #: Relative names under which boot services publish the files (HTTP and TFTP).
    kernel_name: str | None = None
    initrd_name: str | None = None
    #: Full URLs on the qrm server (HTTP), when a server URL is known.
    kernel_url: str | None = None
    initrd_url: str | None = None
    cmdline: str = ""
    ve: str | None = None
    root: str | None = None
    message: str = ""


def boot_file_names(image: BootImage) -> tuple[str, str]:
    """Where a boot image's files are published: ``boot/<image>/vmlinuz`` and ``.../initrd``."""
    return f"boot/{image.name}/vmlinuz", f"boot/{image.name}/initrd"


def boot_config(
    ctx: ServiceContext,
    mac: str,
    *,
    server_url: str | None = None,
    enrollment_token: str | None = None,
) -> BootConfig:
    """The boot configuration for the machine with this MAC, right now."""
    mac = v.mac(mac)
    resource = ctx.session.exec(select(Resource).where(Resource.mac == mac)).first()
    ve: VirtualEnvironment | None = None
    if resource is not None and resource.ve_id is not None and resource.state in VE_BOOT_STATES:
        ve = ctx.session.get(VirtualEnvironment, resource.ve_id)
        if ve is not None and ve.desired_state != VEDesiredState.RUNNING.value:
            ve = None  # its VE is stopping: boot idle, and be released on registration
    image = ctx.session.get(BootImage, ve.boot_image_id) if ve is not None else default_boot_image_row(ctx)
    generation = resource.boot_generation if resource is not None else 0
    if ve is not None and ve.reset_phase == "reverting":
        # Its image is being reverted (services.images.reset_ve): nothing mounts it
        # meanwhile. The machines that were the VE's wait in their initrd; this one
        # (placed meanwhile, or with a boot image whose agent does not hold) asks again.
        return BootConfig(
            mac=mac,
            mode="none",
            resource_id=resource.id if resource else None,
            boot_generation=generation,
            ve=ve.name,
            message=f"virtual environment {ve.name} is resetting: reverting its image",
        )
    if image is None:
        return BootConfig(
            mac=mac,
            mode="none",
            resource_id=resource.id if resource else None,
            boot_generation=generation,
            message="no default boot image: add one with 'qrm boot-image add ... --default'",
        )
    kernel_name, initrd_name = boot_file_names(image)
    base = server_url.rstrip("/") if server_url else None
    args: list[str] = list(v.kernel_args(image.cmdline))
    if base:
        args.append(f"qrm.server={base}")
    args += [f"qrm.mac={mac}", f"qrm.gen={generation}"]
    if enrollment_token:
        args.append(f"qrm.enroll={enrollment_token}")
    root_description = None
    if ve is None:
        args.append("qrm.mode=idle")
    else:
        fs = ctx.session.get(FilesystemImage, ve.fs_image_id)
        assert fs is not None
        storage = ctx.session.get(StorageServer, fs.storage_id)
        assert storage is not None
        root = driver_for(ctx, storage).describe_root(
            target(storage),
            fs.location,
            export_client(resource) if resource is not None else None,
            shared=ve.deployment == Deployment.SHARED.value,
        )
        root_description = root.description
        args += ["qrm.mode=ve", f"qrm.ve={ve.name}"]
        args += v.kernel_args(list(root.kernel_args), f"root arguments of storage type {storage.type}")
        args += v.kernel_args(ve.kernel_args)
        if local_fill.is_local_fill(fs):
            # The one machine placed into a VE whose image is still to be filled from a
            # local disk: its agent fills it first (services.local_fill).
            args += local_fill.fill_kernel_args(fs)
            root_description = f"{root_description}, filled first from the local disk"
    assert resource is not None or ve is None
    resource_public = public.one_resource(ctx.session, resource) if resource is not None else None
    if resource_public is not None:
        plugin_args = ctx.hooks.boot_kernel_args(
            resource_public,
            public.one_ve(ctx.session, ve) if ve is not None else None,
            public.boot_images(ctx.session, [image])[0],
            ctx.hook_ctx,
        )
        try:
            args += v.kernel_args(plugin_args, "kernel arguments from plugins")
        except InvalidInput as exc:  # bad arguments from a plugin are the plugin's fault
            raise PluginError(str(exc)) from None
    return BootConfig(
        mac=mac,
        mode="ve" if ve is not None else "idle",
        resource_id=resource.id if resource else None,
        boot_generation=generation,
        boot_image=image.name,
        kernel_version=image.kernel_version,
        kernel_path=image.kernel_path,
        initrd_path=image.initrd_path,
        kernel_name=kernel_name,
        initrd_name=initrd_name,
        kernel_url=f"{base}/{kernel_name}" if base else None,
        initrd_url=f"{base}/{initrd_name}" if base else None,
        cmdline=" ".join(args),
        ve=ve.name if ve else None,
        root=root_description,
    )


def root_secrets(
    ctx: ServiceContext, *, resource_id: int, token: str | None, boot_generation: int
) -> dict[str, str]:
    """The credentials the agent of a booting machine needs to mount its VE's root
    (``RootSpec.secrets``: CHAP user and secret), handed over its authenticated channel.

    Only to the machine itself (its per-resource token), only for the boot qrm
    ordered (its current boot generation), and only while it is assigned to a VE
    that should run. The secrets are never recorded: the event says who fetched
    the credentials of which image, not what they are.
    """
    from qrm_core.services.agent import authenticate_resource

    row = authenticate_resource(ctx, resource_id, token)
    label = public.resource_label(row)
    if boot_generation != row.boot_generation:
        raise Conflict(
            f"resource {label} is not in boot {boot_generation} (qrm ordered boot {row.boot_generation})"
        )
    ve = ctx.session.get(VirtualEnvironment, row.ve_id) if row.ve_id is not None else None
    if ve is None or row.state not in VE_BOOT_STATES or ve.desired_state != VEDesiredState.RUNNING.value:
        raise Conflict(f"resource {label} is not booting a virtual environment")
    fs = ctx.session.get(FilesystemImage, ve.fs_image_id)
    assert fs is not None
    storage = ctx.session.get(StorageServer, fs.storage_id)
    assert storage is not None
    driver = driver_for(ctx, storage)
    where, location, client = target(storage), fs.location, export_client(row)
    shared = ve.deployment == Deployment.SHARED.value
    ctx.record("ve", ve.name, f"{label} fetched the credentials of filesystem image {fs.name}")
    ctx.commit()  # no transaction stays open across the driver call
    root = driver.describe_root(where, location, client, shared=shared)
    return {str(k): str(v) for k, v in root.secrets.items()}


def boot_image_files(ctx: ServiceContext, name: str) -> tuple[str | None, str | None]:
    """The kernel and initrd paths of a boot image, for serving ``boot/<name>/...``."""
    image = ctx.session.exec(select(BootImage).where(BootImage.name == name)).first()
    if image is None:
        return None, None
    return image.kernel_path, image.initrd_path
