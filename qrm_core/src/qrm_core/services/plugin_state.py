"""Persisted enable/disable state of plugins and drivers (the rule; reading it
at start-up is :func:`qrm_core.plugins.state.persisted_disabled`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlmodel import select

from qrm_core.errors import NotFound
from qrm_core.models import PluginSetting, utcnow

if TYPE_CHECKING:
    from qrm_core.plugins import EntryPointRecord, PluginSystem
    from qrm_core.services import ServiceContext


def list_plugins(plugins: PluginSystem) -> list[EntryPointRecord]:
    return plugins.entries(check_drivers=True)


def set_enabled(ctx: ServiceContext, name: str, enabled: bool) -> bool:
    """Persist a plugin's state; returns True if it changed."""
    known = ctx.plugins.known_names() | _persisted_names(ctx)
    if name not in known:
        installed = ", ".join(sorted(ctx.plugins.known_names())) or "none"
        raise NotFound(f"no plugin or driver named {name!r} is installed; installed: {installed}")
    row = ctx.session.get(PluginSetting, name)
    current = row.enabled if row is not None else True
    if current == enabled:
        return False
    if row is None:
        row = PluginSetting(name=name, enabled=enabled)
    else:
        row.enabled = enabled
        row.changed_at = utcnow()
    ctx.session.add(row)
    ctx.record("plugin", name, f"plugin {name} {'enabled' if enabled else 'disabled'}")
    ctx.commit()
    return True


def _persisted_names(ctx: ServiceContext) -> set[str]:
    return {row.name for row in ctx.session.exec(select(PluginSetting))}
