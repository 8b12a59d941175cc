"""``qrm ramdisk``: make filesystem images from a directory or a tarball, and list volumes.

    qrm storage add -n ram -t ramdisk -i 10.0.0.1
    qrm ramdisk import web --storage ram --from /srv/roots/web       # a directory
    qrm ramdisk import web --storage ram --from web-root.tar.xz      # or a tar archive
    qrm ve create -n web -b default -f web

Runs on the machine of ``qrm server`` (the archives live in its data directory).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

import typer

from qrm_core.plugin_api import (
    AlreadyExists,
    InvalidInput,
    Output,
    get_settings,
    message,
    show_list,
    show_one,
)

app = typer.Typer(help="Ramdisk storage: root filesystem archives unpacked into RAM.", no_args_is_help=True)

OutputOpt = Annotated[
    Output, typer.Option("--output", "-o", help="table for people, json for programs", case_sensitive=False)
]


def _driver_and_target(ctx: Any, storage_name: str) -> tuple[Any, Any]:
    from qrm_core.plugin_api import StorageTarget, show_storage
    from qrm_ramdisk.driver import RamdiskStorage

    shown = show_storage(ctx, storage_name)
    if shown.type != RamdiskStorage.name:
        raise InvalidInput(f"storage server {storage_name} is of type {shown.type}, not ramdisk")
    driver = ctx.plugins.storage_driver(shown.type)
    target = StorageTarget(name=shown.name, type=shown.type, address=shown.address, comment=shown.comment)
    return driver, target


@app.command("import")
def import_cmd(
    name: Annotated[str, typer.Argument(help="name of the new filesystem image (and volume)")],
    storage: Annotated[str, typer.Option("--storage", "-s", help="the ramdisk storage server")],
    source: Annotated[
        Path, typer.Option("--from", help="a directory, or a tar archive (.tar, .tar.gz, .tar.xz, ...)")
    ],
    size: Annotated[
        int | None, typer.Option("--size", help="size of the RAM filesystem it is unpacked into, in MB")
    ] = None,
    comment: Annotated[str | None, typer.Option("-c", "--comment")] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Make a filesystem image from a directory or a tarball (a deterministic .tar.gz)."""
    from qrm_core.plugin_api import add_filesystem_image, list_filesystem_images, service_context
    from qrm_core.plugin_api import validation as v

    name = v.name(name, "filesystem image name")
    comment = v.comment(comment)
    if not source.exists():
        raise InvalidInput(f"{source} does not exist")
    with service_context(get_settings()) as ctx:
        driver, target = _driver_and_target(ctx, storage)
        if any(image.name == name for image in list_filesystem_images(ctx)):
            raise AlreadyExists(f"filesystem image {name!r} already exists")
        ctx.commit()  # the read ends: no transaction stays open while the archive is built
        driver.import_volume(target, name, source, size)
        try:
            result = add_filesystem_image(ctx, name=name, storage=storage, location=name, comment=comment)
        except Exception:
            ctx.rollback()  # nor while the volume goes again
            driver.remove_volume(target, name)
            raise
        archive = driver.volumes(target).archive(name)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    message(
        f"imported {source} as filesystem image {name} on {storage} "
        f"({archive.stat().st_size // 1024} KiB, sha256 {digest[:16]})",
        output,
    )
    if output is Output.json:
        show_one(result, output)


@app.command("list")
def list_cmd(
    storage: Annotated[str | None, typer.Option("--storage", "-s", help="only this storage server")] = None,
    output: OutputOpt = Output.table,
) -> None:
    """List the volumes of ramdisk storage servers and whom they are exported to."""
    from qrm_core.plugin_api import list_filesystem_images, list_storage, service_context

    rows: list[dict[str, Any]] = []
    with service_context(get_settings()) as ctx:
        servers = [s for s in list_storage(ctx) if s.type == "ramdisk"]
        if storage is not None:
            servers = [s for s in servers if s.name == storage]
            if not servers:
                raise InvalidInput(f"there is no ramdisk storage server {storage!r}")
        images = {(i.storage, i.location): i.name for i in list_filesystem_images(ctx)}
        targets = [(server, *_driver_and_target(ctx, server.name)) for server in servers]
        ctx.commit()  # the read ends: no driver call inside a transaction
        for server, driver, target in targets:
            for volume in driver.list_volumes(target):
                rows.append(
                    {
                        "storage": server.name,
                        "volume": volume.location,
                        "size_mb": volume.size_mb,
                        "exported_to": list(volume.exported_to),
                        "filesystem_image": images.get((server.name, volume.location)),
                    }
                )
    show_list(
        rows,
        [
            ("STORAGE", lambda r: r["storage"]),
            ("VOLUME", lambda r: r["volume"]),
            ("SIZE MB", lambda r: r["size_mb"]),
            ("EXPORTED TO", lambda r: r["exported_to"]),
            ("IMAGE", lambda r: r["filesystem_image"]),
        ],
        output,
        "Ramdisk volumes",
    )
