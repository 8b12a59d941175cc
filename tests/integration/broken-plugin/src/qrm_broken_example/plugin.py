"""Hook module that fails at import, like a plugin whose dependency is not installed."""

import qrm_broken_example_missing_dependency  # noqa: F401 - the point: this module does not exist

from qrm_core import hookimpl


@hookimpl
def qrm_resource_added(resource) -> None:  # never reached
    raise AssertionError("the broken plugin was loaded")
