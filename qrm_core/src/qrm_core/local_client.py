"""The CLI's client on this machine: the local database through the services
(``qrm`` without ``--server``). See :mod:`qrm_core.client`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from qrm_core.config import Settings
from qrm_core.models import (
    ApiTokenCreated,
    ApiTokenPublic,
    BootImagePublic,
    EventPublic,
    FilesystemImagePublic,
    ImageSnapshotPublic,
    InitPublic,
    PartitionDetail,
    PartitionPublic,
    PartitionSyncPublic,
    PluginPublic,
    PowerStatePublic,
    ResourceDetail,
    ResourceListPublic,
    ResourcePublic,
    StorageServerPublic,
    UserPublic,
    VirtualEnvironmentDetail,
    VirtualEnvironmentPublic,
)
from qrm_core.plugins import PluginSystem, get_plugin_system, set_plugin_system
from qrm_core.services import (
    agent,
    boot_images,
    events,
    partitions,
    plugin_state,
    power,
    resources,
    service_context,
    setup,
    site,
    tokens,
    users,
    virtual_environments,
)
from qrm_core.services import images as image_service
from qrm_core.services import storage as storage_service

T = TypeVar("T")


def _ssh_change(options: dict[str, Any]) -> storage_service.SshChange:
    return storage_service.SshChange(
        user=options.get("ssh_user"),
        port=options.get("ssh_port"),
        key=options.get("ssh_key"),
        host_key=options.get("ssh_host_key"),
        local=bool(options.get("local", False)),
    )


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
        with service_context(self.settings, actor=self.actor, plugins=self.plugins) as ctx:
            yield ctx

    def _call(self, service: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one service function in its own unit of work."""
        with self._ctx() as ctx:
            return service(ctx, *args, **kwargs)

    # -- setup -----------------------------------------------------------

    def init(self, admin_password: str | None) -> InitPublic:
        return setup.init(
            self.settings, admin_password=admin_password, actor=self.actor, plugins=self.plugins
        )

    # -- storage ---------------------------------------------------------

    def storage_add(
        self, name: str, type: str, address: str, comment: str | None, **options: Any
    ) -> StorageServerPublic:
        """``options``: ``settings``, ``ssh_user``, ``ssh_port``, ``ssh_key`` (the key's
        text), ``ssh_host_key``, ``check`` (as the API's body)."""
        ssh = _ssh_change(options)
        return self._call(
            storage_service.add_storage,
            name=name,
            type=type,
            address=address,
            comment=comment,
            settings=options.get("settings") or {},
            ssh=ssh,
            check=options.get("check", True),
        )

    def storage_set(self, name: str, **options: Any) -> StorageServerPublic:
        """``options``: as :meth:`storage_add`, and ``comment``, ``unset``, ``local``."""
        return self._call(
            storage_service.set_storage,
            name,
            comment=options.get("comment"),
            settings=options.get("settings") or {},
            unset=options.get("unset") or (),
            ssh=_ssh_change(options),
            check=options.get("check", True),
        )

    def storage_list(self) -> list[StorageServerPublic]:
        return self._call(storage_service.list_storage)

    def storage_show(self, name: str) -> StorageServerPublic:
        return self._call(storage_service.show_storage, name)

    def storage_remove(self, name: str) -> StorageServerPublic:
        return self._call(storage_service.remove_storage, name)

    # -- boot images -----------------------------------------------------

    def boot_image_add(self, **kwargs: Any) -> BootImagePublic:
        return self._call(boot_images.add_boot_image, **kwargs)

    def boot_image_list(self) -> list[BootImagePublic]:
        return self._call(boot_images.list_boot_images)

    def boot_image_show(self, name: str) -> BootImagePublic:
        return self._call(boot_images.show_boot_image, name)

    def boot_image_set_default(self, name: str) -> BootImagePublic:
        return self._call(boot_images.set_default_boot_image, name)

    def boot_image_remove(self, name: str) -> BootImagePublic:
        return self._call(boot_images.remove_boot_image, name)

    # -- filesystem images ----------------------------------------------

    def fs_image_add(self, **kwargs: Any) -> FilesystemImagePublic:
        return self._call(storage_service.add_filesystem_image, **kwargs)

    def fs_image_list(self, storage: str | None) -> list[FilesystemImagePublic]:
        return self._call(storage_service.list_filesystem_images, storage=storage)

    def fs_image_show(self, name: str) -> FilesystemImagePublic:
        return self._call(storage_service.show_filesystem_image, name)

    def fs_image_remove(self, name: str, purge: bool) -> FilesystemImagePublic:
        return self._call(storage_service.remove_filesystem_image, name, purge=purge)

    def fs_image_capture(
        self, progress: Callable[[str], None] | None, **kwargs: Any
    ) -> FilesystemImagePublic:
        return self._call(image_service.capture_filesystem_image, progress=progress, **kwargs)

    def fs_image_resume(
        self,
        name: str,
        identity: str | None,
        host_key: str | None,
        progress: Callable[[str], None] | None,
        password: str | None = None,
    ) -> FilesystemImagePublic:
        return self._call(
            image_service.run_capture, name, identity=identity, host_key=host_key, progress=progress,
            password=password,
        )  # fmt: skip

    def fs_image_clone(
        self,
        source: str,
        name: str,
        storage: str | None,
        comment: str | None,
        progress: Callable[[str], None] | None = None,
    ) -> FilesystemImagePublic:
        return self._call(
            image_service.clone_filesystem_image,
            source,
            name=name,
            storage=storage,
            comment=comment,
            progress=progress,
        )

    def fs_image_snapshot(self, name: str, label: str | None) -> ImageSnapshotPublic:
        return self._call(image_service.snapshot_filesystem_image, name, label=label)

    def fs_image_snapshots(self, name: str) -> list[ImageSnapshotPublic]:
        return self._call(image_service.list_image_snapshots, name)

    def fs_image_snapshot_remove(self, name: str, label: str) -> ImageSnapshotPublic:
        return self._call(image_service.remove_image_snapshot, name, label)

    def fs_image_revert(self, name: str, label: str) -> ImageSnapshotPublic:
        return self._call(image_service.revert_filesystem_image, name, label=label)

    def ve_reset(self, name: str, progress: Callable[[str], None] | None) -> VirtualEnvironmentPublic:
        return self._call(image_service.reset_ve, name, progress=progress)

    def fs_image_import(self, progress: Callable[[str], None] | None, **kwargs: Any) -> FilesystemImagePublic:
        return self._call(image_service.import_filesystem_image, progress=progress, **kwargs)

    # -- virtual environments -------------------------------------------

    def ve_create(self, **kwargs: Any) -> VirtualEnvironmentPublic:
        return self._call(virtual_environments.create_ve, **kwargs)

    def ve_list(self, state: str | None) -> list[VirtualEnvironmentPublic]:
        return self._call(virtual_environments.list_ves, state=state)

    def ve_show(self, name: str) -> VirtualEnvironmentDetail:
        return self._call(virtual_environments.ve_detail, name)

    def ve_set(
        self, name: str, monitor: list[str] | None, monitor_failover: bool | None
    ) -> VirtualEnvironmentPublic:
        return self._call(
            virtual_environments.set_ve, name, monitor=monitor, monitor_failover=monitor_failover
        )

    def ve_remove(self, name: str) -> VirtualEnvironmentPublic:
        return self._call(virtual_environments.remove_ve, name)

    def ve_start(self, name: str) -> VirtualEnvironmentPublic:
        return self._call(virtual_environments.start_ve, name)

    def ve_stop(self, name: str) -> VirtualEnvironmentPublic:
        return self._call(virtual_environments.stop_ve, name)

    def ve_resize(self, name: str, pool_size: int) -> VirtualEnvironmentPublic:
        return self._call(virtual_environments.resize_ve, name, pool_size)

    # -- resources -------------------------------------------------------

    def resource_add(self, **kwargs: Any) -> ResourcePublic:
        return self._call(resources.add_resource, **kwargs)

    def resource_list(
        self,
        state: str | None = None,
        kind: str | None = None,
        ve: str | None = None,
        offset: int = 0,
        limit: int | None = None,
    ) -> ResourceListPublic:
        return self._call(resources.list_resources, state=state, kind=kind, ve=ve, offset=offset, limit=limit)

    def resource_show(self, ref: str) -> ResourceDetail:
        return self._call(resources.resource_detail, ref)

    def resource_remove(self, ref: str) -> ResourcePublic:
        return self._call(resources.remove_resource, ref)

    def resource_reboot(self, ref: str) -> ResourcePublic:
        with self._ctx() as ctx:
            agent.order_reboot(ctx, ref)
            return resources.show_resource(ctx, ref)

    def resource_halt(self, ref: str) -> ResourcePublic:
        with self._ctx() as ctx:
            agent.order_halt(ctx, ref)
            return resources.show_resource(ctx, ref)

    def resource_set(self, ref: str, **kwargs: Any) -> ResourceDetail:
        return self._call(resources.set_resource, ref, **kwargs)

    def resource_power(self, ref: str, action: str) -> PowerStatePublic:
        return self._call(power.power, ref, action)

    def partition_list(self, host: str | None = None) -> list[PartitionPublic]:
        return self._call(partitions.list_partitions, host)

    def partition_add(self, **kwargs: Any) -> list[PartitionPublic]:
        return self._call(partitions.add_partitions, **kwargs)

    def partition_show(self, name: str, host: str | None) -> PartitionDetail:
        return self._call(partitions.show_partition, name, host)

    def partition_action(self, name: str, host: str | None, action: str, force: bool) -> PartitionPublic:
        return self._call(partitions.partition_action, name, action, host, force=force)

    def partition_set(
        self, name: str, host: str | None, memory_mb: int | None, cpus: int | None, mode: str
    ) -> PartitionPublic:
        return self._call(partitions.set_partition, name, host, memory_mb=memory_mb, cpus=cpus, mode=mode)

    def partition_pin(self, name: str, host: str | None, pinning: str, mode: str) -> PartitionPublic:
        return self._call(partitions.pin_partition, name, pinning, host, mode=mode)

    def partition_migrate(self, name: str, host: str | None, to: str, offline: bool) -> PartitionPublic:
        return self._call(partitions.migrate_partition, name, to, host, offline=offline)

    def partition_sync(self, host: str) -> PartitionSyncPublic:
        return self._call(partitions.sync_host, host)

    def partition_remove(self, name: str, host: str | None) -> PartitionPublic:
        return self._call(partitions.remove_partition, name, host)

    # -- events ----------------------------------------------------------

    def events(self, limit: int, after_id: int | None) -> list[EventPublic]:
        return self._call(events.list_events, limit=limit, after_id=after_id)

    # -- plugins ---------------------------------------------------------

    def plugins_list(self) -> list[PluginPublic]:
        return [PluginPublic(**r.to_dict()) for r in self.plugins.entries(check_drivers=True)]

    def plugins_set_enabled(self, name: str, enabled: bool) -> bool:
        with self._ctx() as ctx:
            changed = plugin_state.set_enabled(ctx, name, enabled)
        if changed:
            set_plugin_system(None)
            self._plugins = None
        return changed

    # -- users -----------------------------------------------------------

    def user_add(self, name: str, password: str, role: str) -> UserPublic:
        return self._call(users.create_user, name=name, password=password, role=role)

    def user_list(self) -> list[UserPublic]:
        return self._call(users.list_users)

    def user_passwd(self, name: str, password: str, current: str | None = None) -> UserPublic:
        # The local CLI works on the database itself: whoever runs it could
        # as well run 'qrm init --admin-password'; no current password needed.
        return self._call(users.set_password, name=name, password=password)

    def user_remove(self, name: str) -> UserPublic:
        return self._call(users.remove_user, name)

    # -- API tokens (the local operator is trusted with every user's, as for users) --

    def token_create(self, name: str, user: str | None) -> ApiTokenCreated:
        return self._call(tokens.create_token, name=name, user=user, admin=True)

    def token_list(self, user: str | None, all_users: bool) -> list[ApiTokenPublic]:
        return self._call(tokens.list_tokens, user=user, all_users=all_users, admin=True)

    def token_revoke(self, token_id: int) -> ApiTokenPublic:
        return self._call(tokens.revoke_token, token_id, admin=True)

    def enrollment_token(self) -> str:
        return self._call(site.get_enrollment_token)
