"""Auto images filled from the booting machine's own local disk (``--fill-from local-disk``).

The openQRM article's way: "you create a yet non existing image which has already an
NFS export ready, when you initially boot that server ... the image will automatically
be created". The image's volume is made at once and stays empty (state ``creating``).
When a VE that uses it is asked to run:

* placement gives exactly one machine to it, for the first VE (by id) that asks; every
  other VE on the image, and the rest of that VE's pool, waits until the image is ready
  (:func:`fill_plan`);
* the machine's boot carries ``qrm.fill=local-disk[:/dev/DEVICE] qrm.fill_mb=SIZE``
  (:func:`fill_kernel_args`) besides its VE's root; being the only machine, the volume
  is exported read-write to it alone;
* its agent mounts the network root read-write, its local partition read-only, copies
  everything over and reports progress (state ``filling`` with ``fill_bytes`` and
  ``fill_total``), then done (``fill_result: done``) or failed with the reason
  (:func:`fill_heartbeat`);
* done: the image is ``ready``, its source says which disk of which machine; the agent
  unmounts the volume, mounts the root as its VE's boot says and switches into it (no
  reboot), so the VE goes active. Failed: the image is in ``error`` with the reason and
  the machine is released (it reboots into the idle image).
"""

from __future__ import annotations

import re
from typing import Literal

from sqlmodel import col, select

from qrm_core.errors import InvalidInput
from qrm_core.models import (
    EventLevel,
    FilesystemImage,
    ImageOrigin,
    ImageState,
    Resource,
    ResourceState,
    VEDesiredState,
    VirtualEnvironment,
    utcnow,
)
from qrm_core.services import ServiceContext, public
from qrm_core.services import validation as v

S = ResourceState

LOCAL_DISK = "local-disk"
#: A device path under /dev: path parts of letters, digits and ``_ . : + -`` that begin with
#: a letter, digit or ``_`` (so never ``.`` or ``..``): /dev/sdb1, /dev/disk/by-label/root.
DEVICE = re.compile(r"^/dev/(?:[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,63}/){0,4}[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,63}$")
#: What a local-disk image's progress says until its machine reports.
WAITING_FOR_MACHINE = "waiting for a machine to boot and fill it from its local disk"


def parse_source(source: str) -> str | None:
    """``local-disk`` -> ``local-disk``; ``local-disk:/dev/X`` -> ``local-disk /dev/X`` (as
    recorded in the image's ``source``); None when ``source`` is not a local disk at all.
    A malformed device is refused in one line."""
    if source != LOCAL_DISK and not source.startswith(LOCAL_DISK + ":"):
        return None
    device = source[len(LOCAL_DISK) + 1 :]
    if source == LOCAL_DISK:
        return LOCAL_DISK
    if not DEVICE.match(device):
        raise InvalidInput(
            f"{v.one_line(source)[:120]!r}: name the partition as local-disk:/dev/NAME "
            "(parts of letters, digits, _ . : + -; no . or .. parts)"
        )
    return f"{LOCAL_DISK} {device}"


def is_local_fill(image: FilesystemImage) -> bool:
    """An auto image still waiting to be filled from a machine's local disk."""
    return (
        image.origin == ImageOrigin.AUTO.value
        and image.state == ImageState.CREATING.value
        and (image.source or "").split(" ", 1)[0] == LOCAL_DISK
    )


def fill_kernel_args(image: FilesystemImage) -> list[str]:
    """What tells a booting machine's agent to fill its VE's image from its local disk."""
    device = (image.source or "").partition(" ")[2]
    wanted = f"{LOCAL_DISK}:{device}" if device else LOCAL_DISK
    return [f"qrm.fill={wanted}", f"qrm.fill_mb={image.size_mb or 0}"]


