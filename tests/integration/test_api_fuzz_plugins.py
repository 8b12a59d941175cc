"""Schemathesis over the OpenAPI document of a real ``qrm server`` with every
installed plugin enabled, as users run it (scripts/run.sh installs the
plugins): the routes plugins add are held to what core's are
(tests/core/test_api_fuzz.py): no 5xx, only documented statuses, bodies and
headers, a 405 with ``Allow`` for a method a path does not have.

The same bounded run as core's (:func:`qrm_core.testing.fuzz_api`: a fixed
seed, a fixed number of cases per operation, one worker)."""

from __future__ import annotations

from pathlib import Path

import pytest
from integration_support import BROKEN_PLUGIN

from qrm_core.config import Settings
from qrm_core.plugins import PLUGIN_GROUP, PluginSystem
from qrm_core.testing import fuzz_api


def _core_paths(settings: Settings) -> set[str]:
    """The paths of the document of a server with no plugin loaded."""
    from qrm_core.api.app import create_app

    app = create_app(settings, PluginSystem(settings, discover_plugins=False).load())
    return set(app.openapi()["paths"])


@pytest.mark.slow
@pytest.mark.qrm_backends("sqlite")
def test_the_api_with_every_plugin_does_what_its_openapi_document_says(
    qrm_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = fuzz_api(tmp_path, monkeypatch)

    plugins = [record for (group, _), record in run.plugins.records.items() if group == PLUGIN_GROUP]
    assert len(plugins) > 1
    for record in plugins:
        if record.name != BROKEN_PLUGIN:
            assert record.enabled and record.error is None, f"plugin {record.name}: {record.error}"
    # Plugins' routes were in the document, so in the run (fuzz_api checks that
    # every operation of the document was tested).
    if run.plugins.hooks.wants("qrm_register_routers"):
        assert set(run.document["paths"]) - _core_paths(qrm_settings)
