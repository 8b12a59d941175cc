"""Keeps a real DHCP server (Kea or ISC dhcpd) in step with qrm's resources.

This module is the plugin's ``qrm.plugins`` entry point and is imported by
every qrm process, so it imports only the settings; the backends (SQL,
OMAPI, subprocesses) are imported when a hook actually has work to do.

Event hooks never raise: a DHCP server that cannot be updated must not undo
or hide the resource change that caused it. A failure is logged and recorded
as an error event of the plugin (``qrm events``); ``qrm dhcpd sync`` brings
the server back in step from the database at any time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qrm_core.plugin_api import QrmError, hookimpl
from qrm_dhcpd.settings import DhcpdSettings, load_settings

if TYPE_CHECKING:
    import typer

    from qrm_core.plugin_api import BackgroundService, HookContext, ResourcePublic

PLUGIN = "dhcpd"
#: Resource fields that change what the DHCP server hands out.
DHCP_FIELDS = frozenset({"mac", "ip", "hostname"})


def _settings(ctx: HookContext) -> DhcpdSettings | None:
    """The plugin settings, or None (not configured, or invalid: then logged and recorded)."""
    try:
        settings = load_settings()
    except QrmError as exc:
        _record_failure(ctx, f"DHCP settings are invalid, no change made: {exc.message}")
        return None
    return settings if settings.configured else None


def _record_failure(ctx: HookContext, message: str) -> None:
    ctx.log.error("dhcpd: %s", message)
    try:
        from qrm_core.plugin_api import EventLevel, service_context

        with service_context(ctx.settings, actor=f"plugin:{PLUGIN}") as sctx:
            sctx.record("plugin", PLUGIN, message, level=EventLevel.ERROR)
            sctx.commit()
    except Exception:
        ctx.log.exception("dhcpd: could not record the failure in the event log")


def _change(ctx: HookContext, action: str, resource: ResourcePublic) -> None:
    """A hook's change: queued for the server's writer when one runs, else written now."""
    if _settings(ctx) is None:
        return
    from qrm_dhcpd import writer

    if not writer.submit(ctx, action, resource):
        _apply(ctx, action, resource)


def _apply(ctx: HookContext, action: str, resource: ResourcePublic) -> None:
    """Write one change to the DHCP server; a failure is logged and recorded, never raised."""
    settings = _settings(ctx)
    if settings is None:
        return
    label = resource.hostname or resource.mac
    try:
        from qrm_dhcpd.backends import get_backend

        backend = get_backend(settings, ctx.settings)
        if action == "remove":
            report = backend.remove(resource.mac)
        else:
            report = backend.upsert(
                mac=resource.mac, ip=resource.ip, hostname=resource.hostname, resource_id=resource.id
            )
    except Exception as exc:  # noqa: BLE001 - an event hook must not raise (see module text)
        text = exc.message if isinstance(exc, QrmError) else f"{type(exc).__name__}: {exc}"
        _record_failure(
            ctx, f"DHCP {settings.backend}: could not {action} the reservation of {label}: {text}"
        )
        return
    for problem in report.problems:
        ctx.log.warning("dhcpd: %s", problem)
    ctx.log.info("dhcpd: %s %s via %s in %.3f s", report.action, report.mac, report.how, report.seconds)


def _apply_many(
    batch: list[tuple[HookContext, str, ResourcePublic]],
) -> list[tuple[HookContext, str, ResourcePublic]]:
    """The writer's round, where the backend writes reservations together (Kea's hosts
    database on PostgreSQL): one call for all of them, one log line for the round, one
    error event per distinct failure. Returns the changes it left to :func:`_apply`."""
    ctx = batch[0][0]
    settings = _settings(ctx)
    if settings is None:
        return []
    upserts = [(c, a, r) for c, a, r in batch if a != "remove"]
    if len(upserts) < 2:
        return batch
    try:
        from qrm_dhcpd.backends import get_backend

        reports = get_backend(settings, ctx.settings).upsert_many(
            [(r.mac, r.ip, r.hostname, r.id) for _, _, r in upserts]
        )
    except Exception as exc:  # noqa: BLE001 - as _apply: recorded, never raised
        text = exc.message if isinstance(exc, QrmError) else f"{type(exc).__name__}: {exc}"
        _record_failure(ctx, f"DHCP {settings.backend}: could not reserve {_labels(upserts)}: {text}")
        return [c for c in batch if c[1] == "remove"]
    if reports is None:
        return batch
    failed: dict[str, list[tuple[HookContext, str, ResourcePublic]]] = {}
    seconds = 0.0
    for change, report in zip(upserts, reports, strict=True):
        if isinstance(report, QrmError):
            failed.setdefault(report.message, []).append(change)
            continue
        seconds = max(seconds, report.seconds)
        for problem in report.problems:
            ctx.log.warning("dhcpd: %s", problem)
    for message, changes in failed.items():
        _record_failure(ctx, f"DHCP {settings.backend}: could not reserve {_labels(changes)}: {message}")
    done = len(upserts) - sum(len(c) for c in failed.values())
    ctx.log.info("dhcpd: reserved %d together via hosts database in %.3f s", done, seconds)
    return [c for c in batch if c[1] == "remove"]


def _labels(changes: list[tuple[HookContext, str, ResourcePublic]]) -> str:
    names = [r.hostname or r.mac for _, _, r in changes]
    if len(names) == 1:
        return f"the reservation of {names[0]}"
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"the reservations of {shown}"


@hookimpl
def qrm_resource_added(resource: ResourcePublic, ctx: HookContext) -> None:
    """Reserve the new resource's MAC (with its address and hostname, if known)."""
    _change(ctx, "reserve", resource)


@hookimpl
def qrm_resource_updated(resource: ResourcePublic, changed: list[str], ctx: HookContext) -> None:
    """Follow a change of address or hostname."""
    if DHCP_FIELDS.intersection(changed):
        _change(ctx, "update", resource)


@hookimpl
def qrm_resource_removed(resource: ResourcePublic, ctx: HookContext) -> None:
    """Drop the reservation of a removed resource."""
    _change(ctx, "remove", resource)


@hookimpl
def qrm_collect_services(ctx: HookContext) -> list[BackgroundService]:
    """The reservation writer (:mod:`qrm_dhcpd.writer`) wherever DHCP is
    configured, and the DHCP server itself when qrm is to run it
    (``QRM_DHCPD_MANAGE=true``; started first, stopped last, so the writer's
    last changes reach it)."""
    settings = load_settings()
    if not settings.configured:
        return []
    from qrm_dhcpd.writer import ReservationWriter

    services: list[Any] = [ReservationWriter(_apply, _apply_many)]
    if settings.manage:
        from qrm_dhcpd.service import ManagedDhcpServer

        services.insert(0, ManagedDhcpServer(settings, ctx.settings))
    return services


@hookimpl
def qrm_register_commands(app: typer.Typer) -> None:
    """``qrm dhcpd ...``: show, sync, status, db-init."""
    from qrm_dhcpd.cli import app as dhcpd_app

    app.add_typer(dhcpd_app, name="dhcpd")
