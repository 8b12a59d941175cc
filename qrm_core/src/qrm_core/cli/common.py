"""What every ``qrm`` command module shares: the per-invocation state, the
client it talks to, the options that mean the same everywhere, and the
confirmation line.

A command module (``cli/storage.py``, ``cli/ves.py``, ...) holds one
module-level Typer sub-app named ``app`` and its commands; each command parses,
calls :func:`client`, and prints with :mod:`qrm_core.cli.output`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from qrm_core.cli.output import Output, message, show_one
from qrm_core.client import Client
from qrm_core.config import Settings, get_settings

OutputOpt = Annotated[
    Output, typer.Option("--output", "-o", help="table for people, json for programs", case_sensitive=False)
]
WaitOpt = Annotated[bool, typer.Option("--wait", "-w", help="wait until it is done, showing progress")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="seconds to wait at most")]
CommentOpt = Annotated[str | None, typer.Option("-c", "--comment")]
ResourceRef = Annotated[str, typer.Argument(metavar="MAC_OR_ID")]


def sub_app(help: str) -> typer.Typer:
    """A command group (``qrm storage``, ``qrm ve``, ...): ``qrm GROUP`` alone prints its help."""
    return typer.Typer(help=help, no_args_is_help=True)


class CliState:
    """Per-invocation state kept in the click context."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        server: str | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.server = server or self.settings.server
        self.user = user or self.settings.user
        self.password = password if password is not None else self.settings.password
        self.token = token or self.settings.token
        self._client: Client | None = None

    @property
    def remote(self) -> bool:
        return bool(self.server)

    def client(self) -> Client:
        if self._client is None:
            if self.server:
                from qrm_core.client import RemoteClient

                self._client = RemoteClient(
                    self.server, user=self.user, password=self.password, token=self.token
                )
            else:
                from qrm_core.local_client import LocalClient  # the services: not needed through a server

                self._client = LocalClient(self.settings)
        return self._client


def state(ctx: typer.Context) -> CliState:
    """This invocation's :class:`CliState` (made by the root callback)."""
    return ctx.ensure_object(CliState)


def client(ctx: typer.Context) -> Client:
    """The database through the services, or the ``--server``'s API."""
    return state(ctx).client()


def done(result: Any, text: str, output: Output) -> None:
    """Confirm a change: one line for people, or the changed object as JSON."""
    if output is Output.json:
        show_one(result, output)
    else:
        message(text, output)


def object_command(
    app: typer.Typer,
    command: str,
    help: str,
    call: Callable[[Client, str], Any],
    said: Callable[[Any], str] | None = None,
    *,
    metavar: str | None = None,
) -> None:
    """Add ``command NAME [-o json]`` to ``app``: one call on the object named.

    Without ``said`` it shows the object the call returns (``show``); with it,
    the call changes the object and ``said(result)`` is the confirmation line
    (``remove``, ``set-default``, ``reboot``, ...).
    """

    def run(
        ctx: typer.Context,
        name: str = typer.Argument(..., metavar=metavar),
        output: OutputOpt = Output.table,
    ) -> None:
        result = call(client(ctx), name)
        if said is None:
            show_one(result, output)
        else:
            done(result, said(result), output)

    app.command(command, help=help)(run)
