"""``qrm resource``: the machines qrm boots, physical or virtual."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

import typer

from qrm_core.cli import partitions
from qrm_core.cli.common import CommentOpt, OutputOpt, ResourceRef, client, done, object_command, sub_app
from qrm_core.cli.output import Output, columns, message, show_list, show_one
from qrm_core.errors import InvalidInput

app = sub_app("Resources: the machines qrm boots.")

COLUMNS = columns("id", "mac", "ip", "hostname", "kind", "state", "ve", "cpus", "memory_mb", "last_seen")
HEALTH_COLUMNS = columns("source", "status", "message")


@app.command("add")
def add(
    ctx: typer.Context,
    mac: Annotated[str, typer.Option("-m", "--mac", help="MAC address of the boot NIC")],
    ip: Annotated[str | None, typer.Option("-i", "--ip", help="IP address")] = None,
    hostname: Annotated[str | None, typer.Option("--hostname", help="host name")] = None,
    kind: Annotated[str, typer.Option("--kind", help="physical or virtual")] = "physical",
    host: Annotated[str | None, typer.Option("--host", help="host resource of a virtual one")] = None,
    hypervisor: Annotated[
        str | None,
        typer.Option("--hypervisor", help="hypervisor of a virtual one; or the one a physical host runs"),
    ] = None,
    hypervisor_uri: Annotated[
        str | None,
        typer.Option(
            "--hypervisor-uri", "--libvirt-uri", help="how to reach a host's hypervisor (a libvirt URI, ...)"
        ),
    ] = None,
    network: Annotated[
        str | None, typer.Option("--network", help="the network (bridge) a host's partitions join")
    ] = None,
    cpus: Annotated[int, typer.Option("--cpus")] = 0,
    memory: Annotated[int, typer.Option("--memory", help="memory in MB")] = 0,
    comment: CommentOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Enter a machine by hand before it first network-boots (with --hypervisor: a hypervisor host)."""
    extra = {
        k: val for k, val in {"hypervisor_uri": hypervisor_uri, "network": network}.items() if val is not None
    }
    result = client(ctx).resource_add(
        mac=mac,
        ip=ip,
        hostname=hostname,
        kind=kind,
        host=host,
        hypervisor=hypervisor,
        cpus=cpus,
        memory_mb=memory,
        comment=comment,
        **extra,
    )
    done(result, f"added resource {result.id} ({result.mac})", output)


@app.command("list")
def list_(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option("--state", help="only resources in this state")] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="physical or virtual")] = None,
    ve: Annotated[str | None, typer.Option("--ve", help="only resources serving this VE")] = None,
    offset: Annotated[int, typer.Option("--offset", help="skip this many")] = 0,
    limit: Annotated[int | None, typer.Option("--limit", help="show at most this many")] = None,
    output: OutputOpt = Output.table,
) -> None:
    """List resources."""
    page = client(ctx).resource_list(state, kind, ve, offset, limit)
    show_list(page.items, COLUMNS, output, "Resources")
    if output is Output.table and page.total > len(page.items):
        message(f"({len(page.items)} of {page.total} shown)")


@app.command("show")
def show(ctx: typer.Context, mac_or_id: ResourceRef, output: OutputOpt = Output.table) -> None:
    """Show one resource (by id, MAC or hostname) with its health; a host with its partitions and capacity."""
    result = client(ctx).resource_show(mac_or_id)
    show_one(result, output)
    if output is not Output.table:
        return
    if result.health:
        show_list(result.health, HEALTH_COLUMNS, output, "Health")
    room = result.capacity
    if room is not None:
        message(
            f"capacity: {room.cpus_total} CPUs ({room.cpus} x {room.cpu_overcommit:g}), "
            f"{room.memory_total_mb} MB ({room.memory_mb} x {room.memory_overcommit:g}); "
            f"{room.partitions} partition(s) use {room.cpus_used} CPUs, {room.memory_used_mb} MB; "
            f"free: {room.cpus_free} CPUs, {room.memory_free_mb} MB"
        )
    if result.partitions:
        show_list(result.partitions, partitions.COLUMNS, output, "Partitions")


