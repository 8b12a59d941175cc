"""The ``qrm`` command line: openQRM's verbs over the services (or a server's API).

Every command is a thin shell: parse, call the client, print. A user's mistake
prints one line on stderr and exits 1 (2 for a usage error); nothing is
changed. Anything else is a bug: one line on stderr, the traceback in the log.
"""

from __future__ import annotations

import logging
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

from qrm_core import __version__
from qrm_core.cli.output import Output, message, show_list, show_one
from qrm_core.client import Client, LocalClient
from qrm_core.config import Settings, config_file, get_settings
from qrm_core.errors import Conflict, InvalidInput, QrmError
from qrm_core.logs import configure_logging, log_file

log = logging.getLogger("qrm.cli")

OutputOpt = Annotated[
    Output, typer.Option("--output", "-o", help="table for people, json for programs", case_sensitive=False)
]


WaitOpt = Annotated[bool, typer.Option("--wait", "-w", help="wait until it is done, showing progress")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="seconds to wait at most")]


def done(result: Any, text: str, output: Output) -> None:
    """Confirm a change: one line for people, or the changed object as JSON."""
    if output is Output.json:
        show_one(result, output)
    else:
        message(text, output)


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"qrm {__version__}")
        raise typer.Exit(0)


def _client(ctx: typer.Context) -> Client:
    state: CliState = ctx.ensure_object(CliState)
    return state.client()


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
                self._client = LocalClient(self.settings)
        return self._client


# ---------------------------------------------------------------------------
# Columns
# ---------------------------------------------------------------------------

STORAGE_COLUMNS = [
    ("NAME", lambda s: s.name),
    ("TYPE", lambda s: s.type),
    ("ADDRESS", lambda s: s.address),
    ("COMMENT", lambda s: s.comment),
    ("IMAGES", lambda s: s.filesystem_images),
]
BOOT_COLUMNS = [
    ("NAME", lambda b: b.name),
    ("KERNEL", lambda b: b.kernel_version),
    ("DEFAULT", lambda b: b.is_default),
    ("FILES", lambda b: bool(b.kernel_path)),
    ("USED BY", lambda b: b.used_by),
]
FS_COLUMNS = [
    ("NAME", lambda f: f.name),
    ("STORAGE", lambda f: f.storage),
    ("LOCATION", lambda f: f.location),
    ("ORIGIN", lambda f: f.origin),
    ("STATE", lambda f: f.state),
    ("SIZE MB", lambda f: f.size_mb),
    ("USED BY", lambda f: f.used_by),
]
VE_COLUMNS = [
    ("NAME", lambda e: e.name),
    ("DEPLOYMENT", lambda e: e.deployment),
    ("BOOT IMAGE", lambda e: e.boot_image),
    ("FILESYSTEM", lambda e: e.filesystem_image),
    ("DESIRED", lambda e: e.desired_state),
    ("STATE", lambda e: e.state),
    ("POOL", lambda e: e.pool_size),
    ("RESOURCES", lambda e: e.resources),
    ("PROBLEM", lambda e: e.problem),
]
RESOURCE_COLUMNS = [
    ("ID", lambda r: r.id),
    ("MAC", lambda r: r.mac),
    ("IP", lambda r: r.ip),
    ("HOSTNAME", lambda r: r.hostname),
    ("KIND", lambda r: r.kind),
    ("STATE", lambda r: r.state),
    ("VE", lambda r: r.ve),
    ("CPUS", lambda r: r.cpus),
    ("MEMORY MB", lambda r: r.memory_mb),
    ("LAST SEEN", lambda r: r.last_seen),
]
EVENT_COLUMNS = [
    ("TIME", lambda e: e.time),
    ("ACTOR", lambda e: e.actor),
    ("OBJECT", lambda e: f"{e.object_type}:{e.object_name}" if e.object_name else e.object_type),
    ("LEVEL", lambda e: e.level),
    ("MESSAGE", lambda e: e.message),
]
PLUGIN_COLUMNS = [
    ("NAME", lambda p: p.name),
    ("KIND", lambda p: p.kind),
    ("VERSION", lambda p: p.version),
    ("DISTRIBUTION", lambda p: p.distribution),
    ("STATUS", lambda p: p.status),
    (
        "PROBLEM",
        lambda p: (
            p.error
            or (f"disabled with plugin {p.disabled_by}" if p.disabled_by else "")
            or (("missing: " + ", ".join(p.missing)) if p.missing else "")
        ),
    ),
]
PARTITION_COLUMNS = [
    ("NAME", lambda p: p.name),
    ("HOST", lambda p: p.host),
    ("HYPERVISOR", lambda p: p.hypervisor),
    ("CPUS", lambda p: p.cpus),
    ("MEMORY MB", lambda p: p.memory_mb),
    ("MAC", lambda p: p.mac),
    ("STATE", lambda p: p.state),
    ("VE", lambda p: p.ve),
]
USER_COLUMNS = [
    ("NAME", lambda u: u.name),
    ("ROLE", lambda u: u.role),
    ("CREATED", lambda u: u.created_at),
]
TOKEN_COLUMNS = [
    ("ID", lambda t: t.id),
    ("NAME", lambda t: t.name),
    ("USER", lambda t: t.user),
    ("CREATED", lambda t: t.created_at),
    ("LAST USED", lambda t: t.last_used),
]


