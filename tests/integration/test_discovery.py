"""Every installed plugin and driver loads through the real PluginSystem (pluggy + stevedore)."""

from __future__ import annotations

import importlib.metadata as metadata
import json

import pytest
from integration_support import BROKEN_DISTRIBUTION, BROKEN_DRIVER, BROKEN_PLUGIN, run_python

from qrm_core.drivers.base import BaseDriver
from qrm_core.errors import DriverLoadError
from qrm_core.plugins import (
    DRIVER_GROUPS,
    HYPERVISOR_GROUP,
    PLUGIN_GROUP,
    POWER_GROUP,
    STORAGE_GROUP,
    PluginSystem,
)

#: SDKs that must be imported only when their driver is used, never by loading plugins.
HEAVY_MODULES = ("libvirt", "pyVmomi", "pyvmomi")


def entry_points(group: str) -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=group), key=lambda ep: ep.name)


def test_every_plugin_loads_and_validates(plain_settings) -> None:
    system = PluginSystem(plain_settings).load()
    records = {r.name: r for r in system.entries() if r.kind == "plugin"}
    assert set(records) == {ep.name for ep in entry_points(PLUGIN_GROUP)}
    assert {"example", BROKEN_PLUGIN} <= set(records)
    for name, record in records.items():
        if record.distribution == BROKEN_DISTRIBUTION:
            assert record.status == "broken"
            assert record.error.startswith("ModuleNotFoundError:"), record.error
            assert "qrm_broken_example_missing_dependency" in record.error
            assert system.pm.get_plugin(name) is None
        else:
            assert (record.status, record.error, record.loaded) == ("enabled", None, True), (
                f"plugin {name} ({record.distribution}) did not load: {record.error}"
            )
            assert system.pm.get_plugin(name) is not None
            assert record.version, f"plugin {name} has no distribution version"
    # pluggy: no implementation of a hook that has no specification.
    system.pm.check_pending()


@pytest.mark.parametrize("group", sorted(DRIVER_GROUPS))
def test_every_driver_loads_by_name_and_implements_its_interface(plain_settings, group) -> None:
    system = PluginSystem(plain_settings).load()
    interface = DRIVER_GROUPS[group]
    load = {
        STORAGE_GROUP: system.storage_driver,
        HYPERVISOR_GROUP: system.hypervisor_driver,
        POWER_GROUP: system.power_driver,
    }[group]
    names = [ep.name for ep in entry_points(group)]
    assert "fake" in names
    for name in names:
        if name == BROKEN_DRIVER:
            with pytest.raises(DriverLoadError) as info:
                load(name)
            assert "qrm_broken_example_missing_sdk" in info.value.message
            assert "\n" not in info.value.message
            continue
        driver = load(name)
        assert isinstance(driver, interface) and isinstance(driver, BaseDriver)
        assert driver.name == name, (
            f"{type(driver).__name__}.name is {driver.name!r}, its entry point {name!r}"
        )
        assert driver.description, f"driver {name} has no description"
        missing = driver.detect_missing_dependencies()
        assert isinstance(missing, list) and all(isinstance(m, str) for m in missing)


def test_loading_plugins_imports_no_driver_sdk() -> None:
    """In a fresh process, loading every plugin and building the CLI imports no heavy SDK."""
    code = (
        "import json, sys, tempfile\n"
        "from qrm_core.config import Settings\n"
        "from qrm_core.cli.main import build_app\n"
        "settings = Settings(data_dir=tempfile.mkdtemp())\n"
        "build_app(settings)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert "qrm_example.plugin" in loaded  # the hook modules were loaded...
    assert "qrm_example.driver" not in loaded  # ...but not the drivers (stevedore loads them by name)
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY_MODULES)
    assert not heavy, f"loading plugins imported {heavy}: import SDKs in driver modules only"
