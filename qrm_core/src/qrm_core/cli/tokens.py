"""``qrm token``: API tokens, bearer secrets for ``--token`` and the REST API."""

from __future__ import annotations

from typing import Annotated

import typer

from qrm_core.cli.common import OutputOpt, client, done, sub_app
from qrm_core.cli.output import Output, columns, message, show_list, show_one
from qrm_core.errors import InvalidInput
from qrm_core.shapes import MAX_ID

app = sub_app("API tokens: bearer secrets for --token and the REST API.")

COLUMNS = columns("id", "name", "user", ("CREATED", "created_at"), "last_used")


def token_id(text: str) -> int:
    """An API token's id as typed: the number ``qrm token list`` shows."""
    value = text.strip()
    if not value.isdecimal() or not 1 <= int(value) <= MAX_ID:
        raise InvalidInput(f"invalid API token id {text!r}: use the number 'qrm token list' shows")
    return int(value)


@app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("-n", "--name", help="a name to tell the token by")],
    user: Annotated[
        str | None, typer.Option("--user", help="whose token (default: yours; others' need admin)")
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Create an API token; it is printed this once and cannot be shown again."""
    result = client(ctx).token_create(name, user)
    if output is Output.json:
        show_one(result, output)
        return
    message(f"created API token {result.name} (id {result.id}) for {result.user}; it is shown only now:")
    typer.echo(result.token)


@app.command("list")
def list_(
    ctx: typer.Context,
    user: Annotated[
        str | None, typer.Option("--user", help="this user's tokens (default: yours; others' need admin)")
    ] = None,
    all_users: Annotated[bool, typer.Option("--all", help="every user's tokens (admin)")] = False,
    output: OutputOpt = Output.table,
) -> None:
    """List API tokens (never their secrets)."""
    if user is not None and all_users:
        raise InvalidInput("give --user or --all, not both")
    show_list(client(ctx).token_list(user, all_users), COLUMNS, output, "API tokens")


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    id_text: Annotated[str, typer.Argument(metavar="ID", help="the token's id (qrm token list)")],
    output: OutputOpt = Output.table,
) -> None:
    """Revoke an API token (yours; an admin: anyone's). It stops working at once."""
    result = client(ctx).token_revoke(token_id(id_text))
    done(result, f"revoked API token {result.name} (id {result.id}) of {result.user}", output)
