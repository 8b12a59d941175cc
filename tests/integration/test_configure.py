"""A plugin whose ``qrm_configure`` raises must not break unrelated commands.

The plugin is a real distribution (a ``.dist-info`` with an entry point) put on
``sys.path`` for this test only, so importlib.metadata and stevedore find it
exactly as they find an installed one, without touching the environment that
the other tests use.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qrm_core.plugins import PluginSystem

MODULE = """
from qrm_core import hookimpl


@hookimpl
def qrm_configure(settings):
    raise RuntimeError("cannot read my settings")
"""


@pytest.fixture
def configure_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    site = tmp_path / "site"
    info = site / "qrm_configure_fails-0.1.0.dist-info"
    info.mkdir(parents=True)
    (site / "qrm_configure_fails.py").write_text(MODULE)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qrm-configure-fails\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[qrm.plugins]\nconfigure-fails = qrm_configure_fails\n")
    monkeypatch.syspath_prepend(str(site))
    return "configure-fails"


def test_the_test_plugin_is_discovered(plain_settings, configure_fails) -> None:
    system = PluginSystem(plain_settings, disabled={configure_fails})
    system.load()
    assert system.records[("qrm.plugins", configure_fails)].status == "disabled"


def test_a_failing_configure_marks_only_that_plugin_broken(plain_settings, configure_fails) -> None:
    system = PluginSystem(plain_settings).load()
    record = system.records[("qrm.plugins", configure_fails)]
    assert record.status == "broken" and "cannot read my settings" in (record.error or "")
    assert system.pm.get_plugin(configure_fails) is None
    assert system.storage_driver("fake").name == "fake"
