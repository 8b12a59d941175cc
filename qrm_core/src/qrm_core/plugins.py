"""The plugin system: discovery (stevedore), the pluggy manager, and a typed facade.

Two mechanisms, after DESIGN.md section 4:

* ``qrm.plugins`` entry points name modules with ``@hookimpl`` functions. They
  are all imported at start-up (so they must import cheaply) and registered
  into one pluggy manager under their entry-point name.
* ``qrm.storage`` and ``qrm.hypervisors`` entry points name driver classes.
  They are imported only when core needs the driver of that name.

A plugin or driver that fails to import, or whose hook implementations do not
match the specifications, is recorded as *broken* with the reason and left
out; everything else keeps working. ``qrm plugins list`` shows the reason.
A plugin can be disabled persistently (``qrm plugins disable NAME``, stored in
the database) or for one process (``QRM_DISABLE_PLUGINS=a,b``). Disabling a
plugin also disables the drivers its distribution ships.
"""

from __future__ import annotations

import importlib.metadata as metadata
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import pluggy
from stevedore import DriverManager

from qrm_core import hookspecs
from qrm_core.drivers.base import BaseDriver, HypervisorDriver, StorageDriver
from qrm_core.errors import DriverLoadError, DriverNotFound, PluginError

if TYPE_CHECKING:
    import typer

    from qrm_core.config import Settings
    from qrm_core.context import BackgroundService, HealthCheck, HookContext
    from qrm_core.models import (
        BootImagePublic,
        EventPublic,
        FilesystemImagePublic,
        PartitionPublic,
        ResourcePublic,
        StorageServerPublic,
        VirtualEnvironmentPublic,
    )

log = logging.getLogger("qrm.plugins")

PLUGIN_GROUP = "qrm.plugins"
STORAGE_GROUP = "qrm.storage"
HYPERVISOR_GROUP = "qrm.hypervisors"
DRIVER_GROUPS: dict[str, type[BaseDriver]] = {
    STORAGE_GROUP: StorageDriver,
    HYPERVISOR_GROUP: HypervisorDriver,
}
KIND_BY_GROUP = {PLUGIN_GROUP: "plugin", STORAGE_GROUP: "storage", HYPERVISOR_GROUP: "hypervisor"}
CORE_DISTRIBUTION = "qrm-core"


@dataclass
class EntryPointRecord:
    """One installed plugin or driver."""

    name: str
    group: str
    value: str
    distribution: str | None
    version: str | None
    enabled: bool = True
    loaded: bool = False
    error: str | None = None
    missing: list[str] = field(default_factory=list)
    description: str = ""
    disabled_by: str | None = None  # the plugin whose disabling disabled this driver

    @property
    def kind(self) -> str:
        return KIND_BY_GROUP.get(self.group, self.group)

    @property
    def status(self) -> str:
        if not self.enabled:
            return "disabled"
        if self.error:
            return "broken"
        if self.missing:
            return "missing dependencies"
        return "enabled"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "distribution": self.distribution,
            "version": self.version,
            "enabled": self.enabled,
            "loaded": self.loaded,
            "status": self.status,
            "error": self.error,
            "missing": list(self.missing),
            "description": self.description,
            "entry_point": self.value,
            "disabled_by": self.disabled_by,
        }


def installed_entry_points(group: str) -> list[EntryPointRecord]:
    """Every entry point of ``group`` in the environment, deduplicated, by name."""
    seen: dict[str, EntryPointRecord] = {}
    for ep in metadata.entry_points(group=group):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else None
        record = EntryPointRecord(
            name=ep.name,
            group=group,
            value=ep.value,
            distribution=dist_name,
            version=dist.version if dist is not None else None,
        )
        previous = seen.get(ep.name)
        if previous is not None and previous.value != ep.value:
            record.error = (
                f"name clash: {previous.value} ({previous.distribution}) and {ep.value} ({dist_name})"
            )
        seen[ep.name] = record
    return sorted(seen.values(), key=lambda r: r.name)


