"""``qrm user``: the operators of the console and the API."""

from __future__ import annotations

from typing import Annotated

import typer

from qrm_core.cli.common import OutputOpt, client, done, object_command, sub_app
from qrm_core.cli.output import Output, columns, show_list

app = sub_app("Users of the console and the API.")

COLUMNS = columns("name", "role", ("CREATED", "created_at"))
PasswordOpt = Annotated[
    str, typer.Option("-p", "--password", prompt=True, hide_input=True, confirmation_prompt=True)
]


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("-n", "--name")],
    password: PasswordOpt,
    role: Annotated[str, typer.Option("-r", "--role", help="admin, operator or viewer")] = "viewer",
    output: OutputOpt = Output.table,
) -> None:
    """Add a user."""
    result = client(ctx).user_add(name, password, role)
    done(result, f"added user {result.name} ({result.role})", output)


@app.command("list")
def list_(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
    """List users."""
    show_list(client(ctx).user_list(), COLUMNS, output, "Users")


@app.command("passwd")
def passwd(
    ctx: typer.Context,
    name: str,
    password: PasswordOpt,
    current: Annotated[
        str | None,
        typer.Option(
            "--current-password",
            help="your current password, to change your own through a server with an API token "
            "(with -u/-p the -p password is sent)",
        ),
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Set a user's password (at least 8 characters, not the user name, not 'qrm')."""
    result = client(ctx).user_passwd(name, password, current)
    done(result, f"changed the password of {result.name}", output)


object_command(
    app,
    "remove",
    "Remove a user (not the last admin).",
    lambda c, name: c.user_remove(name),
    lambda r: f"removed user {r.name}",
)
