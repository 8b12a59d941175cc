"""``qrm tftpd``: the TFTP service in the foreground, a pre-flight check, and the generated files.

qrm tftpd                          # serve until SIGTERM or Ctrl-C
qrm tftpd --port 6969 --root DIR   # options override QRM_TFTPD_*
qrm tftpd --check [--mac MAC]      # what is missing, what a MAC would boot
qrm tftpd render MAC               # the iPXE script and pxelinux config of a MAC
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="TFTP service: iPXE/pxelinux boot loaders and per-MAC boot scripts from the qrm database.",
    no_args_is_help=False,
)

_overrides: dict[str, Any] = {}


def _settings() -> tuple[Any, Any]:
    from qrm_core.plugin_api import get_settings
    from qrm_tftpd.settings import load_settings

    return get_settings(), load_settings(**_overrides)


@app.callback(invoke_without_command=True)
def tftpd(
    ctx: typer.Context,
    listen: Annotated[str | None, typer.Option("--listen", help="IPv4 address to listen on")] = None,
    port: Annotated[int | None, typer.Option("--port", help="UDP port (69)")] = None,
    root: Annotated[Path | None, typer.Option("--root", help="static files directory")] = None,
    source: Annotated[
        str | None, typer.Option("--source", help="local (database) or remote (qrm server)")
    ] = None,
    server_url: Annotated[
        str | None, typer.Option("--server-url", help="qrm server URL for HTTP kernels and remote")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="report what is missing and what would be served; do not serve")
    ] = False,
    mac: Annotated[str | None, typer.Option("--mac", help="with --check: what this MAC would boot")] = None,
) -> None:
    """Run the TFTP service in the foreground until SIGTERM or Ctrl-C."""
    _overrides.clear()
    _overrides.update(listen_address=listen, port=port, root=root, source=source, server_url=server_url)
    if ctx.invoked_subcommand is not None:
        return
    if mac is not None and not check:
        raise typer.BadParameter("--mac goes with --check (or use 'qrm tftpd render MAC')")
    if check:
        raise typer.Exit(run_check(mac))
    serve()


def serve() -> None:
    from qrm_tftpd.service import TftpService

    settings, tftp = _settings()
    service = TftpService(settings, tftp)
    service.start()
    address, bound = service.address
    typer.echo(
        f"qrm tftpd: serving {service.root()} on {address}:{bound} "
        f"(boot configurations: {service.source.describe() if service.source else '?'}); "
        "SIGTERM or Ctrl-C stops"
    )
    sys.stdout.flush()

    def on_signal(signum: int, _frame: Any) -> None:
        if service.server is not None:
            service.server.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        service.wait()
    finally:
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stats = service.server.stats if service.server else None
    if stats is not None:
        typer.echo(
            f"qrm tftpd: stopped after {stats.requests} requests, {stats.completed} transfers, "
            f"{stats.errors} errors"
        )


def _port_problem(address: str, port: int) -> str | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((address, port))
    except PermissionError:
        return "permission denied (port below 1024 needs root or CAP_NET_BIND_SERVICE)"
    except OSError as exc:
        return f"cannot bind: {exc.strerror}"
    finally:
        sock.close()
    return None


def run_check(mac: str | None) -> int:
    """Print the pre-flight report; 0 if everything needed is there, 1 otherwise."""
    from qrm_core.plugin_api import QrmError, check_listen
    from qrm_tftpd.service import make_resolver, make_source

    settings, tftp = _settings()
    problems = 0

    def line(label: str, value: str, problem: str | None = None) -> None:
        nonlocal problems
        if problem:
            problems += 1
            typer.echo(f"{label:<16}{value}  PROBLEM: {problem}")
        else:
            typer.echo(f"{label:<16}{value}")

    address = tftp.address(settings)
    port_problem = _port_problem(address, tftp.port)
    if port_problem and "in use" in port_problem.lower():
        port_problem += " (a running qrm tftpd or another TFTP server?)"
    if not port_problem and tftp.source == "local":
        try:
            check_listen(settings, address, service="tftpd")
        except QrmError as exc:
            port_problem = exc.message
    line("listen", f"{address}:{tftp.port}", port_problem)
    root = tftp.root_dir(settings)
    line("root", f"{root} ({'exists' if root.is_dir() else 'created on start'})")
    server_url = tftp.effective_server_url(settings)
    line(
        "kernels",
        f"HTTP from {server_url}, TFTP as fallback"
        if server_url
        else "over TFTP only (set QRM_SERVER_URL or QRM_TFTPD_SERVER_URL for HTTP)",
    )
    source = make_source(settings, tftp)
    source_ok = False
    try:
        source.check()
        source_ok = True
        line("boot configs", source.describe())
    except QrmError as exc:
        line("boot configs", source.describe(), exc.message)
    resolver = make_resolver(settings, tftp, source)
    typer.echo("boot loaders:")
    for name, where, problem in resolver.loader_report():
        line(f"  {name}", where, problem)
    if tftp.source == "local" and source_ok:
        _report_boot_images(settings, line)
    if mac is not None and source_ok:
        _report_mac(resolver, source, mac, line)
    typer.echo("ok" if not problems else f"{problems} problem(s)")
    return 0 if not problems else 1


def _report_boot_images(settings: Any, line: Any) -> None:
    from qrm_core.plugin_api import list_boot_images, service_context

    with service_context(settings, actor="tftpd") as ctx:
        images = list_boot_images(ctx)
    if not images:
        line("boot images", "none", "no boot image: add one with 'qrm boot-image add ... --default'")
        return
    typer.echo("boot images:")
    for image in images:
        missing = [
            what
            for what, path in (("vmlinuz", image.kernel_path), ("initrd", image.initrd_path))
            if not path or not os.path.isfile(path)
        ]
        label = f"  {image.name}" + (" *" if image.is_default else "")
        line(
            label,
            f"boot/{image.name}/vmlinuz, initrd",
            f"no file for {', '.join(missing)}" if missing else None,
        )


def _report_mac(resolver: Any, source: Any, mac: str, line: Any) -> None:
    from qrm_core.plugin_api import QrmError, validation
    from qrm_tftpd import render

    try:
        mac = validation.mac(mac)
        config = source.boot_config(mac)
    except QrmError as exc:
        line("for MAC", mac, exc.message)
        return
    typer.echo(f"for {mac}:")
    line("  mode", config.mode + (f" (VE {config.ve})" if config.ve else ""))
    if config.mode == "none":
        line("  boots", "nothing", config.message)
        return
    line("  boot image", str(config.boot_image))
    line("  kernel", config.kernel_url or f"tftp {config.kernel_name}")
    line("  initrd", config.initrd_url or f"tftp {config.initrd_name}")
    line("  cmdline", config.cmdline)
    line("  files", f"ipxe/{render.hexhyp(mac)}.ipxe, pxelinux.cfg/01-{render.hexhyp(mac)}")
    try:
        render.ipxe_script(config)
    except QrmError as exc:
        line("  script", "cannot be written", exc.message)


@app.command("render")
def render_cmd(
    mac: Annotated[str, typer.Argument(help="the machine's MAC address")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="ipxe, pxelinux or all", case_sensitive=False)
    ] = "all",
) -> None:
    """Print the iPXE script and pxelinux config this MAC gets now (as served over TFTP)."""
    from qrm_core.plugin_api import InvalidInput, validation
    from qrm_tftpd import render
    from qrm_tftpd.service import make_resolver, make_source

    fmt = fmt.lower()
    if fmt not in ("ipxe", "pxelinux", "all"):
        raise InvalidInput(f"invalid --format {fmt!r}: use ipxe, pxelinux or all")
    mac = validation.mac(mac)
    settings, tftp = _settings()
    source = make_source(settings, tftp)
    source.check()
    resolver = make_resolver(settings, tftp, source)
    names = []
    if fmt in ("ipxe", "all"):
        names.append(f"ipxe/{render.hexhyp(mac)}.ipxe")
    if fmt in ("pxelinux", "all"):
        names.append(f"pxelinux.cfg/01-{render.hexhyp(mac)}")
    for index, name in enumerate(names):
        content = resolver.resolve(name)
        if fmt == "all":
            typer.echo(("\n" if index else "") + f"### {name}")
        typer.echo(content.read_all().decode(), nl=False)
