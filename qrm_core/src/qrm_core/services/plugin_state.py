"""Persisted enable/disable state of plugins and drivers."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlmodel import Session, select

from qrm_core.db import get_engine
from qrm_core.errors import NotFound, QrmError
from qrm_core.models import PluginSetting, utcnow

if TYPE_CHECKING:
    from qrm_core.config import Settings
    from qrm_core.plugins import EntryPointRecord, PluginSystem
    from qrm_core.services import ServiceContext

log = logging.getLogger("qrm.plugins")


def persisted_disabled(settings: Settings) -> set[str]:
    """Names disabled with ``qrm plugins disable``.

    Read at start-up before anything else; a database that is not reachable or
    not initialised yet means nothing is disabled (so ``qrm init`` and
    ``qrm plugins list`` still work), and is logged.
    """
    try:
        engine = get_engine(settings)
        with Session(engine) as session:
            return {row.name for row in session.exec(select(PluginSetting)) if not row.enabled}
    except (OperationalError, ProgrammingError) as exc:
        log.debug("plugin state not readable (%s); treating every plugin as enabled", exc)
        return set()
    except QrmError as exc:
        log.debug("plugin state not readable (%s)", exc)
        return set()


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
