"""libvirt-python, imported the first time a driver talks to a host.

Nothing else in qrm imports ``libvirt``: loading the qemu and xen plugins (and
building the CLI) must not need it, and a machine without it says so in one
line (``qrm plugins list``: "libvirt-python missing").
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from types import ModuleType
from typing import Any

from qrm_core.plugin_api import DriverError

PACKAGE = "libvirt-python"
INSTALL_HINT = (
    "pip install libvirt-python; it builds against Debian's libvirt-dev "
    "(apt-get install libvirt-dev pkg-config gcc python3-dev)"
)

_lock = threading.Lock()
_module: ModuleType | None = None


class LibvirtMissing(DriverError):
    """libvirt-python is not installed (or does not import)."""

    code = "libvirt_missing"


def missing() -> list[str]:
    """``["libvirt-python missing (...)"]`` when it cannot be imported; cheap (no import)."""
    if _module is not None:
        return []
    if importlib.util.find_spec("libvirt") is None:
        return [f"{PACKAGE} missing ({INSTALL_HINT})"]
    return []


def _silence(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error on stderr by default; qrm raises them instead."""


def libvirt() -> ModuleType:
    """The ``libvirt`` module, imported once; :class:`LibvirtMissing` in one line if absent."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            try:
                module = importlib.import_module("libvirt")
            except ImportError as exc:
                raise LibvirtMissing(f"{PACKAGE} missing: {exc}; {INSTALL_HINT}") from None
            module.registerErrorHandler(_silence, None)
            _module = module
    return _module
