"""The plugin's own settings, from ``QRM_MYPLUGIN_*`` environment variables or
the ``[myplugin]`` table of ``qrm.toml``.

Never add fields to core's Settings; derive paths from core's ``data_dir``.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic_settings import SettingsConfigDict

from qrm_core.plugin_api import PluginSettings

ENV_PREFIX = "QRM_MYPLUGIN_"


class MyPluginSettings(PluginSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")
    plugin_table: ClassVar[str] = "myplugin"

    enabled_thing: bool = True
    """TODO: replace with the plugin's real settings, each with a docstring."""


def load() -> MyPluginSettings:
    """Read the settings when they are needed, with a one-line error naming the variable."""
    return MyPluginSettings.load()
