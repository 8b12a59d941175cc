"""The ``qrm`` command line: openQRM's verbs over the services (or a server's API).

Every command is a thin shell: parse, call the client, print. A user's mistake
prints one line on stderr and exits 1 (2 for a usage error); nothing is
changed. Anything else is a bug: one line on stderr, the traceback in the log.

One module per openQRM noun holds its command group (``cli/storage.py``,
``cli/ves.py``, ``cli/resources.py``, ``cli/partitions.py``, ...); what they
share is in :mod:`qrm_core.cli.common`. This module builds the root command,
mounts the groups and every enabled plugin's, and runs it.
"""

from __future__ import annotations

import logging
import sys
import tomllib
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

from qrm_core import __version__
from qrm_core.cli import (
    boot_images,
    events,
    filesystem_images,
    lab,
    partitions,
    plugins,
    resources,
    site,
    storage,
    tokens,
    users,
    ves,
)
from qrm_core.cli.common import CliState, OutputOpt, client, state
from qrm_core.cli.output import Output, message, show_one
from qrm_core.config import Settings, config_file, get_settings
from qrm_core.errors import InvalidInput, QrmError
from qrm_core.logs import configure_logging, log_file

log = logging.getLogger("qrm.cli")

#: (name, sub-app) of core's command groups, in the order ``qrm --help`` lists them.
GROUPS: list[tuple[str, typer.Typer]] = [
    ("storage", storage.app),
    ("boot-image", boot_images.app),
    ("filesystem-image", filesystem_images.app),
    ("ve", ves.app),
    ("resource", resources.app),
    ("partition", partitions.app),
    ("site", site.app),
    ("lab", lab.app),
    ("user", users.app),
    ("token", tokens.app),
    ("plugins", plugins.app),
]


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"qrm {__version__}")
        raise typer.Exit(0)


