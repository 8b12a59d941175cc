"""qrm: a cluster resource manager in the tradition of openQRM.

Plugins use :mod:`qrm_core.plugin_api` and nothing else of this package
(docs/plugins.md, "The plugin API").
"""

from qrm_core.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
