"""Small value types passed to plugins through hooks."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from qrm_core.config import Settings


@dataclass(frozen=True)
class HookContext:
    """What every hook implementation receives besides its subject.

    :ivar settings: The validated qrm settings.
    :ivar actor: Who caused the call (user name, ``engine``, ``agent``).
    :ivar log: A logger for the plugin to use (lines go to the qrm log file).
    """

    settings: Settings
    actor: str
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("qrm.plugins"))


@dataclass(frozen=True)
class HealthCheck:
    """One health observation of a resource, contributed by a monitoring plugin.

    :ivar source: Who observed it (plugin name, check name).
    :ivar status: ``ok``, ``warning``, ``critical`` or ``unknown``.
    :ivar message: One line for people.
    """

    source: str
    status: str
    message: str


#: The object types the console shows, and that links and panels attach to.
CONSOLE_OBJECT_TYPES = (
    "dashboard",
    "resource",
    "ve",
    "storage",
    "filesystem_image",
    "boot_image",
    "partition",
)


@dataclass(frozen=True)
class ConsoleLink:
    """A link a plugin adds to an object's page (another tool's view of it).

    :ivar title: The link's text (``Nagios``).
    :ivar url: An ``http(s)://`` URL or a path on the qrm server (``/nagios/...``);
        anything else is dropped by the console.
    """

    title: str
    url: str


@dataclass(frozen=True)
class ConsolePanel:
    """A panel a plugin adds to an object's page: a title and rows of text.

    Rendered by core, escaped: a plugin contributes data, never markup.

    :ivar title: The panel's heading (``Nagios``).
    :ivar rows: ``(label, value)`` pairs, in order.
    :ivar status: ``ok``, ``warning``, ``critical``, ``unknown`` or empty: colours the panel.
    :ivar links: Links shown under the rows.
    """

    title: str
    rows: tuple[tuple[str, str], ...] = ()
    status: str = ""
    links: tuple[ConsoleLink, ...] = ()


@runtime_checkable
class BackgroundService(Protocol):
    """A long-running part of a plugin that ``qrm server`` starts and stops
    (the TFTP service, a DHCP server it runs itself, ...).

    Every server of a site runs it, unless the service has an attribute
    ``leader_only`` that is true: then only the server that holds the engine's
    leader lock runs it (work done once per site, such as syncing another
    manager's inventory). Such a service is started when its server becomes the
    leader and stopped when it stops being one, possibly several times in a
    server's life: ``start()`` after ``stop()`` must work.
    """

    name: str

    def start(self) -> None:
        """Start serving; return once the service is ready."""

    def stop(self) -> None:
        """Stop serving and release every resource (sockets, processes)."""
