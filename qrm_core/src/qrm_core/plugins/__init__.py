"""The plugin system: discovery (stevedore), the pluggy manager, and a typed facade.

Two mechanisms, after DESIGN.md section 4:

* ``qrm.plugins`` entry points name modules with ``@hookimpl`` functions. They
  are all imported at start-up (so they must import cheaply) and registered
  into one pluggy manager under their entry-point name.
* ``qrm.storage``, ``qrm.hypervisors`` and ``qrm.power`` entry points name
  driver classes. They are imported only when core needs the driver of that
  name.

A plugin or driver that fails to import, or whose hook implementations do not
match the specifications, is recorded as *broken* with the reason and left
out; everything else keeps working. ``qrm plugins list`` shows the reason.
A plugin can be disabled persistently (``qrm plugins disable NAME``, stored in
the database) or for one process (``QRM_DISABLE_PLUGINS=a,b``). Disabling a
plugin also disables the drivers its distribution ships.

The package is in parts: :mod:`.discovery` (what is installed),
:mod:`.hooks` (the typed hook facade), :mod:`.drivers` (the driver factory),
:mod:`.state` (persisted enable state); :class:`PluginSystem` ties them
together for one process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import pluggy

from qrm_core import hookspecs
from qrm_core.drivers.base import BaseDriver, HypervisorDriver, PowerDriver, StorageDriver
from qrm_core.errors import PluginError
from qrm_core.plugins.discovery import (
    CORE_DISTRIBUTION,
    DRIVER_GROUPS,
    HYPERVISOR_GROUP,
    KIND_BY_GROUP,
    PLUGIN_GROUP,
    POWER_GROUP,
    STORAGE_GROUP,
    EntryPointRecord,
    entry_point,
    installed_entry_points,
)
from qrm_core.plugins.drivers import DriverFactory
from qrm_core.plugins.hooks import Hooks

if TYPE_CHECKING:
    from qrm_core.config import Settings

__all__ = [
    "CORE_DISTRIBUTION",
    "DRIVER_GROUPS",
    "HYPERVISOR_GROUP",
    "KIND_BY_GROUP",
    "PLUGIN_GROUP",
    "POWER_GROUP",
    "STORAGE_GROUP",
    "BaseDriver",
    "EntryPointRecord",
    "Hooks",
    "PluginSystem",
    "get_plugin_system",
    "installed_entry_points",
    "set_plugin_system",
]

log = logging.getLogger("qrm.plugins")


class PluginSystem:
    """The loaded plugins of one process, and the drivers they can provide."""

    def __init__(
        self, settings: Settings, disabled: Iterable[str] = (), *, discover_plugins: bool = True
    ) -> None:
        self.settings = settings
        self.disabled = {name for name in disabled} | set(settings.disable_plugins)
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.hooks = Hooks(self.pm)
        self.records: dict[tuple[str, str], EntryPointRecord] = {}
        self.drivers = DriverFactory(settings, self.records, self.driver_names)
        self._lock = threading.Lock()
        self._discover_plugins = discover_plugins
        self._loaded = False

    def use_settings(self, settings: Settings) -> None:
        """Adopt updated settings (the server learns its URL after binding); drivers
        are rebuilt with them on next use."""
        with self._lock:
            self.settings = settings
            self.drivers.reset(settings)

    # -- discovery -------------------------------------------------------

    def load(self) -> PluginSystem:
        """Find every plugin and driver; import and register the enabled plugins. Idempotent."""
        with self._lock:
            if self._loaded:
                return self
            self._loaded = True
            # Tests build a system without entry-point plugins and register
            # plugin objects themselves; drivers are always discovered.
            plugin_records = installed_entry_points(PLUGIN_GROUP) if self._discover_plugins else []
            disabled_dists = {
                r.distribution: r.name
                for r in plugin_records
                if r.name in self.disabled and r.distribution not in (None, CORE_DISTRIBUTION)
            }
            for group in (PLUGIN_GROUP, *DRIVER_GROUPS):
                records = plugin_records if group == PLUGIN_GROUP else installed_entry_points(group)
                for record in records:
                    by_plugin = disabled_dists.get(record.distribution) if record.distribution else None
                    record.enabled = record.name not in self.disabled and by_plugin is None
                    if record.name not in self.disabled and by_plugin is not None:
                        record.disabled_by = by_plugin
                    self.records[(group, record.name)] = record
            # qrm_configure is historic: started here, each plugin is configured
            # inside its own register(), where a failure is contained.
            self.pm.hook.qrm_configure.call_historic(kwargs={"settings": self.settings})
            for record in plugin_records:
                if record.enabled and record.error is None:
                    self._load_plugin(record)
            return self

    def _load_plugin(self, record: EntryPointRecord) -> None:
        try:
            ep = entry_point(PLUGIN_GROUP, record.name)
            module = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure makes the plugin broken
            record.error = f"{type(exc).__name__}: {exc}"
            log.warning("plugin %s failed to load: %s", record.name, record.error)
            return
        self.register(module, record.name, record=record)

    def register(self, plugin: object, name: str, *, record: EntryPointRecord | None = None) -> bool:
        """Register a plugin object into the manager after validating its hooks.

        Used for entry-point plugins and, in tests, for plugin objects
        directly. Returns False (and records the reason) if it is invalid.
        """
        if record is None:
            record = EntryPointRecord(
                name=name, group=PLUGIN_GROUP, value=repr(plugin), distribution=None, version=None
            )
            self.records[(PLUGIN_GROUP, name)] = record
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            record.error = f"invalid hook implementation: {exc}"
            log.warning("plugin %s rejected: %s", name, record.error)
            return False
        except Exception as exc:  # noqa: BLE001 - its qrm_configure raised
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            record.error = f"qrm_configure failed: {type(exc).__name__}: {exc}"
            log.warning("plugin %s broken: %s", name, record.error)
            return False
        unknown = [caller.name for caller in (self.pm.get_hookcallers(plugin) or []) if not caller.has_spec()]
        if unknown:
            self.pm.unregister(plugin)
            record.error = f"unknown hook(s): {', '.join(sorted(unknown))}"
            log.warning("plugin %s rejected: %s", name, record.error)
            return False
        record.loaded = True
        doc = (getattr(plugin, "__doc__", None) or "").strip()
        record.description = doc.splitlines()[0] if doc else ""
        return True

    def add_driver(self, group: str, driver: BaseDriver) -> None:
        """Make ``driver`` (an instance) this process's driver named ``driver.name`` in
        ``group``, as if a distribution shipped it: for tests that need a driver of
        their own (a slow one, one with only some operations)."""
        self.load()
        expected = DRIVER_GROUPS[group]
        if not isinstance(driver, expected):
            raise TypeError(f"{type(driver).__name__} is not a {expected.__name__}")
        record = EntryPointRecord(
            name=driver.name, group=group, value=repr(driver), distribution=None, version=None, loaded=True
        )
        record.description = driver.description
        self.records[(group, driver.name)] = record
        self.drivers.put(group, driver)

    def unregister(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.records.pop((PLUGIN_GROUP, name), None)

    def mark_broken(self, name: str, exc: BaseException) -> None:
        """Record a plugin failure found after loading (e.g. while registering commands)."""
        record = self.records.get((PLUGIN_GROUP, name))
        if record is not None and record.error is None:
            record.error = f"{type(exc).__name__}: {exc}"

    # -- information -----------------------------------------------------

    def entries(self, *, check_drivers: bool = False) -> list[EntryPointRecord]:
        """Every plugin and driver found, for ``qrm plugins list``.

        With ``check_drivers``, each enabled driver is loaded to report load
        errors and missing dependencies.
        """
        self.load()
        if check_drivers:
            for (group, name), record in self.records.items():
                if group in DRIVER_GROUPS and record.enabled and record.error is None:
                    try:
                        driver = self.drivers.build(group, name)
                    except PluginError as exc:
                        record.error = exc.details.get("reason", exc.message)
                        continue
                    record.loaded = True
                    record.description = driver.description
                    try:
                        record.missing = list(driver.detect_missing_dependencies())
                    except Exception as exc:  # noqa: BLE001
                        record.error = f"dependency check failed: {exc}"
        return sorted(self.records.values(), key=lambda r: (r.kind, r.name))

    def plugin_names(self) -> list[str]:
        self.load()
        return sorted(name for (group, name) in self.records if group == PLUGIN_GROUP)

    def known_names(self) -> set[str]:
        self.load()
        return {name for (_, name) in self.records}

    def driver_names(self, group: str) -> list[str]:
        """Installed, enabled driver names of a group (``qrm.storage``...)."""
        self.load()
        allowed = self._allowed(group)
        return sorted(
            name
            for (g, name), record in self.records.items()
            if g == group and record.enabled and record.error is None and (allowed is None or name in allowed)
        )

    def _allowed(self, group: str) -> list[str] | None:
        if group == STORAGE_GROUP:
            return self.settings.enabled_storage
        if group == HYPERVISOR_GROUP:
            return self.settings.enabled_hypervisors
        if group == POWER_GROUP:
            return self.settings.enabled_power
        return None

    # -- drivers ---------------------------------------------------------

    def storage_driver(self, name: str) -> StorageDriver:
        """The storage driver called ``name`` (case-insensitive)."""
        return cast(StorageDriver, self._typed_driver(STORAGE_GROUP, name))

    def hypervisor_driver(self, name: str) -> HypervisorDriver:
        """The hypervisor driver called ``name`` (case-insensitive)."""
        return cast(HypervisorDriver, self._typed_driver(HYPERVISOR_GROUP, name))

    def power_driver(self, name: str) -> PowerDriver:
        """The power driver called ``name`` (case-insensitive)."""
        return cast(PowerDriver, self._typed_driver(POWER_GROUP, name))

    def _typed_driver(self, group: str, name: str) -> BaseDriver:
        self.load()
        return self.drivers.get(group, name)


# ---------------------------------------------------------------------------
# The process-wide plugin system
# ---------------------------------------------------------------------------

_system: PluginSystem | None = None
_system_lock = threading.Lock()


def get_plugin_system(settings: Settings) -> PluginSystem:
    """The loaded plugin system of this process, honouring persisted enable state."""
    global _system
    with _system_lock:
        if _system is None or _system.settings is not settings:
            from qrm_core.plugins.state import persisted_disabled

            _system = PluginSystem(settings, disabled=persisted_disabled(settings)).load()
        return _system


def set_plugin_system(system: PluginSystem | None) -> None:
    """Replace the process-wide plugin system (tests, and after enable/disable)."""
    global _system
    with _system_lock:
        _system = system
