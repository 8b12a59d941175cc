"""The hook facade: the only way core calls a pluggy hook (typed, failure-isolated)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

from qrm_core.errors import PluginError

if TYPE_CHECKING:
    import typer

    from qrm_core.context import BackgroundService, ConsoleLink, ConsolePanel, HealthCheck, HookContext
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

    def ve_updated(self, ve: VirtualEnvironmentPublic, changed: list[str], ctx: HookContext) -> None:
        self.broadcast("qrm_ve_updated", ve=ve, changed=changed, ctx=ctx)

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

    # -- console ---------------------------------------------------------

    def console_links(self, object_type: str, object_name: str, ctx: HookContext) -> list[ConsoleLink]:
        return self.collect("qrm_console_links", object_type=object_type, object_name=object_name, ctx=ctx)

    def console_panels(self, object_type: str, object_name: str, ctx: HookContext) -> list[ConsolePanel]:
        return self.collect("qrm_console_panels", object_type=object_type, object_name=object_name, ctx=ctx)

    def console_contributions(
        self, object_type: str, object_name: str, ctx: HookContext
    ) -> tuple[list[ConsoleLink], list[ConsolePanel]]:
        """Links and panels plugins add to an object's page.

        Unlike other collecting hooks, a failing plugin does not fail the
        page: the others' contributions are kept, and the failing one is
        shown as a panel naming the plugin and its error."""
        from qrm_core.context import ConsolePanel

        kwargs = {"object_type": object_type, "object_name": object_name, "ctx": ctx}
        links: list[ConsoleLink] = []
        panels: list[ConsolePanel] = []
        for hook_name, into in (("qrm_console_links", links), ("qrm_console_panels", panels)):
            for impl in self._impls(hook_name):
                try:
                    value = self._call(impl, kwargs)
                    if value is not None and not isinstance(value, list | tuple):
                        raise TypeError(f"returned {type(value).__name__}; a list is required")
                except Exception as exc:
                    log.error("plugin %s failed in %s", impl.plugin_name, hook_name, exc_info=True)
                    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    panels.append(
                        ConsolePanel(
                            title=f"Plugin {impl.plugin_name}",
                            rows=(("error", f"failed in {hook_name}: {message}"),),
                            status="unknown",
                        )
                    )
                    continue
                into.extend(value or [])
        return links, panels
