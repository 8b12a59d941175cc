"""``qrm nagios``: look at and resynchronise the Nagios that qrm keeps in step."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from qrm_core.plugin_api import (
    NotFound,
    Output,
    get_settings,
    message,
    print_json,
    show_list,
    show_one,
    show_resource,
    show_storage,
)
from qrm_nagios.settings import NagiosSettings, load_settings, require_configured

app = typer.Typer(help="The Nagios 4 that monitors qrm's machines.", no_args_is_help=True)

OutputOpt = Annotated[
    Output, typer.Option("--output", "-o", help="table for people, json for programs", case_sensitive=False)
]


def _settings() -> NagiosSettings:
    return require_configured(load_settings())


@app.command("status")
def status_cmd(output: OutputOpt = Output.table) -> None:
    """Show the mode, the files, whether Nagios runs, and how qrm's hosts are."""
    settings = load_settings()
    if not settings.configured:
        show_one({"configured": False, "mode": settings.mode}, output)
        return
    from qrm_nagios import control, health, render
    from qrm_nagios.store import ObjectStore

    core = get_settings()
    store = ObjectStore(settings, core)
    files = store.files()
    command_file = store.command_file()
    status_file = store.status_file()
    facts: dict[str, Any] = {
        "configured": True,
        "mode": settings.mode,
        "main config": str(store.paths.main_config),
        "object dir": str(store.root),
        "object files": len(files),
        "command file": str(command_file),
        "status file": str(status_file),
        "running": bool(command_file and control.reader_present(command_file)),
    }
    status = health.reader(status_file).read() if status_file else None
    if status is not None:
        facts["nagios pid"] = status.pid
        facts["started"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(status.program_start)) + " UTC"
        facts["status age (s)"] = round(time.time() - status.created, 1)
        counts: dict[str, int] = {}
        problems: list[str] = []
        ours = 0
        for name, host in sorted(status.hosts.items()):
            if render.label_of(settings, name) is None:
                continue
            ours += 1
            counts[host.state_name] = counts.get(host.state_name, 0) + 1
            if host.checked and host.state != 0:
                problems.append(f"{name} {host.state_name} ({host.kind})")
            for description, service in sorted(host.services.items()):
                if service.checked and service.state != 0:
                    problems.append(f"{name}/{description} {service.state_name} ({service.kind})")
        facts["qrm hosts"] = ours
        facts["hosts by state"] = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"
        facts["problems"] = problems
    show_one(facts, output)


@app.command("sync")
def sync_cmd(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="show the objects that would change and how; change nothing")
    ] = False,
    objects: Annotated[
        bool, typer.Option("--objects", help="also print every rendered object file, changed or not")
    ] = False,
    output: OutputOpt = Output.table,
) -> None:
    """Render every object from the database, show the difference to what Nagios runs, and apply it
    (write, check with nagios4 -v, rename, reload)."""
    from qrm_nagios import sync

    result = sync.full_sync(_settings(), get_settings(), dry_run=dry_run, with_diff=True)
    report = result.report
    if output is Output.json:
        extra = {"objects": result.rendered.files} if objects else {}
        print_json({**result.to_dict(), "diff": result.diff, **extra})
        return
    if objects:
        for rel, text in sorted(result.rendered.files.items()):
            sys.stdout.write(f"### {rel}\n{text}")
    if result.diff:
        sys.stdout.write(result.diff)
    for problem in report.problems:
        sys.stderr.write(f"warning: {problem}\n")
    for rel, reason in sorted(report.rejected.items()):
        sys.stderr.write(f"rejected: {rel}: {reason}\n")
    changed = len(report.written) + len(report.removed)
    verb = "would change" if dry_run else "changed"
    message(
        f"{len(result.rendered.files)} objects rendered in {result.render_seconds:.3f} s; "
        f"{verb} {changed} ({len(report.written)} written, {len(report.removed)} removed), "
        f"{report.unchanged} unchanged" + ("" if dry_run or not report.check else f"; {report.check}")
    )
    if not dry_run and report.reload:
        message(report.reload)


@app.command("show")
def show_cmd(
    host: Annotated[
        str, typer.Argument(help="a resource (id, MAC, hostname), a storage server or a Nagios host name")
    ],
    output: OutputOpt = Output.table,
) -> None:
    """Show one host: the object file Nagios runs, and its state in Nagios."""
    from qrm_nagios import health
    from qrm_nagios.store import ObjectStore

    settings = _settings()
    core = get_settings()
    store = ObjectStore(settings, core)
    nagios_host, rel = _find(settings, core, host)
    checks = health.for_host(settings, core, nagios_host)
    text = store.read(rel) if rel else None
    link = health.host_link(settings, nagios_host)
    if output is Output.json:
        print_json(
            {
                "host": nagios_host,
                "file": rel,
                "object": text,
                "link": link,
                "health": [{"source": c.source, "status": c.status, "message": c.message} for c in checks],
            }
        )
        return
    message(f"Nagios host {nagios_host}" + (f" ({store.root / rel})" if rel else ""))
    if link:
        message(f"link: {link}")
    if text is not None:
        sys.stdout.write(text)
    else:
        message("(no object file: Nagios does not monitor it; see 'qrm nagios sync --dry-run')")
    show_list(
        checks,
        [("SOURCE", lambda c: c.source), ("STATUS", lambda c: c.status), ("MESSAGE", lambda c: c.message)],
        output,
        "Nagios",
    )


def _find(settings: NagiosSettings, core: Any, ref: str) -> tuple[str, str | None]:
    """(Nagios host name, object file) of a resource, a storage server or a Nagios host name."""
    from qrm_nagios import render, source

    owner = render.label_of(settings, ref)
    with source.reading(core) as ctx:
        if owner is not None and owner[0] == "storage":
            ref = owner[1]
        else:
            try:
                resource = show_resource(ctx, ref)
            except NotFound:
                pass
            else:
                label = resource.hostname or resource.mac
                return render.host_name(settings, label), render.host_path(resource.id)
        try:
            server = show_storage(ctx, ref)
        except NotFound:
            raise NotFound(
                f"no resource or storage server {ref!r} (a Nagios host qrm does not manage?)"
            ) from None
        return render.storage_host_name(settings, server.name), render.storage_path(server.id)