def init_cmd(
    ctx: typer.Context,
    admin_password: Annotated[
        str | None,
        typer.Option("--admin-password", help="password of the admin user 'qrm' (default: qrm)"),
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Create or upgrade the database schema and the admin user."""
    result = client(ctx).init(admin_password)
    if output is Output.json:
        show_one(result, output)
        return
    if result.revision_before is None:
        message(f"created the qrm database at {result.database} (schema {result.revision})")
    elif result.revision_before != result.revision:
        message(f"upgraded {result.database} from {result.revision_before} to {result.revision}")
    else:
        message(f"{result.database} is up to date (schema {result.revision})")
    if result.admin_created:
        message(f"created the admin user '{result.admin}'")
    if result.boot_image:
        message(result.boot_image)
    if result.default_password:
        message(
            f"the admin user '{result.admin}' has the default password; change it with "
            "'qrm init --admin-password ...' before serving beyond this machine"
        )


def server_cmd(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port to listen on")] = 8080,
) -> None:
    """Serve the REST API, the node-agent protocol and the engine (foreground)."""
    from qrm_core.plugins import get_plugin_system
    from qrm_core.server import serve

    cli = state(ctx)
    if cli.remote:
        raise InvalidInput("qrm server runs here; --server makes no sense with it")
    serve(cli.settings, get_plugin_system(cli.settings), host, port)


def build_app(settings: Settings | None = None, *, with_plugins: bool = True) -> typer.Typer:
    """The root ``qrm`` application with core commands and every enabled plugin's."""
    settings = settings or get_settings()
    app = typer.Typer(
        name="qrm",
        help="qrm: network-boot machines, deploy virtual environments onto idle resources.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def root(
        ctx: typer.Context,
        server: Annotated[
            str | None,
            typer.Option(
                "--server", help="work through this qrm server's API (URL) instead of the local database"
            ),
        ] = None,
        user: Annotated[
            str | None, typer.Option("-u", "--user", help="user for --server (refused without it)")
        ] = None,
        password: Annotated[
            str | None, typer.Option("-p", "--password", help="password for --server (refused without it)")
        ] = None,
        token: Annotated[
            str | None, typer.Option("--token", help="API token for --server (refused without it)")
        ] = None,
        version: Annotated[
            bool,
            typer.Option(
                "--version", help="print the version and exit", is_eager=True, callback=show_version
            ),
        ] = False,
    ) -> None:
        given = [
            name for name, value in (("-u", user), ("-p", password), ("--token", token)) if value is not None
        ]
        if given and not (server or settings.server):
            # Without a server, qrm works on the local database as whoever runs
            # it: credentials would be silently ignored, so refuse them.
            raise InvalidInput(
                f"{'/'.join(given)} {'is' if len(given) == 1 else 'are'} for --server (or QRM_SERVER); "
                "without it qrm works on the local database as the user running it: "
                "drop them or add --server URL"
            )
        ctx.obj = CliState(settings, server=server, user=user, password=password, token=token)

    app.command("init")(init_cmd)
    app.command("events")(events.events)
    app.command("server")(server_cmd)
    for name, group in GROUPS:
        app.add_typer(group, name=name)
    if with_plugins:
        _add_plugin_commands(app, settings)
    return app


#: Root options that take a value (to find the command word in ``argv``).
_VALUED_ROOT_OPTIONS = ("--server", "-u", "--user", "-p", "--password", "--token")


def _command_word(args: list[str]) -> str | None:
    """The first word of ``qrm [ROOT OPTIONS] WORD ...``, or None (no command, or a root option alone)."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in _VALUED_ROOT_OPTIONS:
            skip = True
        elif arg == "--" or not arg.startswith("-"):
            return None if arg == "--" else arg
        elif not arg.startswith("--") and len(arg) > 2 and arg[:2] in _VALUED_ROOT_OPTIONS:
            continue  # -uNAME
    return None


def core_command(args: list[str]) -> bool:
    """Whether ``args`` run one of core's commands: plugins add only their own (the
    hook's rule), so a core command needs no plugin loaded."""
    word = _command_word(args)
    return word is not None and word in {"init", "events", "server", *(name for name, _ in GROUPS)}


def _add_plugin_commands(app: typer.Typer, settings: Settings) -> None:
    from qrm_core.plugins import get_plugin_system

    try:
        system = get_plugin_system(settings)
    except Exception:
        log.exception("could not load plugins")
        return
    for name, exc in system.hooks.register_commands(app):
        system.mark_broken(name, exc)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def _error(text: str) -> None:
    sys.stderr.write(f"error: {text}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    """Run ``qrm``; returns the exit status (also used by tests)."""
    try:
        settings = get_settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        _error(f"invalid setting {where.upper() and 'QRM_' + where.upper()}: {first.get('msg')}")
        return 1
    except SettingsError as exc:
        _error(f"invalid setting: {exc}")
        return 1
    except (tomllib.TOMLDecodeError, OSError) as exc:
        _error(f"cannot read the configuration file {config_file()}: {exc}")
        return 1
    args = list(sys.argv[1:] if argv is None else argv)
    # Through a server, the CLI keeps nothing on this machine: no log files,
    # no database (the server logs and audits what it does).
    remote = bool(settings.server) or any(a == "--server" or a.startswith("--server=") for a in args)
    if remote:
        qrm_log = logging.getLogger("qrm")
        if not any(isinstance(h, logging.NullHandler) for h in qrm_log.handlers):
            qrm_log.addHandler(logging.NullHandler())
    else:
        configure_logging(settings)
    try:
        # Through a server a core command needs no plugin here: none is loaded (with the
        # ORM and services their modules import), and the command starts in a fraction
        # of the time. Help, plugin commands and local mode load them as always.
        app = build_app(settings, with_plugins=not (remote and core_command(args)))
        command = typer.main.get_command(app)
        result: Any = command.main(args=args, prog_name="qrm", standalone_mode=False)
    except typer.Abort:
        _error("aborted")
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except typer.TyperException as exc:
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            _error(exc.format_message())
        return exc.exit_code
    except QrmError as exc:
        log.info("command failed: %s", exc.message)
        _error(exc.message)
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        log.exception("internal error")
        where = "" if remote else f"; details in {log_file(settings)}"
        _error(f"internal error ({type(exc).__name__}: {exc}){where}")
        return 70
    return result if isinstance(result, int) else 0


def run() -> None:
    sys.exit(main())
