"""Which plugins and drivers are disabled persistently (``qrm plugins disable``).

Read by the plugin system at start-up, below the services layer (the services
write it: :mod:`qrm_core.services.plugin_state`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlmodel import Session, select

from qrm_core.db import get_engine
from qrm_core.errors import QrmError
from qrm_core.models import PluginSetting

if TYPE_CHECKING:
    from qrm_core.config import Settings

log = logging.getLogger("qrm.plugins")


def persisted_disabled(settings: Settings) -> set[str]:
    """Names disabled with ``qrm plugins disable``.

    Read at start-up before anything else; a database that is not reachable or
    not initialised yet means nothing is disabled (so ``qrm init`` and
    ``qrm plugins list`` still work), and is logged.
    """
    url = make_url(settings.effective_database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        if not Path(url.database).exists():
            # No database yet (before 'qrm init', or a CLI in --server mode):
            # nothing is disabled, and reading must not create an empty file.
            return set()
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
