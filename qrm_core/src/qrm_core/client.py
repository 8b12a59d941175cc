"""What the CLI talks to: the local database through the services, or (with
``--server``) a qrm server through its REST API. Both return the same public
shapes, so every command prints the same either way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from qrm_core.config import Settings
from qrm_core.models import (
    BootImagePublic,
    EventPublic,
    FilesystemImagePublic,
    ResourcePublic,
    StorageServerPublic,
    UserPublic,
    VirtualEnvironmentPublic,
)
from qrm_core.plugins import PluginSystem, get_plugin_system, set_plugin_system


class PluginPublic(BaseModel):
    name: str
    kind: str
    distribution: str | None
    version: str | None
    enabled: bool
    loaded: bool
    status: str
    error: str | None
    missing: list[str]
    description: str
    entry_point: str


class HealthPublic(BaseModel):
    source: str
    status: str
    message: str


class ResourceDetail(ResourcePublic):
    health: list[HealthPublic] = []


class InitPublic(BaseModel):
    database: str
    revision_before: str | None
    revision: str
    admin: str
    admin_created: bool
    default_password: bool


class ResourceListPublic(BaseModel):
    items: list[ResourcePublic]
    total: int
    offset: int
    limit: int | None


class Client(Protocol):
    """The operations behind the CLI."""

    def init(self, admin_password: str | None) -> InitPublic: ...

    def storage_add(self, name: str, type: str, address: str, comment: str | None) -> StorageServerPublic: ...
    def storage_list(self) -> list[StorageServerPublic]: ...
    def storage_show(self, name: str) -> StorageServerPublic: ...
    def storage_remove(self, name: str) -> StorageServerPublic: ...

    def boot_image_add(self, **kwargs: Any) -> BootImagePublic: ...
    def boot_image_list(self) -> list[BootImagePublic]: ...
    def boot_image_show(self, name: str) -> BootImagePublic: ...
    def boot_image_set_default(self, name: str) -> BootImagePublic: ...
    def boot_image_remove(self, name: str) -> BootImagePublic: ...

    def fs_image_add(self, **kwargs: Any) -> FilesystemImagePublic: ...
    def fs_image_list(self, storage: str | None) -> list[FilesystemImagePublic]: ...
    def fs_image_show(self, name: str) -> FilesystemImagePublic: ...
    def fs_image_remove(self, name: str, purge: bool) -> FilesystemImagePublic: ...

    def ve_create(self, **kwargs: Any) -> VirtualEnvironmentPublic: ...
    def ve_list(self, state: str | None) -> list[VirtualEnvironmentPublic]: ...
    def ve_show(self, name: str) -> VirtualEnvironmentPublic: ...
    def ve_remove(self, name: str) -> VirtualEnvironmentPublic: ...

    def resource_add(self, **kwargs: Any) -> ResourcePublic: ...
    def resource_list(
        self, state: str | None, kind: str | None, ve: str | None, offset: int, limit: int | None
    ) -> ResourceListPublic: ...
    def resource_show(self, ref: str) -> ResourceDetail: ...
    def resource_remove(self, ref: str) -> ResourcePublic: ...

    def events(self, limit: int, after_id: int | None) -> list[EventPublic]: ...

    def plugins_list(self) -> list[PluginPublic]: ...
    def plugins_set_enabled(self, name: str, enabled: bool) -> bool: ...

    def user_add(self, name: str, password: str, role: str) -> UserPublic: ...
    def user_list(self) -> list[UserPublic]: ...
    def user_passwd(self, name: str, password: str) -> UserPublic: ...
    def user_remove(self, name: str) -> UserPublic: ...


class LocalClient:
    """Works directly on the configured database through the services layer."""

    def __init__(
        self, settings: Settings, actor: str | None = None, plugins: PluginSystem | None = None
    ) -> None:
        self.settings = settings
        self.actor = actor
        self._plugins = plugins

    @property
    def plugins(self) -> PluginSystem:
        if self._plugins is None:
            self._plugins = get_plugin_system(self.settings)
        return self._plugins

    @contextmanager
    def _ctx(self) -> Iterator[Any]:
        from qrm_core.services import service_context

        with service_context(self.settings, actor=self.actor, plugins=self.plugins) as ctx:
            yield ctx

    # -- setup -----------------------------------------------------------

    def init(self, admin_password: str | None) -> InitPublic:
        from qrm_core.services import setup

        result = setup.init(
            self.settings, admin_password=admin_password, actor=self.actor, plugins=self.plugins
        )
        return InitPublic(**result.__dict__)

    # -- storage ---------------------------------------------------------

    def storage_add(self, name: str, type: str, address: str, comment: str | None) -> StorageServerPublic:
        from qrm_core.services import storage

        with self._ctx() as ctx:
            return storage.add_storage(ctx, name=name, type=type, address=address, comment=comment)

    def storage_list(self) -> list[StorageServerPublic]:
        from qrm_core.services import storage

        with self._ctx() as ctx:
            return storage.list_storage(ctx)

    def storage_show(self, name: str) -> StorageServerPublic:
        from qrm_core.services import storage

        with self._ctx() as ctx:
            return storage.show_storage(ctx, name)

    def storage_remove(self, name: str) -> StorageServerPublic:
        from qrm_core.services import storage

        with self._ctx() as ctx:
            return storage.remove_storage(ctx, name)

    # -- boot images -----------------------------------------------------

    def boot_image_add(self, **kwargs: Any) -> BootImagePublic:
        from qrm_core.services import boot_images

        with self._ctx() as ctx:
            return boot_images.add_boot_image(ctx, **kwargs)

    def boot_image_list(self) -> list[BootImagePublic]:
        from qrm_core.services import boot_images

        with self._ctx() as ctx:
            return boot_images.list_boot_images(ctx)

    def boot_image_show(self, name: str) -> BootImagePublic:
        from qrm_core.services import boot_images

        with self._ctx() as ctx:
            return boot_images.show_boot_image(ctx, name)

    def boot_image_set_default(self, name: str) -> BootImagePublic:
        from qrm_core.services import boot_images

        with self._ctx() as ctx:
            return boot_images.set_default_boot_image(ctx, name)

    def boot_image_remove(self, name: str) -> BootImagePublic:
        from qrm_core.services import boot_images

        with self._ctx() as ctx:
            return boot_images.remove_boot_image(ctx, name)

    # -- filesystem images ----------------------------------------------

    def fs_image_add(self, **kwargs: Any) -> FilesystemImagePublic:
        from qrm_core.services import storage

        with self._ctx() as ctx:
            return storage.add_filesystem_image(ctx, **kwargs)

    def fs_image_list(self, storage: str | None) -> list[FilesystemImagePublic]:
        from qrm_core.services import storage as svc

        with self._ctx() as ctx:
            return svc.list_filesystem_images(ctx, storage=storage)

    def fs_image_show(self, name: str) -> FilesystemImagePublic:
        from qrm_core.services import storage

        with self._ctx() as ctx:
            return storage.show_filesystem_image(ctx, name)

    def fs_image_remove(self, name: str, purge: bool) -> FilesystemImagePublic:
        from qrm_core.services import storage

        with self._ctx() as ctx:
            return storage.remove_filesystem_image(ctx, name, purge=purge)

    # -- virtual environments -------------------------------------------

    def ve_create(self, **kwargs: Any) -> VirtualEnvironmentPublic:
        from qrm_core.services import virtual_environments as ves

        with self._ctx() as ctx:
            return ves.create_ve(ctx, **kwargs)

    def ve_list(self, state: str | None) -> list[VirtualEnvironmentPublic]:
        from qrm_core.services import virtual_environments as ves

        with self._ctx() as ctx:
            return ves.list_ves(ctx, state=state)

    def ve_show(self, name: str) -> VirtualEnvironmentPublic:
        from qrm_core.services import virtual_environments as ves

        with self._ctx() as ctx:
            return ves.show_ve(ctx, name)

    def ve_remove(self, name: str) -> VirtualEnvironmentPublic:
        from qrm_core.services import virtual_environments as ves

        with self._ctx() as ctx:
            return ves.remove_ve(ctx, name)

    # -- resources -------------------------------------------------------

    def resource_add(self, **kwargs: Any) -> ResourcePublic:
        from qrm_core.services import resources

        with self._ctx() as ctx:
            return resources.add_resource(ctx, **kwargs)

    def resource_list(
        self, state: str | None, kind: str | None, ve: str | None, offset: int, limit: int | None
    ) -> ResourceListPublic:
        from qrm_core.services import resources

        with self._ctx() as ctx:
            page = resources.list_resources(ctx, state=state, kind=kind, ve=ve, offset=offset, limit=limit)
            return ResourceListPublic(
                items=page.items, total=page.total, offset=page.offset, limit=page.limit
            )

    def resource_show(self, ref: str) -> ResourceDetail:
        from qrm_core.services import resources

        with self._ctx() as ctx:
            resource = resources.show_resource(ctx, ref)
            health = ctx.hooks.collect_health(resource, ctx.hook_ctx)
            return ResourceDetail(
                **resource.model_dump(),
                health=[HealthPublic(source=h.source, status=h.status, message=h.message) for h in health],
            )

    def resource_remove(self, ref: str) -> ResourcePublic:
        from qrm_core.services import resources

        with self._ctx() as ctx:
            return resources.remove_resource(ctx, ref)

    # -- events ----------------------------------------------------------

    def events(self, limit: int, after_id: int | None) -> list[EventPublic]:
        from qrm_core.services import events

        with self._ctx() as ctx:
            return events.list_events(ctx, limit=limit, after_id=after_id)

    # -- plugins ---------------------------------------------------------

    def plugins_list(self) -> list[PluginPublic]:
        return [PluginPublic(**r.to_dict()) for r in self.plugins.entries(check_drivers=True)]

    def plugins_set_enabled(self, name: str, enabled: bool) -> bool:
        from qrm_core.services import plugin_state

        with self._ctx() as ctx:
            changed = plugin_state.set_enabled(ctx, name, enabled)
        if changed:
            set_plugin_system(None)
            self._plugins = None
        return changed

    # -- users -----------------------------------------------------------

    def user_add(self, name: str, password: str, role: str) -> UserPublic:
        from qrm_core.services import users

        with self._ctx() as ctx:
            return users.create_user(ctx, name=name, password=password, role=role)

    def user_list(self) -> list[UserPublic]:
        from qrm_core.services import users

        with self._ctx() as ctx:
            return users.list_users(ctx)

    def user_passwd(self, name: str, password: str) -> UserPublic:
        from qrm_core.services import users

        with self._ctx() as ctx:
            return users.set_password(ctx, name=name, password=password)

    def user_remove(self, name: str) -> UserPublic:
        from qrm_core.services import users

        with self._ctx() as ctx:
            return users.remove_user(ctx, name)


def _path(value: str | Path | None) -> str | None:
    return str(value) if value is not None else None
