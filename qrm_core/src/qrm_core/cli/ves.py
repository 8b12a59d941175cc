"""``qrm ve``: virtual environments, started onto idle resources and stopped back."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer

from qrm_core.cli.common import (
    CommentOpt,
    OutputOpt,
    TimeoutOpt,
    WaitOpt,
    client,
    done,
    object_command,
    sub_app,
)
from qrm_core.cli.output import Output, columns, show_list, show_one
from qrm_core.client import Client
from qrm_core.errors import Conflict, InvalidInput

app = sub_app("Virtual environments: boot image + filesystem image + requirements.")

MonitorOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--monitor", help="a check monitoring plugins run on every member, e.g. http:80 (repeatable)"
    ),
]
HEALTH_COLUMNS = columns("resource", "source", "status", "message")

COLUMNS = columns(
    "name",
    "deployment",
    "boot_image",
    ("FILESYSTEM", "filesystem_image"),
    ("DESIRED", "desired_state"),
    "state",
    ("POOL", "pool_size"),
    "resources",
    "problem",
)


@app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("-n", "--name", help="name of the virtual environment")],
    boot_image: Annotated[str, typer.Option("-b", "--boot-image", help="boot image to boot")],
    fs_image: Annotated[str, typer.Option("-f", "--fs-image", help="filesystem image to boot")],
    deployment: Annotated[
        str, typer.Option("--deployment", "-d", help="single, shared or partitioned")
    ] = "single",
    pool_size: Annotated[
        int | None, typer.Option("--pool-size", help="resources in a shared pool (default 2)")
    ] = None,
    hypervisor: Annotated[
        str | None, typer.Option("--hypervisor", help="run on partitions (VMs) of this hypervisor")
    ] = None,
    kind: Annotated[
        str | None, typer.Option("--kind", help="only physical or only virtual resources")
    ] = None,
    cpus: Annotated[
        int | None, typer.Option("--cpus", help="minimum CPUs (partition size if partitioned)")
    ] = None,
    memory: Annotated[
        int | None, typer.Option("--memory", help="minimum memory in MB (partition size if partitioned)")
    ] = None,
    failover: Annotated[
        bool, typer.Option("--failover", help="replace a failed resource with another idle one")
    ] = False,
    kernel_args: Annotated[str | None, typer.Option("--kernel-args", help="extra kernel arguments")] = None,
    comment: CommentOpt = None,
    monitor: MonitorOpt = None,
    monitor_failover: Annotated[
        bool,
        typer.Option(
            "--monitor-failover", help="a member monitoring holds down counts as failed (needs --failover)"
        ),
    ] = False,
    pristine: Annotated[
        bool,
        typer.Option(
            "--pristine",
            help="keep a snapshot of the filesystem image as it is at the first start, for 've reset'",
        ),
    ] = False,
    output: OutputOpt = Output.table,
) -> None:
    """Define a virtual environment (it is created stopped)."""
    result = client(ctx).ve_create(
        name=name,
        boot_image=boot_image,
        fs_image=fs_image,
        deployment=deployment,
        pool_size=pool_size,
        hypervisor=hypervisor,
        kind=kind,
        cpus=cpus,
        memory_mb=memory,
        failover=failover,
        kernel_args=kernel_args,
        comment=comment,
        monitor=monitor or [],
        monitor_failover=monitor_failover,
        pristine=pristine,
    )
    done(
        result,
        f"created virtual environment {result.name} ({result.deployment}"
        + (", kept pristine" if result.pristine else "")
        + ")",
        output,
    )


@app.command("list")
def list_(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option("--state", help="only VEs in this state")] = None,
    output: OutputOpt = Output.table,
) -> None:
    """List virtual environments."""
    show_list(client(ctx).ve_list(state), COLUMNS, output, "Virtual environments")


@app.command("show")
def show(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
    """Show one virtual environment, with why it cannot be placed if so, and its members' health."""
    result = client(ctx).ve_show(name)
    show_one(result, output)
    if output is Output.table and result.health:
        show_list(result.health, HEALTH_COLUMNS, output, "Health")


