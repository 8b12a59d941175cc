"""``qrm partition``: partitions (VMs) on hypervisor hosts, openQRM's Partitions tab.

``add`` makes N partitions of one size on a host (they network-boot and
register as idle virtual resources); ``start|stop|pause|resume|reboot``,
``set`` (memory, virtual CPUs), ``pin`` (CPU assignment) and ``migrate`` are
the Xen-Config actions; ``show`` says what the host's driver supports.
A partition name that more than one host has needs ``--host``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from qrm_core.cli.common import OutputOpt, client, done, sub_app
from qrm_core.cli.output import Output, columns, message, show_list, show_one
from qrm_core.errors import InvalidInput

app = sub_app("Partitions: VMs on hypervisor hosts (add, start, stop, pause, resume, set, pin, migrate).")

COLUMNS = columns("name", "host", "hypervisor", "cpus", "memory_mb", "cpu_pinning", "mac", "state", "ve")

HostOpt = Annotated[str | None, typer.Option("--host", help="host resource, if the name is not unique")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="also when it serves a virtual environment (or is paused)")
]
LiveOpt = Annotated[bool, typer.Option("--live", help="only the running partition (until it stops)")]
ConfigOpt = Annotated[bool, typer.Option("--config", help="only its definition (from its next start)")]


def _mode(live: bool, config: bool) -> str:
    if live and config:
        raise InvalidInput("choose --live or --config, not both (neither: both)")
    return "live" if live else "config" if config else "both"


@app.command("list")
def list_(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option("--host", help="only this host's partitions")] = None,
    output: OutputOpt = Output.table,
) -> None:
    """List partitions."""
    show_list(client(ctx).partition_list(host), COLUMNS, output, "Partitions")


@app.command("add")
def add(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="the hypervisor host (resource id, MAC or name)")],
    cpus: Annotated[int, typer.Option("--cpus", help="virtual CPUs per partition")],
    memory: Annotated[int, typer.Option("--memory", help="memory per partition, MB")],
    count: Annotated[int, typer.Option("--count", "-n", help="how many partitions")] = 1,
    hypervisor: Annotated[
        str | None, typer.Option("--hypervisor", help="the host's hypervisor, if it runs several")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--name", help="name prefix: PREFIX-1, PREFIX-2, ... (default: the host's name)"),
    ] = None,
    max_cpus: Annotated[
        int | None, typer.Option("--max-cpus", help="CPUs it may grow to while running (default: the host's)")
    ] = None,
    max_memory: Annotated[
        int | None, typer.Option("--max-memory", help="MB it may grow to while running (default: --memory)")
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Make N partitions of one size on a host: they network-boot and register as idle resources."""
    made = client(ctx).partition_add(
        host=host,
        count=count,
        cpus=cpus,
        memory_mb=memory,
        hypervisor=hypervisor,
        prefix=name,
        max_cpus=max_cpus,
        max_memory_mb=max_memory,
    )
    if output is Output.json:
        show_one(made, output)
        return
    where = made[0].host if made else host
    message(
        f"added {len(made)} partition(s) on {where} ({cpus} CPUs, {memory} MB each): "
        f"{', '.join(p.name for p in made)}; they boot from the network and register as idle resources"
    )


@app.command("show")
def show(ctx: typer.Context, name: str, host: HostOpt = None, output: OutputOpt = Output.table) -> None:
    """Show a partition: its host, state, size, pinning, resource, the VE it serves, what its driver can do."""
    show_one(client(ctx).partition_show(name, host), output)


def _act(ctx: typer.Context, name: str, host: str | None, action: str, force: bool, output: Output) -> None:
    result = client(ctx).partition_action(name, host, action, force)
    done(result, f"partition {result.name} on {result.host} is {result.state}", output)


def _action(action: str, *, forceable: bool) -> Callable[..., None]:
    """``partition start|resume|reboot NAME``; ``stop|pause`` take ``--force`` too."""
    if forceable:

        def forced(
            ctx: typer.Context,
            name: str,
            host: HostOpt = None,
            force: ForceOpt = False,
            output: OutputOpt = Output.table,
        ) -> None:
            _act(ctx, name, host, action, force, output)

        return forced

    def plain(ctx: typer.Context, name: str, host: HostOpt = None, output: OutputOpt = Output.table) -> None:
        _act(ctx, name, host, action, False, output)

    return plain


app.command("start", help="Power a partition on: it boots from the network.")(
    _action("start", forceable=False)
)
app.command("stop", help="Power a partition off (--force: pull the plug; also when it serves a VE).")(
    _action("stop", forceable=True)
)
app.command(
    "pause", help="Suspend a running partition (--force: also when it serves a VE, which is degraded)."
)(_action("pause", forceable=True))
app.command("resume", help="Resume a paused partition.")(_action("resume", forceable=False))
app.command("reboot", help="Reset a running partition: it boots again from the network.")(
    _action("reboot", forceable=False)
)


@app.command("set")
def set_(
    ctx: typer.Context,
    name: str,
    memory: Annotated[int | None, typer.Option("--memory", help="new memory, MB")] = None,
    cpus: Annotated[int | None, typer.Option("--cpus", help="new number of virtual CPUs")] = None,
    live: LiveOpt = False,
    config: ConfigOpt = False,
    host: HostOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Change a partition's memory and/or virtual CPUs (within its host's free capacity)."""
    result = client(ctx).partition_set(name, host, memory, cpus, _mode(live, config))
    done(
        result, f"partition {result.name} on {result.host}: {result.cpus} CPUs, {result.memory_mb} MB", output
    )


@app.command("pin")
def pin(
    ctx: typer.Context,
    name: str,
    pinning: Annotated[
        str, typer.Argument(metavar="PINNING", help="VCPU:CPULIST separated by ';', e.g. '0:2,3;1:4'")
    ],
    live: LiveOpt = False,
    config: ConfigOpt = False,
    host: HostOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Pin virtual CPUs to host CPUs (CPU assignment); virtual CPUs not named keep theirs."""
    result = client(ctx).partition_pin(name, host, pinning, _mode(live, config))
    done(result, f"partition {result.name} on {result.host} pinned: {result.cpu_pinning or '-'}", output)


@app.command("migrate")
def migrate(
    ctx: typer.Context,
    name: str,
    to: Annotated[str, typer.Option("--to", help="the destination host (same hypervisor)")],
    offline: Annotated[
        bool, typer.Option("--offline", help="move it stopped (and start it there again), not live")
    ] = False,
    host: HostOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Move a partition to another host; its resource keeps its MAC, id and VE."""
    result = client(ctx).partition_migrate(name, host, to, offline)
    done(result, f"partition {result.name} is on {result.host} ({result.state})", output)


@app.command("sync")
def sync(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="the hypervisor host")],
    output: OutputOpt = Output.table,
) -> None:
    """Bring qrm's records of a host's partitions in line with what its hypervisor lists."""
    result: Any = client(ctx).partition_sync(host)
    if output is Output.json:
        show_one(result, output)
        return
    for line in [
        *result.changes,
        *(f"{result.host} has partition {n}, which qrm did not make" for n in result.unknown),
    ]:
        message(line)
    if not result.changes and not result.unknown:
        message(f"the partitions of {result.host} are as recorded")


@app.command("remove")
def remove(ctx: typer.Context, name: str, host: HostOpt = None, output: OutputOpt = Output.table) -> None:
    """Destroy a partition (its VM) that serves no virtual environment."""
    result = client(ctx).partition_remove(name, host)
    done(result, f"destroyed partition {result.name} on {result.host}", output)
