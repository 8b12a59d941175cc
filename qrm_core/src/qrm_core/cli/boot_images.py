"""``qrm boot-image``: kernels and initrds with the qrm node agent (``create`` builds one: cli/boot_build.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qrm_core.cli import boot_build
from qrm_core.cli.common import CommentOpt, OutputOpt, client, object_command, sub_app
from qrm_core.cli.output import Output, columns, message, show_list, show_one

app = sub_app("Boot images: kernel + initrd with the qrm node agent.")

COLUMNS = columns(
    "name",
    ("KERNEL", "kernel_version"),
    ("DEFAULT", "is_default"),
    ("FILES", lambda b: bool(b.kernel_path)),
    "used_by",
)


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("-n", "--name", help="name of the boot image")],
    kernel_version: Annotated[str, typer.Option("-k", "--kernel-version", help="kernel version")],
    kernel: Annotated[
        Path | None, typer.Option("--kernel", help="kernel file to store", dir_okay=False)
    ] = None,
    initrd: Annotated[
        Path | None, typer.Option("--initrd", help="initrd file to store", dir_okay=False)
    ] = None,
    cmdline: Annotated[str | None, typer.Option("--cmdline", help="default kernel arguments")] = None,
    default: Annotated[bool, typer.Option("--default", help="make it the default boot image")] = False,
    comment: CommentOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Record a boot image, storing its kernel and initrd if given."""
    result = client(ctx).boot_image_add(
        name=name,
        kernel_version=kernel_version,
        kernel=str(kernel) if kernel else None,
        initrd=str(initrd) if initrd else None,
        cmdline=cmdline,
        make_default=default,
        comment=comment,
    )
    message(
        f"added boot image {result.name} (kernel {result.kernel_version})"
        + (", the default" if result.is_default else ""),
        output,
    )
    if output is Output.json:
        show_one(result, output)


boot_build.register(app)


@app.command("list")
def list_(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """List boot images."""
    show_list(client(ctx).boot_image_list(), COLUMNS, output, "Boot images")


object_command(app, "show", "Show one boot image.", lambda c, name: c.boot_image_show(name))
object_command(
    app,
    "set-default",
    "Make a boot image the one idle machines boot.",
    lambda c, name: c.boot_image_set_default(name),
    lambda r: f"boot image {r.name} is the default",
)
object_command(
    app,
    "remove",
    "Remove a boot image no virtual environment uses.",
    lambda c, name: c.boot_image_remove(name),
    lambda r: f"removed boot image {r.name}",
)