def token_id(text: str) -> int:
    """An API token's id as typed: the number ``qrm token list`` shows."""
    from qrm_core.services.tokens import MAX_ID

    value = text.strip()
    if not value.isdecimal() or not 1 <= int(value) <= MAX_ID:
        raise InvalidInput(f"invalid API token id {text!r}: use the number 'qrm token list' shows")
    return int(value)


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


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
        user: Annotated[str | None, typer.Option("-u", "--user", help="user for --server")] = None,
        password: Annotated[
            str | None, typer.Option("-p", "--password", help="password for --server")
        ] = None,
        token: Annotated[str | None, typer.Option("--token", help="API token for --server")] = None,
        version: Annotated[
            bool,
            typer.Option(
                "--version", help="print the version and exit", is_eager=True, callback=show_version
            ),
        ] = False,
    ) -> None:
        ctx.obj = CliState(settings, server=server, user=user, password=password, token=token)

    # -- init ------------------------------------------------------------

    @app.command("init")
    def init_cmd(
        ctx: typer.Context,
        admin_password: Annotated[
            str | None,
            typer.Option("--admin-password", help="password of the admin user 'qrm' (default: qrm)"),
        ] = None,
        output: OutputOpt = Output.table,
    ) -> None:
        """Create or upgrade the database schema and the admin user."""
        result = _client(ctx).init(admin_password)
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

    # -- storage ---------------------------------------------------------

    storage_app = typer.Typer(help="Storage servers that export filesystem images.", no_args_is_help=True)
    app.add_typer(storage_app, name="storage")

    @storage_app.command("add")
    def storage_add(
        ctx: typer.Context,
        name: Annotated[str, typer.Option("-n", "--name", help="name of the storage server")],
        type: Annotated[str, typer.Option("-t", "--type", help="storage type (driver name, e.g. nfs)")],
        ip: Annotated[str, typer.Option("-i", "--ip", help="IP address of the storage server")],
        comment: Annotated[str | None, typer.Option("-c", "--comment", help="free text")] = None,
        output: OutputOpt = Output.table,
    ) -> None:
        """Add a storage server."""
        result = _client(ctx).storage_add(name, type, ip, comment)
        done(result, f"added storage server {result.name} ({result.type} at {result.address})", output)

    @storage_app.command("list")
    def storage_list(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
        """List storage servers."""
        show_list(_client(ctx).storage_list(), STORAGE_COLUMNS, output, "Storage servers")

    @storage_app.command("show")
    def storage_show(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
        """Show one storage server."""
        show_one(_client(ctx).storage_show(name), output)

    @storage_app.command("remove")
    def storage_remove(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
        """Remove a storage server that holds no filesystem images."""
        result = _client(ctx).storage_remove(name)
        done(result, f"removed storage server {result.name}", output)

    # -- boot images -----------------------------------------------------

    boot_app = typer.Typer(help="Boot images: kernel + initrd with the qrm node agent.", no_args_is_help=True)
    app.add_typer(boot_app, name="boot-image")

    @boot_app.command("add")
    def boot_add(
        ctx: typer.Context,
        name: Annotated[str, typer.Option("-n", "--name", help="name of the boot image")],
        kernel_version: Annotated[str, typer.Option("-k", "--kernel-version", help="kernel version")],
        kernel: Annotated[
            Path | None, typer.Option("--kernel", help="kernel file to store", dir_okay=False)
        ] = None,
        initrd: Annotated[
            Path | None, typer.Option("--initrd", help="initrd file to store", dir_okay=False)
        ] = None,
        cmdline: Annotated[str | None, typer.Option("--cmdline", help="default kernel arguments")] = None,
        default: Annotated[bool, typer.Option("--default", help="make it the default boot image")] = False,
        comment: Annotated[str | None, typer.Option("-c", "--comment")] = None,
        output: OutputOpt = Output.table,
    ) -> None:
        """Record a boot image, storing its kernel and initrd if given."""
        result = _client(ctx).boot_image_add(
            name=name,
            kernel_version=kernel_version,
            kernel=str(kernel) if kernel else None,
            initrd=str(initrd) if initrd else None,
            cmdline=cmdline,
            make_default=default,
            comment=comment,
        )
        message(
            f"added boot image {result.name} (kernel {result.kernel_version})"
            + (", the default" if result.is_default else ""),
            output,
        )
        if output is Output.json:
            show_one(result, output)

    from qrm_core.cli.boot_build import register as register_boot_build

    register_boot_build(boot_app)

    @boot_app.command("list")
    def boot_list(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
        """List boot images."""
        show_list(_client(ctx).boot_image_list(), BOOT_COLUMNS, output, "Boot images")

    @boot_app.command("show")
    def boot_show(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
        """Show one boot image."""
        show_one(_client(ctx).boot_image_show(name), output)

    @boot_app.command("set-default")
    def boot_default(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
        """Make a boot image the one idle machines boot."""
        result = _client(ctx).boot_image_set_default(name)
        done(result, f"boot image {result.name} is the default", output)

    @boot_app.command("remove")
    def boot_remove(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
        """Remove a boot image no virtual environment uses."""
        result = _client(ctx).boot_image_remove(name)
        done(result, f"removed boot image {result.name}", output)

    # -- filesystem images ----------------------------------------------

    fs_app = typer.Typer(help="Filesystem images on storage servers.", no_args_is_help=True)
    app.add_typer(fs_app, name="filesystem-image")

    @fs_app.command("add")
    def fs_add(
        ctx: typer.Context,
        name: Annotated[str, typer.Option("-n", "--name", help="name of the filesystem image")],
        storage: Annotated[str, typer.Option("-s", "--storage", help="storage server holding it")],
        location: Annotated[
            str | None, typer.Option("-l", "--location", help="existing volume (export path, target)")
        ] = None,
        size: Annotated[
            int | None, typer.Option("--size", help="create a new empty volume of this many MB instead")
        ] = None,
        comment: Annotated[str | None, typer.Option("-c", "--comment")] = None,
        output: OutputOpt = Output.table,
    ) -> None:
        """Add a filesystem image: an existing volume (-l) or a new empty one (--size)."""
        result = _client(ctx).fs_image_add(
            name=name, storage=storage, location=location, size_mb=size, comment=comment
        )
        done(result, f"added filesystem image {result.name} ({result.storage}:{result.location})", output)

    @fs_app.command("list")
    def fs_list(
        ctx: typer.Context,
        storage: Annotated[
            str | None, typer.Option("-s", "--storage", help="only this storage server")
        ] = None,
        output: OutputOpt = Output.table,
    ) -> None:
        """List filesystem images."""
        show_list(_client(ctx).fs_image_list(storage), FS_COLUMNS, output, "Filesystem images")

    @fs_app.command("show")
    def fs_show(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
        """Show one filesystem image."""
        show_one(_client(ctx).fs_image_show(name), output)

    @fs_app.command("remove")
    def fs_remove(
        ctx: typer.Context,
        name: str,
        purge: Annotated[bool, typer.Option("--purge", help="also destroy the volume and its data")] = False,
        output: OutputOpt = Output.table,
    ) -> None:
        """Remove a filesystem image no virtual environment uses."""
        result = _client(ctx).fs_image_remove(name, purge)
        done(result, f"removed filesystem image {result.name}" + (" and its volume" if purge else ""), output)

    # -- virtual environments -------------------------------------------

    ve_app = typer.Typer(
        help="Virtual environments: boot image + filesystem image + requirements.", no_args_is_help=True
    )
    app.add_typer(ve_app, name="ve")

    @ve_app.command("create")
    def ve_create(
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
        kernel_args: Annotated[
            str | None, typer.Option("--kernel-args", help="extra kernel arguments")
        ] = None,
        comment: Annotated[str | None, typer.Option("-c", "--comment")] = None,
        output: OutputOpt = Output.table,
    ) -> None:
        """Define a virtual environment (it is created stopped)."""
        result = _client(ctx).ve_create(
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
        )
        done(result, f"created virtual environment {result.name} ({result.deployment})", output)

    @ve_app.command("list")
    def ve_list(
        ctx: typer.Context,
        state: Annotated[str | None, typer.Option("--state", help="only VEs in this state")] = None,
        output: OutputOpt = Output.table,
    ) -> None:
        """List virtual environments."""
        show_list(_client(ctx).ve_list(state), VE_COLUMNS, output, "Virtual environments")

    @ve_app.command("show")
    def ve_show(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
        """Show one virtual environment, with why it cannot be placed if so."""
        show_one(_client(ctx).ve_show(name), output)

    @ve_app.command("remove")
    def ve_remove(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
        """Remove a stopped virtual environment."""
        result = _client(ctx).ve_remove(name)
        done(result, f"removed virtual environment {result.name}", output)

    @ve_app.command("start")
    def ve_start(
        ctx: typer.Context,
        name: str,
        wait: WaitOpt = False,
        timeout: TimeoutOpt = 600.0,
        output: OutputOpt = Output.table,
    ) -> None:
        """Start a virtual environment: idle resources are chosen and rebooted into it."""
        client = _client(ctx)
        result = client.ve_start(name)
        if wait:
            result = wait_for_ve(client, name, "running", timeout, output)
        done(result, f"virtual environment {result.name} is {result.state}", output)

    @ve_app.command("stop")
    def ve_stop(
        ctx: typer.Context,
        name: str,
        wait: WaitOpt = False,
        timeout: TimeoutOpt = 600.0,
        output: OutputOpt = Output.table,
    ) -> None:
        """Stop a virtual environment: its resources reboot into the idle image."""
        client = _client(ctx)
        result = client.ve_stop(name)
        if wait:
            result = wait_for_ve(client, name, "stopped", timeout, output)
        done(result, f"virtual environment {result.name} is {result.state}", output)

    @ve_app.command("resize")
    def ve_resize(
        ctx: typer.Context,
        name: str,
        pool_size: Annotated[int, typer.Option("--pool-size", help="new number of resources")],
        output: OutputOpt = Output.table,
    ) -> None:
        """Change the pool size of a shared virtual environment."""
        result = _client(ctx).ve_resize(name, pool_size)
        done(result, f"virtual environment {result.name} now wants {result.pool_size} resources", output)

    # -- resources -------------------------------------------------------

    resource_app = typer.Typer(help="Resources: the machines qrm boots.", no_args_is_help=True)
    app.add_typer(resource_app, name="resource")

    @resource_app.command("add")
    def resource_add(
        ctx: typer.Context,
        mac: Annotated[str, typer.Option("-m", "--mac", help="MAC address of the boot NIC")],
        ip: Annotated[str | None, typer.Option("-i", "--ip", help="IP address")] = None,
        hostname: Annotated[str | None, typer.Option("--hostname", help="host name")] = None,
        kind: Annotated[str, typer.Option("--kind", help="physical or virtual")] = "physical",
        host: Annotated[str | None, typer.Option("--host", help="host resource of a virtual one")] = None,
        hypervisor: Annotated[
            str | None, typer.Option("--hypervisor", help="hypervisor of a virtual one")
        ] = None,
        cpus: Annotated[int, typer.Option("--cpus")] = 0,
        memory: Annotated[int, typer.Option("--memory", help="memory in MB")] = 0,
        comment: Annotated[str | None, typer.Option("-c", "--comment")] = None,
        output: OutputOpt = Output.table,
    ) -> None:
        """Enter a machine by hand before it first network-boots."""
        result = _client(ctx).resource_add(
            mac=mac,
            ip=ip,
            hostname=hostname,
            kind=kind,
            host=host,
            hypervisor=hypervisor,
            cpus=cpus,
            memory_mb=memory,
            comment=comment,
        )
        done(result, f"added resource {result.id} ({result.mac})", output)

    @resource_app.command("list")
    def resource_list(
        ctx: typer.Context,
        state: Annotated[str | None, typer.Option("--state", help="only resources in this state")] = None,
        kind: Annotated[str | None, typer.Option("--kind", help="physical or virtual")] = None,
        ve: Annotated[str | None, typer.Option("--ve", help="only resources serving this VE")] = None,
        offset: Annotated[int, typer.Option("--offset", help="skip this many")] = 0,
        limit: Annotated[int | None, typer.Option("--limit", help="show at most this many")] = None,
        output: OutputOpt = Output.table,
    ) -> None:
        """List resources."""
        page = _client(ctx).resource_list(state, kind, ve, offset, limit)
        show_list(page.items, RESOURCE_COLUMNS, output, "Resources")
        if output is Output.table and page.total > len(page.items):
            message(f"({len(page.items)} of {page.total} shown)")

    @resource_app.command("show")
    def resource_show(
        ctx: typer.Context,
        mac_or_id: Annotated[str, typer.Argument(metavar="MAC_OR_ID")],
        output: OutputOpt = Output.table,
    ) -> None:
        """Show one resource (by id, MAC or hostname) with its health."""
        result = _client(ctx).resource_show(mac_or_id)
        show_one(result, output)
        if output is Output.table and result.health:
            show_list(
                result.health,
                [
                    ("SOURCE", lambda h: h.source),
                    ("STATUS", lambda h: h.status),
                    ("MESSAGE", lambda h: h.message),
                ],
                output,
                "Health",
            )

    @resource_app.command("remove")
    def resource_remove(
        ctx: typer.Context,
        mac_or_id: Annotated[str, typer.Argument(metavar="MAC_OR_ID")],
        output: OutputOpt = Output.table,
    ) -> None:
        """Remove a resource that serves no virtual environment."""
        result = _client(ctx).resource_remove(mac_or_id)
        done(result, f"removed resource {result.id} ({result.mac})", output)

    @resource_app.command("reboot")
    def resource_reboot(
        ctx: typer.Context,
        mac_or_id: Annotated[str, typer.Argument(metavar="MAC_OR_ID")],
        output: OutputOpt = Output.table,
    ) -> None:
        """Reboot a resource at its next heartbeat (into whatever it should boot now)."""
        result = _client(ctx).resource_reboot(mac_or_id)
        done(result, f"reboot ordered for resource {result.id} ({result.mac})", output)

    @resource_app.command("halt")
    def resource_halt(
        ctx: typer.Context,
        mac_or_id: Annotated[str, typer.Argument(metavar="MAC_OR_ID")],
        output: OutputOpt = Output.table,
    ) -> None:
        """Power a resource off at its next heartbeat (it must serve no VE)."""
        result = _client(ctx).resource_halt(mac_or_id)
        done(result, f"halt ordered for resource {result.id} ({result.mac})", output)

    partition_app = typer.Typer(
        help="Partitions: VMs the engine created on hypervisor hosts.", no_args_is_help=True
    )
    app.add_typer(partition_app, name="partition")

    @partition_app.command("list")
    def partition_list(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
        """List partitions."""
        show_list(_client(ctx).partition_list(), PARTITION_COLUMNS, output, "Partitions")

    @partition_app.command("remove")
    def partition_remove(
        ctx: typer.Context,
        name: str,
        host: Annotated[
            str | None, typer.Option("--host", help="host resource, if the name is not unique")
        ] = None,
        output: OutputOpt = Output.table,
    ) -> None:
        """Destroy a partition (its VM) that serves no virtual environment."""
        result = _client(ctx).partition_remove(name, host)
        done(result, f"destroyed partition {result.name} on {result.host}", output)

    # -- events ----------------------------------------------------------

    @app.command("events")
    def events_cmd(
        ctx: typer.Context,
        limit: Annotated[int, typer.Option("--limit", "-l", help="how many of the newest events")] = 20,
        follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new events")] = False,
        output: OutputOpt = Output.table,
    ) -> None:
        """Show the newest events of the audit log."""
        client = _client(ctx)
        shown = client.events(limit, None)
        if not follow:
            show_list(shown, EVENT_COLUMNS, output, "Events")
            return
        follow_events(client, shown, output)

    # -- server and site --------------------------------------------------

    @app.command("server")
    def server_cmd(
        ctx: typer.Context,
        host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="port to listen on")] = 8080,
    ) -> None:
        """Serve the REST API, the node-agent protocol and the engine (foreground)."""
        from qrm_core.plugins import get_plugin_system
        from qrm_core.server import serve

        state: CliState = ctx.ensure_object(CliState)
        if state.remote:
            raise InvalidInput("qrm server runs here; --server makes no sense with it")
        serve(state.settings, get_plugin_system(state.settings), host, port)

    site_app = typer.Typer(help="Site-wide settings.", no_args_is_help=True)
    app.add_typer(site_app, name="site")

    @site_app.command("enrollment-token")
    def site_token(ctx: typer.Context) -> None:
        """Print the token booting machines register with (qrm.enroll=)."""
        typer.echo(_client(ctx).enrollment_token())

    # -- lab ---------------------------------------------------------------

    lab_app = typer.Typer(
        help="A data center in a box: simulated agents, QEMU machines.", no_args_is_help=True
    )
    app.add_typer(lab_app, name="lab")
    from qrm_core.cli.lab import register as register_lab  # up, down, status, console, vm (QEMU lab)

    register_lab(lab_app)

    @lab_app.command("simulate")
    def lab_simulate(
        ctx: typer.Context,
        nodes: Annotated[int, typer.Option("--nodes", "-n", help="simulated machines")] = 10,
        hypervisor_hosts: Annotated[
            int,
            typer.Option("--hypervisor-hosts", help="extra machines that host fake-hypervisor partitions"),
        ] = 0,
        cpus: Annotated[int, typer.Option("--cpus")] = 2,
        memory: Annotated[int, typer.Option("--memory", help="MB per machine")] = 2048,
        duration: Annotated[
            float | None, typer.Option("--duration", help="seconds to run (default: until Ctrl-C)")
        ] = None,
        reboot_delay: Annotated[float, typer.Option("--reboot-delay", help="seconds a reboot takes")] = 1.0,
        enroll: Annotated[
            str | None, typer.Option("--enroll", help="enrollment token (default: ask the site)")
        ] = None,
        sim_server: Annotated[str | None, typer.Option("--agent-url", help="server URL agents use")] = None,
    ) -> None:
        """Run N simulated node agents against a qrm server (real HTTP, real protocol)."""
        import asyncio

        from qrm_core.lab.simulate import Simulation, node_specs

        state: CliState = ctx.ensure_object(CliState)
        url = sim_server or state.server or state.settings.server_url or "http://127.0.0.1:8080"
        token = enroll or _client(ctx).enrollment_token()
        if nodes < 0 or hypervisor_hosts < 0 or nodes + hypervisor_hosts == 0:
            raise InvalidInput("simulate at least one machine")
        sim = Simulation(url, token, reboot_delay=reboot_delay, fake_state_dir=state.settings.state_dir)
        specs = node_specs(nodes, cpus=cpus, memory_mb=memory, hypervisor_hosts=hypervisor_hosts)
        message(f"simulating {len(specs)} machines against {url} (Ctrl-C to stop)")
        try:
            stats = asyncio.run(sim.run(specs, duration=duration))
        except KeyboardInterrupt:
            stats = sim.stats
        message(
            f"registrations {stats.registrations}, heartbeats {stats.heartbeats}, reboots {stats.reboots}, "
            f"halts {stats.halts}, errors {stats.errors}"
        )

    # -- users -----------------------------------------------------------

    user_app = typer.Typer(help="Users of the console and the API.", no_args_is_help=True)
    app.add_typer(user_app, name="user")

    @user_app.command("add")
    def user_add(
        ctx: typer.Context,
        name: Annotated[str, typer.Option("-n", "--name")],
        password: Annotated[
            str, typer.Option("-p", "--password", prompt=True, hide_input=True, confirmation_prompt=True)
        ],
        role: Annotated[str, typer.Option("-r", "--role", help="admin, operator or viewer")] = "viewer",
        output: OutputOpt = Output.table,
    ) -> None:
        """Add a user."""
        result = _client(ctx).user_add(name, password, role)
        done(result, f"added user {result.name} ({result.role})", output)

    @user_app.command("list")
    def user_list(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
        """List users."""
        show_list(_client(ctx).user_list(), USER_COLUMNS, output, "Users")

    @user_app.command("passwd")
    def user_passwd(
        ctx: typer.Context,
        name: str,
        password: Annotated[
            str, typer.Option("-p", "--password", prompt=True, hide_input=True, confirmation_prompt=True)
        ],
        output: OutputOpt = Output.table,
    ) -> None:
        """Set a user's password."""
        result = _client(ctx).user_passwd(name, password)
        done(result, f"changed the password of {result.name}", output)

    @user_app.command("remove")
    def user_remove(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
        """Remove a user (not the last admin)."""
        result = _client(ctx).user_remove(name)
        done(result, f"removed user {result.name}", output)

    # -- API tokens ------------------------------------------------------

    token_app = typer.Typer(
        help="API tokens: bearer secrets for --token and the REST API.", no_args_is_help=True
    )
    app.add_typer(token_app, name="token")

    @token_app.command("create")
    def token_create(
        ctx: typer.Context,
        name: Annotated[str, typer.Option("-n", "--name", help="a name to tell the token by")],
        user: Annotated[
            str | None, typer.Option("--user", help="whose token (default: yours; others' need admin)")
        ] = None,
        output: OutputOpt = Output.table,
    ) -> None:
        """Create an API token; it is printed this once and cannot be shown again."""
        result = _client(ctx).token_create(name, user)
        if output is Output.json:
            show_one(result, output)
            return
        message(f"created API token {result.name} (id {result.id}) for {result.user}; it is shown only now:")
        typer.echo(result.token)

    @token_app.command("list")
    def token_list(
        ctx: typer.Context,
        user: Annotated[
            str | None, typer.Option("--user", help="this user's tokens (default: yours; others' need admin)")
        ] = None,
        all_users: Annotated[bool, typer.Option("--all", help="every user's tokens (admin)")] = False,
        output: OutputOpt = Output.table,
    ) -> None:
        """List API tokens (never their secrets)."""
        show_list(_client(ctx).token_list(user, all_users), TOKEN_COLUMNS, output, "API tokens")

    @token_app.command("revoke")
    def token_revoke(
        ctx: typer.Context,
        id_text: Annotated[str, typer.Argument(metavar="ID", help="the token's id (qrm token list)")],
        output: OutputOpt = Output.table,
    ) -> None:
        """Revoke an API token (yours; an admin: anyone's). It stops working at once."""
        result = _client(ctx).token_revoke(token_id(id_text))
        done(result, f"revoked API token {result.name} (id {result.id}) of {result.user}", output)

    # -- plugins ---------------------------------------------------------

    plugins_app = typer.Typer(help="Installed plugins and drivers.", no_args_is_help=True)
    app.add_typer(plugins_app, name="plugins")

    @plugins_app.command("list")
    def plugins_list(ctx: typer.Context, output: OutputOpt = Output.table) -> None:
        """List every installed plugin and driver: version, state, and why it is broken."""
        show_list(_client(ctx).plugins_list(), PLUGIN_COLUMNS, output, "Plugins")

    @plugins_app.command("enable")
    def plugins_enable(ctx: typer.Context, name: str) -> None:
        """Enable a plugin or driver (persists)."""
        changed = _client(ctx).plugins_set_enabled(name, True)
        message(f"enabled {name}" if changed else f"{name} is already enabled")

    @plugins_app.command("disable")
    def plugins_disable(ctx: typer.Context, name: str) -> None:
        """Disable a plugin or driver (persists); a disabled plugin's code is not loaded."""
        changed = _client(ctx).plugins_set_enabled(name, False)
        message(f"disabled {name}" if changed else f"{name} is already disabled")

    if with_plugins:
        _add_plugin_commands(app, settings)
    return app


def wait_for_ve(client: Client, name: str, goal: str, timeout: float, output: Output) -> Any:
    """Poll a VE until it reaches ``goal``, with a progress line for people."""
    import time

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


def follow_events(client: Client, shown: list[Any], output: Output) -> None:
    """Print events as they are recorded, one line each, until Ctrl-C."""
    import json
    import time

    from qrm_core.cli.output import to_jsonable

    def emit(event: Any) -> None:
        if output is Output.json:
            sys.stdout.write(json.dumps(to_jsonable(event)) + "\n")
        else:
            obj = f"{event.object_type}:{event.object_name}" if event.object_name else event.object_type
            sys.stdout.write(
                f"{event.time:%Y-%m-%d %H:%M:%S} {event.actor} {obj} {event.level} {event.message}\n"
            )
        sys.stdout.flush()

    last_id = 0
    for event in shown:
        emit(event)
        last_id = max(last_id, event.id)
    try:
        while True:
            time.sleep(1.0)
            for event in client.events(1000, last_id):
                emit(event)
                last_id = max(last_id, event.id)
    except KeyboardInterrupt:
        return


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
    configure_logging(settings)
    try:
        app = build_app(settings)
        command = typer.main.get_command(app)
        result: Any = command.main(args=argv, prog_name="qrm", standalone_mode=False)
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
        _error(f"internal error ({type(exc).__name__}: {exc}); details in {log_file(settings)}")
        return 70
    return result if isinstance(result, int) else 0


def run() -> None:
    sys.exit(main())
