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


@runtime_checkable
class BackgroundService(Protocol):
    """A long-running part of a plugin that ``qrm server`` starts and stops
    (the TFTP service, a DHCP server it runs itself, ...)."""

    name: str

    def start(self) -> None:
        """Start serving; return once the service is ready."""

    def stop(self) -> None:
        """Stop serving and release every resource (sockets, processes)."""
