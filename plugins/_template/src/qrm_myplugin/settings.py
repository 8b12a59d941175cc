"""The plugin's own settings, from ``QRM_MYPLUGIN_*`` environment variables.

Never add fields to core's Settings; derive paths from core's ``data_dir``.
"""

from __future__ import annotations

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from qrm_core.errors import InvalidInput

ENV_PREFIX = "QRM_MYPLUGIN_"


class MyPluginSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    enabled_thing: bool = True
    """TODO: replace with the plugin's real settings, each with a docstring."""


def load() -> MyPluginSettings:
    """Read the settings when they are needed, with a one-line error naming the variable."""
    try:
        return MyPluginSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidInput(f"invalid setting {ENV_PREFIX}{field.upper()}: {first.get('msg')}") from None
