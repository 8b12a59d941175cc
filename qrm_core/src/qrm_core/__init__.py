"""qrm: a cluster resource manager in the tradition of openQRM.

Public API for plugins: :data:`hookimpl`, the driver interfaces in
:mod:`qrm_core.drivers.base`, the value types in :mod:`qrm_core.context`, the
public models in :mod:`qrm_core.models`, the errors in :mod:`qrm_core.errors`,
the settings in :mod:`qrm_core.config` (``get_settings()``, ``config_file()``),
and the services in :mod:`qrm_core.services`.
"""

from qrm_core.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