@app.command("set")
def set_(
    ctx: typer.Context,
    name: str,
    monitor: Annotated[
        list[str] | None,
        typer.Option("--monitor", help="replace the monitor checks with these (repeatable), e.g. http:80"),
    ] = None,
    no_monitor: Annotated[bool, typer.Option("--no-monitor", help="remove every monitor check")] = False,
    monitor_failover: Annotated[
        bool | None,
        typer.Option(
            "--monitor-failover/--no-monitor-failover",
            help="whether a member monitoring holds down counts as failed",
        ),
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Change what a virtual environment asks of monitoring."""
    if no_monitor and monitor:
        raise InvalidInput("give --monitor or --no-monitor, not both")
    checks = [] if no_monitor else monitor
    if checks is None and monitor_failover is None:
        raise InvalidInput("nothing to change: give --monitor, --no-monitor or --[no-]monitor-failover")
    result = client(ctx).ve_set(name, checks, monitor_failover)
    done(
        result,
        f"virtual environment {result.name}: monitor {' '.join(result.monitor) or 'none'}, "
        f"failover on monitoring {'on' if result.monitor_failover else 'off'}",
        output,
    )


object_command(
    app,
    "remove",
    "Remove a stopped virtual environment.",
    lambda c, name: c.ve_remove(name),
    lambda r: f"removed virtual environment {r.name}",
)


def _start_or_stop(goal: str) -> Callable[..., None]:
    """``ve start`` (goal ``running``) and ``ve stop`` (goal ``stopped``)."""

    def command(
        ctx: typer.Context,
        name: str,
        wait: WaitOpt = False,
        timeout: TimeoutOpt = 600.0,
        output: OutputOpt = Output.table,
    ) -> None:
        source = client(ctx)
        result = source.ve_start(name) if goal == "running" else source.ve_stop(name)
        if wait:
            result = wait_for_ve(source, name, goal, timeout, output)
        done(result, f"virtual environment {result.name} is {result.state}", output)

    return command


app.command("start", help="Start a virtual environment: idle resources are chosen and rebooted into it.")(
    _start_or_stop("running")
)
app.command("stop", help="Stop a virtual environment: its resources reboot into the idle image.")(
    _start_or_stop("stopped")
)


@app.command("reset")
def reset(
    ctx: typer.Context,
    name: str,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 600.0,
    output: OutputOpt = Output.table,
) -> None:
    """Give a pristine VE back what it started with: its machines reboot and wait while its
    filesystem image is reverted to the snapshot of its first start, then boot on into it
    (one boot; a stopped VE stays stopped, reverted)."""
    source = client(ctx)

    def progress(line: str) -> None:
        if output is Output.table:
            sys.stderr.write(line + "\n")

    result = source.ve_reset(name, progress)
    if wait and result.desired_state == "running":
        result = wait_for_ve(source, name, "running", timeout, output)
    done(result, f"virtual environment {result.name} reset ({result.state})", output)


@app.command("resize")
def resize(
    ctx: typer.Context,
    name: str,
    pool_size: Annotated[int, typer.Option("--pool-size", help="new number of resources")],
    output: OutputOpt = Output.table,
) -> None:
    """Change the pool size of a shared virtual environment."""
    result = client(ctx).ve_resize(name, pool_size)
    done(result, f"virtual environment {result.name} now wants {result.pool_size} resources", output)


def wait_for_ve(client: Client, name: str, goal: str, timeout: float, output: Output) -> Any:
    """Poll a VE until it reaches ``goal``, with a progress line for people."""
    from rich.console import Console

    deadline = time.monotonic() + timeout
    console = Console(stderr=True)
    status = console.status(f"{name}: waiting") if output is Output.table and console.is_terminal else None
    if status is not None:
        status.start()
    last = ""
    try:
        while True:
            ve = client.ve_show(name)
            line = f"{name}: {ve.state}, {len(ve.resources)}/{ve.pool_size} resources" + (
                f" - {ve.problem}" if ve.problem else ""
            )
            if status is not None:
                status.update(line)
            elif line != last and output is Output.table:
                sys.stderr.write(line + "\n")
            last = line
            if ve.state == goal:
                return ve
            wanted = "running" if goal == "running" else "stopped"
            if ve.desired_state != wanted:
                raise Conflict(f"{name} was asked to be {ve.desired_state} meanwhile; stopped waiting")
            if time.monotonic() > deadline:
                raise Conflict(f"timed out after {timeout:.0f} s: {line}")
            time.sleep(0.5)
    finally:
        if status is not None:
            status.stop()
