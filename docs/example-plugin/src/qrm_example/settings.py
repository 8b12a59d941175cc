"""The example plugin's own settings, from ``QRM_EXAMPLE_*`` variables or the
``[example]`` table of ``qrm.toml``.

A plugin never adds fields to core's :class:`~qrm_core.config.Settings`; it
keeps its own settings class (core's :class:`~qrm_core.config.PluginSettings`)
with its own prefix, and derives paths from core's ``data_dir`` so that one
``QRM_DATA_DIR`` moves everything.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic_settings import SettingsConfigDict

from qrm_core.plugin_api import PluginSettings

if TYPE_CHECKING:
    from qrm_core.plugin_api import Settings

ENV_PREFIX = "QRM_EXAMPLE_"


class ExampleSettings(PluginSettings):
    """Everything the example plugin can be configured with."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")
    plugin_table: ClassVar[str] = "example"

    kernel_arg: bool = False
    """Add ``qrm.inventory=1`` to the kernel command line of every boot
    (``QRM_EXAMPLE_KERNEL_ARG=1``), so software in the booted system knows an
    inventory is kept."""

    inventory_file: Path | None = None
    """Where the inventory is written; default ``<data_dir>/inventory/resources.json``."""

    storage_root: Path | None = None
    """Where the ``example-dir`` storage driver keeps volumes; default
    ``<data_dir>/example-dir``. One sub-directory per storage server."""


def load(core: Settings) -> ExampleSettings:
    """The plugin's settings, read at use (not at import), with a one-line error.

    Kept until the environment or qrm.toml changes (``cached()``): the
    resource hooks ask on every registration, and building settings costs
    about a millisecond. The kept object is shared, so paths derived from
    ``data_dir`` go into a copy.
    """
    own = ExampleSettings.cached()  # a bad value: one line naming the variable
    derived: dict[str, Path] = {}
    if own.inventory_file is None:
        derived["inventory_file"] = core.data_dir / "inventory" / "resources.json"
    if own.storage_root is None:
        derived["storage_root"] = core.data_dir / "example-dir"
    return own.model_copy(update=derived) if derived else own
