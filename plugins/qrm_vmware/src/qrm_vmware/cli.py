"""``qrm vmware``: vCenter connections and their sync.

These commands work on the site's database and the site key, so they run
where a qrm server runs (like ``qrm init``), not through ``--server``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from qrm_core.plugin_api import (
    InvalidInput,
    Output,
    QrmError,
    get_settings,
    message,
    read_context,
    service_context,
    show_list,
    show_one,
)

app = typer.Typer(
    help="VMware vSphere: vCenter (or standalone ESXi) connections; their hosts host partitions.",
    no_args_is_help=True,
)

OutputOpt = Annotated[
    Output, typer.Option("--output", "-o", help="table for people, json for programs", case_sensitive=False)
]

COLUMNS = [
    ("NAME", lambda c: c["name"]),
    ("URL", lambda c: c["url"]),
    ("USER", lambda c: c["username"]),
    ("CERTIFICATE CHECK", lambda c: c["certificate_check"]),
    ("TYPE", lambda c: c["api_type"]),
    ("LAST SYNC", lambda c: c["last_sync"]),
    ("RESULT", lambda c: c["last_sync_result"]),
]


def _local(ctx: typer.Context) -> None:
    if getattr(ctx.find_root().obj, "remote", False):
        raise InvalidInput(
            "qrm vmware works on the site's database and site key: run it on a qrm server's machine, "
            "without --server"
        )


def _done(result: dict[str, Any], text: str, output: Output) -> None:
    if output is Output.json:
        show_one(result, output)
    else:
        message(text, output)


@app.command("connect")
def connect_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", "-n", help="a name for the connection (vc1)")],
    url: Annotated[str, typer.Option("--url", help="https://vcenter.example.com/sdk (or an ESXi host)")],
    username: Annotated[
        str, typer.Option("--user", "-u", help="the vCenter user (administrator@vsphere.local)")
    ],
    password: Annotated[
        str | None, typer.Option("--password", "-p", help="the password (prefer --password-file)")
    ] = None,
    password_file: Annotated[
        Path | None, typer.Option("--password-file", help="read the password from this file's first line")
    ] = None,
    ca_file: Annotated[
        str | None, typer.Option("--ca-file", help="PEM file of the CA that signed vCenter's certificate")
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="do NOT check vCenter's certificate (anyone on the path can then read the password)",
        ),
    ] = False,
    replace_existing: Annotated[
        bool, typer.Option("--replace", help="replace a connection of that name (new password, ...)")
    ] = False,
    output: OutputOpt = Output.table,
) -> None:
    """Log in to vCenter once to check, then store the connection (the password encrypted)."""
    _local(ctx)
    from qrm_vmware import manage

    with service_context(get_settings()) as service:
        result = manage.connect(
            service,
            name=name,
            url=url,
            username=username,
            password=password,
            password_file=password_file,
            insecure=insecure,
            ca_file=ca_file,
            replace_existing=replace_existing,
        )
    _done(
        result,
        f"connected to {result['url']} as {result['username']} ({result['api_type']}); "
        f"stored as {result['name']}" + ("; the certificate is NOT checked (--insecure)" if insecure else ""),
        output,
    )


@app.command("list")
def list_cmd(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """The stored connections (never their passwords)."""
    _local(ctx)
    from qrm_vmware import manage

    with read_context(get_settings()) as service:
        rows = manage.list_connections(service)
    show_list(rows, COLUMNS, output, title="vCenter connections")


@app.command("show")
def show_cmd(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
    """One connection (never its password)."""
    _local(ctx)
    from qrm_vmware import manage

    with read_context(get_settings()) as service:
        show_one(manage.show_connection(service, name), output)


@app.command("remove")
def remove_cmd(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
    """Forget a connection; the hosts it imported stay, turned off and marked as gone."""
    _local(ctx)
    from qrm_vmware import manage

    with service_context(get_settings()) as service:
        result = manage.remove_connection(service, name)
    left = result.get("hosts_left") or []
    _done(
        result,
        f"vCenter connection {name} removed"
        + (
            f"; its hosts {', '.join(left)} stay, turned off ('qrm resource remove' forgets them)"
            if left
            else ""
        ),
        output,
    )


@app.command("sync")
def sync_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="the connection (see 'qrm vmware list')")],
    output: OutputOpt = Output.table,
) -> None:
    """Import vCenter's ESXi hosts and clusters as host resources now, and check qrm's VMs.

    'qrm server' does this every QRM_VMWARE_SYNC_INTERVAL seconds by itself.
    """
    _local(ctx)
    from qrm_vmware import sync
    from qrm_vmware.connections import check_name

    try:
        result = sync.sync_connection(get_settings(), check_name(name))
    except QrmError as exc:
        sync.note_failure(get_settings(), name, exc.message)
        raise
    if output is Output.json:
        show_one(result.to_dict(), output)
        return
    message(f"vCenter {name}: {result.summary()}", output)
    for line in result.report.problems:
        message(f"problem: {line}", output)
