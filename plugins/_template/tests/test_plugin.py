"""Tests of qrm-myplugin against the real plugin system and databases.

Test the real component your plugin drives (start it in the test, on
loopback or in a network namespace the test creates); when it is not
installed call ``qrm_core.testing.missing(what, hint)``, which skips on a
laptop and fails under CI=true.
"""

from __future__ import annotations

import logging

import qrm_myplugin.plugin

from qrm_core.services import resources


def test_the_entry_point_is_installed_and_loads(qrm_cli) -> None:
    assert qrm_cli("init").exit_code == 0
    listing = {(p["kind"], p["name"]): p for p in qrm_cli("plugins", "list", "-o", "json").json()}
    mine = listing[("plugin", "myplugin")]
    assert (mine["status"], mine["version"], mine["error"]) == ("enabled", "0.1.0", None)


def test_resource_added_is_logged(qrm_ctx, qrm_plugins, caplog) -> None:
    assert qrm_plugins.register(qrm_myplugin.plugin, "myplugin")
    with caplog.at_level(logging.INFO, logger="qrm.plugins"):
        resources.add_resource(qrm_ctx, mac="52:54:00:00:00:01")
    assert "myplugin: resource 52:54:00:00:00:01 added by tester" in caplog.text


def test_the_driver_skeleton_is_complete() -> None:
    """Every abstract method has an implementation, so stevedore can load it once registered."""
    from qrm_myplugin.driver import MyPluginStorage

    assert not MyPluginStorage.__abstractmethods__
