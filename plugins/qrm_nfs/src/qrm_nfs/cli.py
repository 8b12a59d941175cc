"""``qrm nfs``: what the NFS driver exports on this host, and a re-sync."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from qrm_core.plugin_api import get_settings

app = typer.Typer(help="NFS storage on this host (nfs-ganesha exports).", no_args_is_help=True)


@app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for programs")] = False,
) -> None:
    """Show the NFS settings, whether ganesha runs, and every export."""
    from qrm_nfs import ganesha
    from qrm_nfs.driver import STATE_FILE
    from qrm_nfs.settings import load_settings

    core = get_settings()
    nfs = load_settings()
    pid_file = nfs.effective_pid_file(core)
    record: dict[str, dict[str, object]] = {}
    if nfs.export_root is not None and (nfs.export_root / STATE_FILE).exists():
        record = json.loads((nfs.export_root / STATE_FILE).read_text()).get("volumes", {})
    info: dict[str, Any] = {
        "export_root": str(nfs.export_root) if nfs.export_root else None,
        "ganesha_config": str(nfs.ganesha_config) if nfs.ganesha_config else None,
        "ganesha_pid_file": str(pid_file) if pid_file else None,
        "ganesha_pid": ganesha.running_pid(pid_file),
        "run_ganesha": nfs.run_ganesha,
        "exports": [
            {"location": loc, "export_id": v.get("export_id"), "clients": v.get("clients", [])}
            for loc, v in sorted(record.items())
        ],
    }
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    for key in ("export_root", "ganesha_config", "ganesha_pid_file", "ganesha_pid", "run_ganesha"):
        typer.echo(f"{key:17} {info[key] if info[key] is not None else '-'}")
    for export in info["exports"]:
        clients = ", ".join(export["clients"]) or "(not exported)"
        typer.echo(f"{export['location']}  id {export['export_id']}  {clients}")


@app.command("sync")
def sync() -> None:
    """Regenerate the EXPORT file from qrm's record, check it with ganesha, reload."""
    from qrm_nfs.driver import NfsStorage

    driver = NfsStorage(get_settings())
    driver.sync()
    typer.echo(f"{driver.nfs.ganesha_config} is in step with qrm's export record")
