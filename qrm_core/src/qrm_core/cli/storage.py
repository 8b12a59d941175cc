"""``qrm storage``: storage servers that export filesystem images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from qrm_core.cli.common import OutputOpt, client, done, object_command, sub_app
from qrm_core.cli.output import Output, columns, err_console, show_list
from qrm_core.errors import InvalidInput

app = sub_app("Storage servers that export filesystem images.")

COLUMNS = columns(
    "name", "type", "address", ("MANAGED FROM", "managed_from"), "comment", ("IMAGES", "filesystem_images")
)


SshKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--ssh-key",
        help="private key qrm logs in with (qrm keeps a copy); the server is then managed over SSH",
    ),
]
SshUserOpt = Annotated[
    str | None,
    typer.Option("--ssh-user", help="user qrm logs in as (root, or one allowed to run the storage tools)"),
]
SshPortOpt = Annotated[int | None, typer.Option("--ssh-port", help="SSH port (22)")]
SshHostKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--ssh-host-key",
        help="the server's host key: a .pub file or 'TYPE BASE64' (else pinned on first use)",
    ),
]
SettingOpt = Annotated[
    list[str] | None,
    typer.Option("--setting", "-s", help="a driver setting KEY=VALUE (repeatable)", metavar="KEY=VALUE"),
]
NoCheckOpt = Annotated[
    bool, typer.Option("--no-check", help="do not check that the server can be reached and managed")
]


def _settings(pairs: list[str] | None) -> dict[str, str]:
    found: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"--setting {pair!r}: give KEY=VALUE")
        found[key.strip()] = value.strip()
    return found


def _ssh(key: Path | None, user: str | None, port: int | None, host_key: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {"ssh_user": user, "ssh_port": port}
    if key is not None:
        try:
            options["ssh_key"] = key.expanduser().read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(
                f"cannot read the SSH key {key}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
    if host_key is not None:
        candidate = Path(host_key).expanduser()
        if "/" in host_key or candidate.is_file():
            try:
                host_key = candidate.read_text().strip()
            except OSError as exc:
                raise InvalidInput(f"cannot read the SSH host key {candidate}: {exc.strerror}") from None
        options["ssh_host_key"] = host_key
    return options


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("-n", "--name", help="name of the storage server")],
    type: Annotated[str, typer.Option("-t", "--type", help="storage type (driver name, e.g. nfs)")],
    ip: Annotated[str, typer.Option("-i", "--ip", help="IP address of the storage server")],
    comment: Annotated[str | None, typer.Option("-c", "--comment", help="free text")] = None,
    ssh_key: SshKeyOpt = None,
    ssh_user: SshUserOpt = None,
    ssh_port: SshPortOpt = None,
    ssh_host_key: SshHostKeyOpt = None,
    setting: SettingOpt = None,
    no_check: NoCheckOpt = False,
    output: OutputOpt = Output.table,
) -> None:
    """Add a storage server; it must answer (unless --no-check).

    Without SSH options the server is this machine; with --ssh-key and
    --ssh-user qrm manages it over SSH."""
    result = client(ctx).storage_add(
        name,
        type,
        ip,
        comment,
        settings=_settings(setting),
        check=not no_check,
        **_ssh(ssh_key, ssh_user, ssh_port, ssh_host_key),
    )
    done(
        result,
        f"added storage server {result.name} ({result.type} at {result.address}"
        + (")" if result.managed_from == "this machine" else f", managed over SSH as {result.managed_from})"),
        output,
    )
    if result.warning:
        err_console().print(
            f"warning: {result.name} cannot export yet: {result.warning} ('qrm ve start' refuses until then)"
        )


@app.command("set")
def set_(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="the storage server")],
    ssh_key: SshKeyOpt = None,
    ssh_user: SshUserOpt = None,
    ssh_port: SshPortOpt = None,
    ssh_host_key: SshHostKeyOpt = None,
    local: Annotated[bool, typer.Option("--local", help="the server is this machine: forget SSH")] = False,
    setting: SettingOpt = None,
    unset: Annotated[
        list[str] | None, typer.Option("--unset", help="remove a driver setting (repeatable)")
    ] = None,
    comment: Annotated[str | None, typer.Option("-c", "--comment", help="free text")] = None,
    no_check: NoCheckOpt = False,
    output: OutputOpt = Output.table,
) -> None:
    """Change how qrm manages a storage server: SSH access, driver settings, comment.

    The changed server is checked before anything is kept (unless --no-check)."""
    result = client(ctx).storage_set(
        name,
        settings=_settings(setting),
        unset=unset or [],
        local=local,
        comment=comment,
        check=not no_check,
        **_ssh(ssh_key, ssh_user, ssh_port, ssh_host_key),
    )
    shown = ", ".join(f"{k}={v}" for k, v in sorted(result.settings.items()) if not k.startswith("ssh_"))
    done(
        result,
        f"storage server {result.name}: managed from {result.managed_from}" + (f"; {shown}" if shown else ""),
        output,
    )


@app.command("list")
def list_(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """List storage servers."""
    show_list(client(ctx).storage_list(), COLUMNS, output, "Storage servers")


object_command(app, "show", "Show one storage server.", lambda c, name: c.storage_show(name))
object_command(
    app,
    "remove",
    "Remove a storage server that holds no filesystem images.",
    lambda c, name: c.storage_remove(name),
    lambda r: f"removed storage server {r.name}",
)