def fill_plan(
    ctx: ServiceContext, wanting: list[VirtualEnvironment], images: list[FilesystemImage]
) -> tuple[dict[int, str], dict[int, int]]:
    """For placement: of the VEs asked to run, which wait for a local-disk image being
    filled (VE id -> its problem) and which may get its one filling machine (VE id -> 1).

    One machine per image, ever, while it is being filled: a machine bound to any VE on
    the image (whatever its state) is its filler; with none, the first VE (by id) that
    asks gets one. Partitioned VEs wait (their machines are made by the partition step)."""
    problems: dict[int, str] = {}
    caps: dict[int, int] = {}
    local = {img.id: img for img in images if img.id is not None and is_local_fill(img)}
    if not local:
        return problems, caps
    bound: dict[int, int] = dict.fromkeys(local, 0)
    for fid, _rid in ctx.session.exec(
        select(VirtualEnvironment.fs_image_id, Resource.id)
        .join(Resource, col(Resource.ve_id) == col(VirtualEnvironment.id))
        .where(col(VirtualEnvironment.fs_image_id).in_(list(local)))
    ):
        bound[fid] += 1
    chosen: dict[int, int] = {}  # image id -> VE id that gets the filler
    for ve in wanting:
        img = local.get(ve.fs_image_id)
        if img is None or ve.id is None:
            continue
        if bound[ve.fs_image_id] == 0 and ve.fs_image_id not in chosen and ve.deployment != "partitioned":
            chosen[ve.fs_image_id] = ve.id
            caps[ve.id] = 1
            continue
        problems[ve.id] = f"creating its filesystem image {img.name}: {img.progress or WAITING_FOR_MACHINE}"
    return problems, caps


def _sanitised_device(device: str | None) -> str:
    return device if device and DEVICE.match(device) else "a local disk"


def fill_heartbeat(
    ctx: ServiceContext,
    row: Resource,
    state: str,
    *,
    fill_bytes: int | None,
    fill_total: int | None,
    fill_device: str | None,
    fill_result: str | None,
    reason: str | None,
) -> Literal["none", "reboot"]:
    """A heartbeat of a machine filling its VE's image from its local disk (state
    ``filling``, or ``failed`` with ``fill_result: failed``), in the caller's transaction."""
    from qrm_core.services.agent import _order_reboot, release
    from qrm_core.services.resources import transition

    ve = ctx.session.get(VirtualEnvironment, row.ve_id) if row.ve_id is not None else None
    if ve is None or ve.desired_state != VEDesiredState.RUNNING.value:
        if ve is not None:
            release(ctx, row, "its virtual environment is stopping", reboot=True)
        else:
            if row.state not in (S.IDLE.value, S.ERROR.value):
                transition(ctx, row, S.IDLE, "fills an image for a virtual environment it does not serve")
            _order_reboot(ctx, row, "fills an image for a virtual environment it does not serve")
        return "reboot"
    image = ctx.session.get(FilesystemImage, ve.fs_image_id)
    label = public.resource_label(row)
    if image is None or not is_local_fill(image):
        # Filled already (a "done" said again), or not this machine's job: nothing to record.
        if fill_result == "failed" and row.state != S.ERROR.value:
            transition(ctx, row, S.ERROR, f"its agent reports failure: {reason or 'no reason given'}")
        return "none"
    if row.state == S.ASSIGNED.value:
        transition(ctx, row, S.BOOTING, f"booting virtual environment {ve.name}")
    device = _sanitised_device(fill_device)
    done, total = max(fill_bytes or 0, 0), max(fill_total or 0, 0)
    if fill_result == "failed":
        why = reason or "no reason given"
        image.state = ImageState.ERROR.value
        image.progress = f"filling failed: {why}"[:255]
        ctx.session.add(image)
        ctx.record(
            "filesystem-image",
            image.name,
            f"filesystem image {image.name}: filling from the local disk of {label} failed: {why}",
            EventLevel.ERROR,
        )
        why_released = f"could not fill filesystem image {image.name} from its local disk: {why}"
        release(ctx, row, why_released[:255], reboot=True)
        return "reboot"
    if fill_result == "done":
        image.state = ImageState.READY.value
        image.progress = ""
        image.source = f"{LOCAL_DISK} {device} of {label}"[:255]
        image.source_at = utcnow()
        ctx.session.add(image)
        ctx.record(
            "filesystem-image",
            image.name,
            f"filesystem image {image.name} filled from the local disk {device} of {label} ({done / 1e6:.1f} MB)",
        )
        return "none"
    if not image.progress.startswith("filling from"):
        ctx.record(
            "filesystem-image",
            image.name,
            f"filesystem image {image.name}: filling from the local disk {device} of {label} started",
        )
    percent = min(99, done * 100 // total) if total else 0
    image.progress = (
        f"filling from the local disk {device} of {label}: {percent}% ({done / 1e6:.1f} of {total / 1e6:.1f} MB)"
    )[:255]
    ctx.session.add(image)
    return "none"
