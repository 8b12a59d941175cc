"""``qrm dhcpd``: look at, rewrite and check the DHCP server qrm keeps in step."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from qrm_core.plugin_api import InvalidInput, Output, get_settings, message, print_json, show_one
from qrm_dhcpd.settings import load_settings, require_configured

if TYPE_CHECKING:
    from qrm_dhcpd.backends import Backend

app = typer.Typer(help="The DHCP server (Kea or ISC dhcpd) that qrm keeps in step.", no_args_is_help=True)

OutputOpt = Annotated[
    Output, typer.Option("--output", "-o", help="table for people, json for programs", case_sensitive=False)
]


def _backend() -> Backend:
    from qrm_dhcpd.backends import get_backend

    return get_backend(require_configured(load_settings()), get_settings())


@app.command("show")
def show_cmd() -> None:
    """Print the configuration qrm would write now (from the database; nothing is changed; secrets left out)."""
    backend = _backend()
    hosts = backend.host_set()
    sys.stdout.write(backend.render_text(hosts, reveal=False))
    for problem in hosts.problems:
        sys.stderr.write(f"warning: {problem}\n")


@app.command("sync")
def sync_cmd(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="render and check only; change nothing")] = False,
    output: OutputOpt = Output.table,
) -> None:
    """Rewrite the whole configuration from the database (checked, atomic) and update the running server."""
    report = _backend().full_sync(dry_run=dry_run)
    if output is Output.json:
        print_json(report.to_dict())
        return
    for problem in report.problems:
        sys.stderr.write(f"warning: {problem}\n")
    total = report.timings.get("total", sum(report.timings.values()))
    message(f"{report.check}")
    message(
        f"{'checked' if dry_run else 'wrote'} {report.path} with {report.hosts} reservations "
        f"in {total:.3f} s; {report.applied}"
    )


@app.command("status")
def status_cmd(output: OutputOpt = Output.table) -> None:
    """Show the backend, its files, and whether the server answers."""
    settings = load_settings()
    if not settings.configured:
        facts = {"configured": False, "backend": settings.backend}
    else:
        facts = {"configured": True, **_backend().status()}
    show_one(facts, output)


@app.command("db-init")
def db_init_cmd() -> None:
    """Create Kea's schema in the hosts database (QRM_DHCPD_KEA_HOSTS_DATABASE; the database must exist)."""
    settings = load_settings()
    if settings.backend != "kea" or settings.kea_hosts_database is None:
        raise InvalidInput("db-init needs QRM_DHCPD_BACKEND=kea and QRM_DHCPD_KEA_HOSTS_DATABASE")
    from qrm_dhcpd.keadb import db_init

    result = db_init(settings.kea_hosts_database.get_secret_value(), settings.kea_admin)
    message(f"Kea hosts database ready: {result}")