class Hooks:
    """Typed calls into the pluggy hooks; the only way core calls a hook.

    Event hooks are broadcast with failure isolation: each implementation is
    called on its own, and an exception is logged and reported through
    ``on_failure(plugin, hook, exc)`` without stopping the others.
    Collecting hooks raise :class:`PluginError` naming the failing plugin.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm
        self.on_failure: Callable[[str, str, BaseException], None] | None = None

    # -- mechanics -------------------------------------------------------

    def _impls(self, hook_name: str) -> list[Any]:
        caller = getattr(self._pm.hook, hook_name)
        # pluggy calls the last registered (and tryfirst) implementations first.
        return [impl for impl in reversed(caller.get_hookimpls()) if not (impl.hookwrapper or impl.wrapper)]

    def wants(self, hook_name: str) -> bool:
        """Whether any plugin implements the hook (skip building its arguments if not)."""
        return bool(self._impls(hook_name))

    @staticmethod
    def _call(impl: Any, kwargs: dict[str, Any]) -> Any:
        return impl.function(*[kwargs[name] for name in impl.argnames])

    def broadcast(self, hook_name: str, **kwargs: Any) -> None:
        """Call every implementation of an event hook; failures are isolated."""
        for impl in self._impls(hook_name):
            try:
                self._call(impl, kwargs)
            except Exception as exc:
                log.error("plugin %s failed in %s: %s", impl.plugin_name, hook_name, exc, exc_info=True)
                if self.on_failure is not None and hook_name != "qrm_event_recorded":
                    try:
                        self.on_failure(impl.plugin_name, hook_name, exc)
                    except Exception:
                        log.exception("could not record the failure of plugin %s", impl.plugin_name)

    def collect(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Concatenate the lists returned by every implementation of a collecting hook."""
        results: list[Any] = []
        for impl in self._impls(hook_name):
            try:
                value = self._call(impl, kwargs)
            except Exception as exc:
                log.error("plugin %s failed in %s", impl.plugin_name, hook_name, exc_info=True)
                raise PluginError(
                    f"plugin {impl.plugin_name!r} failed in {hook_name}: {exc}",
                    plugin=impl.plugin_name,
                    hook=hook_name,
                ) from exc
            if value is None:
                continue
            if not isinstance(value, list | tuple):
                raise PluginError(
                    f"plugin {impl.plugin_name!r} returned {type(value).__name__} from "
                    f"{hook_name}; a list is required",
                    plugin=impl.plugin_name,
                    hook=hook_name,
                )
            results.extend(value)
        return results

    # -- lifecycle -------------------------------------------------------

    def register_commands(self, app: typer.Typer) -> list[tuple[str, BaseException]]:
        """Let plugins add CLI commands; returns the plugins that failed."""
        failed: list[tuple[str, BaseException]] = []
        for impl in self._impls("qrm_register_commands"):
            try:
                self._call(impl, {"app": app})
            except Exception as exc:  # noqa: BLE001
                log.error("plugin %s failed to register commands: %s", impl.plugin_name, exc)
                failed.append((impl.plugin_name, exc))
        return failed

    def register_routers(self, app: Any) -> list[tuple[str, BaseException]]:
        failed: list[tuple[str, BaseException]] = []
        for impl in self._impls("qrm_register_routers"):
            try:
                self._call(impl, {"app": app})
            except Exception as exc:  # noqa: BLE001
                log.error("plugin %s failed to register routes: %s", impl.plugin_name, exc)
                failed.append((impl.plugin_name, exc))
        return failed

    def collect_services(self, ctx: HookContext) -> list[BackgroundService]:
        return self.collect("qrm_collect_services", ctx=ctx)

    def event_recorded(self, event: EventPublic, ctx: HookContext) -> None:
        self.broadcast("qrm_event_recorded", event=event, ctx=ctx)

    # -- resources -------------------------------------------------------

    def resource_added(self, resource: ResourcePublic, ctx: HookContext) -> None:
        self.broadcast("qrm_resource_added", resource=resource, ctx=ctx)

    def resource_updated(self, resource: ResourcePublic, changed: list[str], ctx: HookContext) -> None:
        self.broadcast("qrm_resource_updated", resource=resource, changed=changed, ctx=ctx)

    def resource_state_changed(self, resource: ResourcePublic, old_state: str, ctx: HookContext) -> None:
        self.broadcast("qrm_resource_state_changed", resource=resource, old_state=old_state, ctx=ctx)

    def resource_removed(self, resource: ResourcePublic, ctx: HookContext) -> None:
        self.broadcast("qrm_resource_removed", resource=resource, ctx=ctx)

    # -- virtual environments -------------------------------------------

    def ve_created(self, ve: VirtualEnvironmentPublic, ctx: HookContext) -> None:
        self.broadcast("qrm_ve_created", ve=ve, ctx=ctx)

    def ve_removed(self, ve: VirtualEnvironmentPublic, ctx: HookContext) -> None:
        self.broadcast("qrm_ve_removed", ve=ve, ctx=ctx)

    def ve_starting(self, ve: VirtualEnvironmentPublic, ctx: HookContext) -> None:
        self.broadcast("qrm_ve_starting", ve=ve, ctx=ctx)

    def ve_started(self, ve: VirtualEnvironmentPublic, ctx: HookContext) -> None:
        self.broadcast("qrm_ve_started", ve=ve, ctx=ctx)

    def ve_stopping(self, ve: VirtualEnvironmentPublic, ctx: HookContext) -> None:
        self.broadcast("qrm_ve_stopping", ve=ve, ctx=ctx)

    def ve_stopped(self, ve: VirtualEnvironmentPublic, ctx: HookContext) -> None:
        self.broadcast("qrm_ve_stopped", ve=ve, ctx=ctx)

    def ve_resource_assigned(
        self, ve: VirtualEnvironmentPublic, resource: ResourcePublic, ctx: HookContext
    ) -> None:
        self.broadcast("qrm_ve_resource_assigned", ve=ve, resource=resource, ctx=ctx)

    def ve_resource_released(
        self, ve: VirtualEnvironmentPublic, resource: ResourcePublic, ctx: HookContext
    ) -> None:
        self.broadcast("qrm_ve_resource_released", ve=ve, resource=resource, ctx=ctx)

    # -- storage ---------------------------------------------------------

    def storage_added(self, storage: StorageServerPublic, ctx: HookContext) -> None:
        self.broadcast("qrm_storage_added", storage=storage, ctx=ctx)

    def storage_removed(self, storage: StorageServerPublic, ctx: HookContext) -> None:
        self.broadcast("qrm_storage_removed", storage=storage, ctx=ctx)

    def filesystem_image_added(self, image: FilesystemImagePublic, ctx: HookContext) -> None:
        self.broadcast("qrm_filesystem_image_added", image=image, ctx=ctx)

    def filesystem_image_removed(self, image: FilesystemImagePublic, ctx: HookContext) -> None:
        self.broadcast("qrm_filesystem_image_removed", image=image, ctx=ctx)

    # -- boot ------------------------------------------------------------

    def boot_image_added(self, boot_image: BootImagePublic, ctx: HookContext) -> None:
        self.broadcast("qrm_boot_image_added", boot_image=boot_image, ctx=ctx)

    def boot_image_removed(self, boot_image: BootImagePublic, ctx: HookContext) -> None:
        self.broadcast("qrm_boot_image_removed", boot_image=boot_image, ctx=ctx)

    def boot_kernel_args(
        self,
        resource: ResourcePublic,
        ve: VirtualEnvironmentPublic | None,
        boot_image: BootImagePublic,
        ctx: HookContext,
    ) -> list[str]:
        args = self.collect("qrm_boot_kernel_args", resource=resource, ve=ve, boot_image=boot_image, ctx=ctx)
        return [str(a) for a in args]

    # -- partitions ------------------------------------------------------

    def partition_created(self, partition: PartitionPublic, ctx: HookContext) -> None:
        self.broadcast("qrm_partition_created", partition=partition, ctx=ctx)

    def partition_state_changed(self, partition: PartitionPublic, old_state: str, ctx: HookContext) -> None:
        self.broadcast("qrm_partition_state_changed", partition=partition, old_state=old_state, ctx=ctx)

    def partition_removed(self, partition: PartitionPublic, ctx: HookContext) -> None:
        self.broadcast("qrm_partition_removed", partition=partition, ctx=ctx)

    # -- monitoring ------------------------------------------------------

    def collect_health(self, resource: ResourcePublic, ctx: HookContext) -> list[HealthCheck]:
        return self.collect("qrm_collect_health", resource=resource, ctx=ctx)


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
        self._drivers: dict[tuple[str, str], BaseDriver] = {}
        self._lock = threading.Lock()
        self._discover_plugins = discover_plugins
        self._loaded = False

    def use_settings(self, settings: Settings) -> None:
        """Adopt updated settings (the server learns its URL after binding); drivers
        are rebuilt with them on next use."""
        with self._lock:
            self.settings = settings
            self._drivers.clear()

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
            ep = _entry_point(PLUGIN_GROUP, record.name)
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
                        driver = self._driver(group, name)
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
        return None

    # -- drivers ---------------------------------------------------------

    def storage_driver(self, name: str) -> StorageDriver:
        """The storage driver called ``name`` (case-insensitive)."""
        return cast(StorageDriver, self._typed_driver(STORAGE_GROUP, name))

    def hypervisor_driver(self, name: str) -> HypervisorDriver:
        """The hypervisor driver called ``name`` (case-insensitive)."""
        return cast(HypervisorDriver, self._typed_driver(HYPERVISOR_GROUP, name))

    def _typed_driver(self, group: str, name: str) -> BaseDriver:
        self.load()
        key = name.lower()
        available = self.driver_names(group)
        if key not in available:
            record = self.records.get((group, key))
            if record is not None and not record.enabled and record.disabled_by:
                raise PluginError(
                    f"{KIND_BY_GROUP[group]} driver {key!r} is disabled because plugin {record.disabled_by!r} "
                    f"is; enable it with 'qrm plugins enable {record.disabled_by}'",
                    name=key,
                )
            if record is not None and not record.enabled:
                raise PluginError(
                    f"{KIND_BY_GROUP[group]} driver {key!r} is disabled; "
                    f"enable it with 'qrm plugins enable {key}'",
                    name=key,
                )
            if record is not None and record.error:
                raise DriverLoadError(group, key, record.error)
            raise DriverNotFound(group, key, available)
        return self._driver(group, key)

    def _driver(self, group: str, name: str) -> BaseDriver:
        cache_key = (group, name)
        driver = self._drivers.get(cache_key)
        if driver is not None:
            return driver
        failure: list[str] = []

        def on_failure(_manager: Any, ep: Any, exc: BaseException) -> None:
            failure.append(f"{type(exc).__name__}: {exc}")

        try:
            manager = DriverManager(
                namespace=group,
                name=name,
                invoke_on_load=True,
                invoke_args=(self.settings,),
                on_load_failure_callback=on_failure,
            )
        except Exception as exc:  # noqa: BLE001 - stevedore raises several kinds
            reason = failure[0] if failure else f"{type(exc).__name__}: {exc}"
            record = self.records.get(cache_key)
            if record is not None:
                record.error = reason
            raise DriverLoadError(group, name, reason) from None
        loaded = manager.driver
        expected = DRIVER_GROUPS[group]
        if not isinstance(loaded, expected):
            reason = f"{type(loaded).__name__} is not a {expected.__name__}"
            record = self.records.get(cache_key)
            if record is not None:
                record.error = reason
            raise DriverLoadError(group, name, reason)
        self._drivers[cache_key] = loaded
        return loaded


def _entry_point(group: str, name: str) -> metadata.EntryPoint:
    for ep in metadata.entry_points(group=group):
        if ep.name == name:
            return ep
    raise PluginError(f"plugin {name!r} is not installed")


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
            from qrm_core.services.plugin_state import persisted_disabled

            _system = PluginSystem(settings, disabled=persisted_disabled(settings)).load()
        return _system


def set_plugin_system(system: PluginSystem | None) -> None:
    """Replace the process-wide plugin system (tests, and after enable/disable)."""
    global _system
    with _system_lock:
        _system = system