def _key_values(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` items as a mapping (``KEY=``: remove the key)."""
    pairs = [item.partition("=") for item in items]
    bad = [item for item, (_, sep, _) in zip(items, pairs, strict=True) if not sep]
    if bad:
        raise InvalidInput(f"host setting {bad[0]!r} is not KEY=VALUE")
    return {key.strip(): value for key, _, value in pairs}


def _read_secret(path: Path) -> str:
    """A password from a file (its first line), so it is in no shell history or process list."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read the password file {path}: {exc.strerror}") from None
    return text.splitlines()[0] if text else ""


@app.command("set")
def set_(
    ctx: typer.Context,
    mac_or_id: ResourceRef,
    hypervisor: Annotated[
        str | None, typer.Option("--hypervisor", help="the hypervisor this host runs (its partitions')")
    ] = None,
    hypervisor_uri: Annotated[
        str | None,
        typer.Option(
            "--hypervisor-uri", "--libvirt-uri", help="how to reach its hypervisor (a libvirt URI, ...)"
        ),
    ] = None,
    network: Annotated[
        str | None, typer.Option("--network", help="the network (bridge, port group) its partitions join")
    ] = None,
    host_setting: Annotated[
        list[str] | None,
        typer.Option("--host-setting", help="another driver setting, KEY=VALUE (KEY= removes it; repeat)"),
    ] = None,
    power_driver: Annotated[
        str | None, typer.Option("--power-driver", help="its power controller's driver ('' removes it)")
    ] = None,
    power_address: Annotated[
        str | None, typer.Option("--power-address", help="its power controller's address")
    ] = None,
    power_user: Annotated[
        str | None, typer.Option("--power-user", help="the power controller's user")
    ] = None,
    power_password_file: Annotated[
        Path | None,
        typer.Option(
            "--power-password-file", help="a file holding the controller's password", dir_okay=False
        ),
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Set how qrm reaches a machine's hypervisor and power controller ('' clears a value)."""
    settings: dict[str, Any] = {
        "hypervisor": hypervisor,
        "hypervisor_uri": hypervisor_uri,
        "network": network,
        "host_settings": _key_values(host_setting) if host_setting else None,
        "power_driver": power_driver,
        "power_address": power_address,
        "power_username": power_user,
        "power_password": _read_secret(power_password_file) if power_password_file else None,
    }
    result = client(ctx).resource_set(mac_or_id, **{k: val for k, val in settings.items() if val is not None})
    label = result.hostname or result.mac
    done(
        result,
        f"set resource {label}: {', '.join(k for k, val in settings.items() if val is not None)}",
        output,
    )


class PowerAction(enum.StrEnum):
    on = "on"
    off = "off"
    reset = "reset"
    status = "status"


@app.command("power")
def power(
    ctx: typer.Context,
    action: Annotated[PowerAction, typer.Argument(help="on, off, reset or status", case_sensitive=False)],
    mac_or_id: ResourceRef,
    output: OutputOpt = Output.table,
) -> None:
    """Turn a machine on or off, reset it, or ask its state, through its power controller."""
    result = client(ctx).resource_power(mac_or_id, action.value)
    done(result, f"resource {result.resource} is {result.state} ({result.driver})", output)


object_command(
    app,
    "remove",
    "Remove a resource that serves no virtual environment.",
    lambda c, ref: c.resource_remove(ref),
    lambda r: f"removed resource {r.id} ({r.mac})",
    metavar="MAC_OR_ID",
)
object_command(
    app,
    "reboot",
    "Reboot a resource at its next heartbeat (into whatever it should boot now).",
    lambda c, ref: c.resource_reboot(ref),
    lambda r: f"reboot ordered for resource {r.id} ({r.mac})",
    metavar="MAC_OR_ID",
)
object_command(
    app,
    "halt",
    "Power a resource off at its next heartbeat (it must serve no VE).",
    lambda c, ref: c.resource_halt(ref),
    lambda r: f"halt ordered for resource {r.id} ({r.mac})",
    metavar="MAC_OR_ID",
)
