"""Where qrm's services may listen: one rule for the HTTP server, the TFTP and
DHCP services and any plugin's listener.

A fresh install serves this machine only. A service listens beyond loopback
when two things are true:

* the admin **named where to serve**: the address or interface was given
  (``qrm server --host``, ``QRM_PROVISIONING_ADDRESS``, a plugin's own
  setting such as ``QRM_TFTPD_LISTEN_ADDRESS`` or ``QRM_DHCPD_INTERFACE``);
  no default is ever beyond loopback (:func:`listen_address`);
* the admin user no longer has the **default password** (:func:`check_listen`).

Plugins ask through ``qrm_core.plugin_api`` (``listen_address``,
``check_listen``) before they bind, so the rule and its one-line refusal are
the same everywhere.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING

from qrm_core.errors import InvalidInput

if TYPE_CHECKING:
    from qrm_core.config import Settings
    from qrm_core.plugins import PluginSystem

log = logging.getLogger("qrm.server")

#: Where a service listens until the admin names an address.
LOOPBACK = "127.0.0.1"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
LOOPBACK_INTERFACES = {"lo"}


def is_loopback(where: str) -> bool:
    """Whether an address, host name or interface name is this machine only."""
    if where in LOOPBACK_NAMES or where in LOOPBACK_INTERFACES:
        return True
    try:
        return ipaddress.ip_address(where).is_loopback
    except ValueError:
        return False


def listen_address(settings: Settings, explicit: str | None, *, service: str) -> str:
    """The address a service listens on: the one its own setting names, else the
    site's provisioning address (``QRM_PROVISIONING_ADDRESS``), else loopback -
    and then it says (in the log) that machines cannot reach it."""
    if explicit:
        return explicit
    if settings.provisioning_address:
        return settings.provisioning_address
    log.warning(
        "%s: serving on %s only (machines cannot reach it); name the provisioning address with "
        "QRM_PROVISIONING_ADDRESS=<this host's address on the provisioning network> and change the "
        "admin password ('qrm init --admin-password ...')",
        service,
        LOOPBACK,
    )
    return LOOPBACK


def check_listen(
    settings: Settings, where: str, *, service: str, plugins: PluginSystem | None = None
) -> None:
    """Refuse (:class:`~qrm_core.errors.InvalidInput`, one line) to serve ``service``
    on ``where`` (an address, host name or interface) beyond loopback while the
    admin user ``qrm`` still has the default password."""
    if is_loopback(where):
        return
    from qrm_core.services import service_context, users

    with service_context(settings, actor="server", plugins=plugins) as ctx:
        unchanged = users.default_password_unchanged(ctx)
    if unchanged:
        raise InvalidInput(
            f"refusing to listen on {where} ({service}): the admin user '{users.DEFAULT_ADMIN}' still has "
            "the default password; set one with 'qrm init --admin-password ...' (or serve on 127.0.0.1 only)"
        )
