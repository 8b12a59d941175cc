"""``qrm boot-image create``: build a boot image from a kernel, with a progress display.

The article's ``qrm-boot-image create -n NAME -k KERNEL_VERSION`` in qrm's
shape. Wired into the ``boot-image`` group by :func:`register`::

    qrm boot-image create -n idle -k 6.1.0-56-amd64 --download --default
    qrm boot-image create -n idle -k 6.1.0-56-amd64 --kernel-deb linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb
    qrm boot-image create -n idle -k "$(uname -r)"          # from /boot

It builds on the machine where it runs (the kernel source and the data
directory are local), through the services.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qrm_core.cli.common import CommentOpt, OutputOpt, state
from qrm_core.cli.output import Output, message, show_one
from qrm_core.errors import InvalidInput


def register(boot_app: typer.Typer) -> None:
    """Add ``create`` to the ``qrm boot-image`` command group."""
    boot_app.command("create")(create)


def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("-n", "--name", help="name of the boot image")],
    kernel_version: Annotated[
        str, typer.Option("-k", "--kernel-version", help="kernel release, e.g. 6.1.0-56-amd64")
    ],
    kernel_deb: Annotated[
        Path | None,
        typer.Option("--kernel-deb", help="take the kernel from this Debian package file", dir_okay=False),
    ] = None,
    download: Annotated[
        bool, typer.Option("--download", help="apt-get download linux-image-KERNEL_VERSION (cached)")
    ] = False,
    default: Annotated[bool, typer.Option("--default", help="make it the default boot image")] = False,
    module: Annotated[
        list[str] | None, typer.Option("--module", "-m", help="another kernel module to include (repeat)")
    ] = None,
    cmdline: Annotated[
        str | None, typer.Option("--cmdline", help="kernel arguments (default: serial and VGA console)")
    ] = None,
    comment: CommentOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Build a boot image (kernel + initrd with busybox, drivers and the qrm node agent)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from qrm_core.services import boot_build, service_context

    cli = state(ctx)
    if cli.remote:
        raise InvalidInput(
            "boot-image create builds on the machine that keeps qrm's data; run it there "
            "(or build elsewhere and upload with 'qrm --server ... boot-image add --kernel F --initrd F')"
        )
    settings = cli.settings
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}", style="bold"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(f"boot image {name}", total=1000)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        with service_context(settings) as service:
            result = boot_build.create_boot_image(
                service,
                name=name,
                kernel_version=kernel_version,
                kernel_deb=kernel_deb,
                download=download,
                make_default=default,
                progress=progress,
                cmdline=cmdline,
                extra_modules=module or [],
                comment=comment,
            )
    message(
        f"built boot image {result.name} (kernel {result.kernel_version}, "
        f"initrd sha256 {(result.initrd_sha256 or '')[:16]})"
        + (", the default" if result.is_default else ""),
        output,
    )
    if output is Output.json:
        show_one(result, output)
