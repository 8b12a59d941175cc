"""``qrm site``: settings shared by every qrm server on one database."""

from __future__ import annotations

import typer

from qrm_core.cli.common import client, sub_app

app = sub_app("Site-wide settings.")


@app.command("enrollment-token")
def enrollment_token(ctx: typer.Context) -> None:
    """Print the token booting machines register with (qrm.enroll=)."""
    typer.echo(client(ctx).enrollment_token())
