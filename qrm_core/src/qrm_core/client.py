"""What the CLI talks to: the local database through the services, or (with
``--server``) a qrm server through its REST API. Both return the same public
shapes, so every command prints the same either way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from pydantic import BaseModel

from qrm_core.config import Settings
from qrm_core.models import (
    ApiTokenCreated,
    ApiTokenPublic,
    BootImagePublic,
    EventPublic,
    FilesystemImagePublic,
    PartitionPublic,
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
    disabled_by: str | None = None


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
    boot_image: str = ""


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
    def ve_start(self, name: str) -> VirtualEnvironmentPublic: ...
    def ve_stop(self, name: str) -> VirtualEnvironmentPublic: ...
    def ve_resize(self, name: str, pool_size: int) -> VirtualEnvironmentPublic: ...

    def resource_add(self, **kwargs: Any) -> ResourcePublic: ...
    def resource_list(
        self,
        state: str | None = None,
        kind: str | None = None,
        ve: str | None = None,
        offset: int = 0,
        limit: int | None = None,
    ) -> ResourceListPublic: ...
    def resource_show(self, ref: str) -> ResourceDetail: ...
    def resource_remove(self, ref: str) -> ResourcePublic: ...
    def resource_reboot(self, ref: str) -> ResourcePublic: ...
    def resource_halt(self, ref: str) -> ResourcePublic: ...
    def partition_list(self) -> list[PartitionPublic]: ...
    def partition_remove(self, name: str, host: str | None) -> PartitionPublic: ...

    def events(self, limit: int, after_id: int | None) -> list[EventPublic]: ...

    def plugins_list(self) -> list[PluginPublic]: ...
    def plugins_set_enabled(self, name: str, enabled: bool) -> bool: ...

    def user_add(self, name: str, password: str, role: str) -> UserPublic: ...
    def user_list(self) -> list[UserPublic]: ...
    def user_passwd(self, name: str, password: str) -> UserPublic: ...
    def user_remove(self, name: str) -> UserPublic: ...

    def token_create(self, name: str, user: str | None) -> ApiTokenCreated: ...
    def token_list(self, user: str | None, all_users: bool) -> list[ApiTokenPublic]: ...
    def token_revoke(self, token_id: int) -> ApiTokenPublic: ...

    def enrollment_token(self) -> str: ...


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

    def ve_start(self, name: str) -> VirtualEnvironmentPublic:
        from qrm_core.services import virtual_environments as ves

        with self._ctx() as ctx:
            return ves.start_ve(ctx, name)

    def ve_stop(self, name: str) -> VirtualEnvironmentPublic:
        from qrm_core.services import virtual_environments as ves

        with self._ctx() as ctx:
            return ves.stop_ve(ctx, name)

    def ve_resize(self, name: str, pool_size: int) -> VirtualEnvironmentPublic:
        from qrm_core.services import virtual_environments as ves

        with self._ctx() as ctx:
            return ves.resize_ve(ctx, name, pool_size)

    # -- resources -------------------------------------------------------

    def resource_add(self, **kwargs: Any) -> ResourcePublic:
        from qrm_core.services import resources

        with self._ctx() as ctx:
            return resources.add_resource(ctx, **kwargs)

    def resource_list(
        self,
        state: str | None = None,
        kind: str | None = None,
        ve: str | None = None,
        offset: int = 0,
        limit: int | None = None,
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

    def resource_reboot(self, ref: str) -> ResourcePublic:
        from qrm_core.services import agent, resources

        with self._ctx() as ctx:
            agent.order_reboot(ctx, ref)
            return resources.show_resource(ctx, ref)

    def resource_halt(self, ref: str) -> ResourcePublic:
        from qrm_core.services import agent, resources

        with self._ctx() as ctx:
            agent.order_halt(ctx, ref)
            return resources.show_resource(ctx, ref)

    def partition_list(self) -> list[PartitionPublic]:
        from qrm_core.services import partitions

        with self._ctx() as ctx:
            return partitions.list_partitions(ctx)

    def partition_remove(self, name: str, host: str | None) -> PartitionPublic:
        from qrm_core.services import partitions

        with self._ctx() as ctx:
            return partitions.remove_partition(ctx, name, host)

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

    # -- API tokens (the local operator is trusted with every user's, as for users) --

    def token_create(self, name: str, user: str | None) -> ApiTokenCreated:
        from qrm_core.services import tokens

        with self._ctx() as ctx:
            return tokens.create_token(ctx, name=name, user=user, admin=True)

    def token_list(self, user: str | None, all_users: bool) -> list[ApiTokenPublic]:
        from qrm_core.services import tokens

        with self._ctx() as ctx:
            return tokens.list_tokens(ctx, user=user, all_users=all_users, admin=True)

    def token_revoke(self, token_id: int) -> ApiTokenPublic:
        from qrm_core.services import tokens

        with self._ctx() as ctx:
            return tokens.revoke_token(ctx, token_id, admin=True)

    def enrollment_token(self) -> str:
        from qrm_core.services import site

        with self._ctx() as ctx:
            return site.get_enrollment_token(ctx)


class RemoteClient:
    """Runs the same operations through a qrm server's REST API (``qrm --server URL``)."""

    def __init__(
        self,
        server: str,
        *,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        import httpx

        from qrm_core.errors import InvalidInput

        if not server.startswith(("http://", "https://")):
            raise InvalidInput(f"--server must be an http:// or https:// URL, not {server!r}")
        auth: Any = None
        headers = {"User-Agent": "qrm-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif user is not None:
            auth = httpx.BasicAuth(user, password or "")
        self.server = server.rstrip("/")
        self._http = httpx.Client(base_url=self.server, auth=auth, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        from qrm_core.errors import ServerUnavailable, error_for_code

        try:
            response = self._http.request(method, "/api/v1" + path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerUnavailable(f"cannot reach the qrm server at {self.server}: {exc}") from None
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                raise error_for_code(error["code"], error["message"], error.get("details"))
            except (ValueError, KeyError, TypeError):
                raise ServerUnavailable(
                    f"the qrm server at {self.server} answered {response.status_code}: {response.text[:200]}"
                ) from None
        return response.json()

    def _get(self, path: str, **params: Any) -> Any:
        return self._request("GET", path, params={k: v for k, v in params.items() if v is not None})

    # -- setup -----------------------------------------------------------

    def init(self, admin_password: str | None) -> InitPublic:
        from qrm_core.errors import InvalidInput

        raise InvalidInput("qrm init works on a database, not through a server; run it where the server runs")

    # -- storage ---------------------------------------------------------

    def storage_add(self, name: str, type: str, address: str, comment: str | None) -> StorageServerPublic:
        body = {"name": name, "type": type, "address": address, "comment": comment}
        return StorageServerPublic.model_validate(self._request("POST", "/storage", json=body))

    def storage_list(self) -> list[StorageServerPublic]:
        return [StorageServerPublic.model_validate(x) for x in self._get("/storage")]

    def storage_show(self, name: str) -> StorageServerPublic:
        return StorageServerPublic.model_validate(self._get(f"/storage/{_q(name)}"))

    def storage_remove(self, name: str) -> StorageServerPublic:
        return StorageServerPublic.model_validate(self._request("DELETE", f"/storage/{_q(name)}"))

    # -- boot images -----------------------------------------------------

    def boot_image_add(self, **kwargs: Any) -> BootImagePublic:
        from qrm_core.errors import InvalidInput

        files: dict[str, Any] = {}
        handles = []
        try:
            for label in ("kernel", "initrd"):
                path = kwargs.pop(label, None)
                if path is not None:
                    try:
                        handle = open(path, "rb")
                    except OSError as exc:
                        raise InvalidInput(f"{label} {path!r}: {exc.strerror}") from None
                    handles.append(handle)
                    files[label] = (label, handle, "application/octet-stream")
            data = {
                k: ("true" if v is True else "false" if v is False else v)
                for k, v in kwargs.items()
                if v is not None
            }
            return BootImagePublic.model_validate(
                self._request("POST", "/boot-images", data=data, files=files or None)
            )
        finally:
            for handle in handles:
                handle.close()

    def boot_image_list(self) -> list[BootImagePublic]:
        return [BootImagePublic.model_validate(x) for x in self._get("/boot-images")]

    def boot_image_show(self, name: str) -> BootImagePublic:
        return BootImagePublic.model_validate(self._get(f"/boot-images/{_q(name)}"))

    def boot_image_set_default(self, name: str) -> BootImagePublic:
        return BootImagePublic.model_validate(self._request("POST", f"/boot-images/{_q(name)}/default"))

    def boot_image_remove(self, name: str) -> BootImagePublic:
        return BootImagePublic.model_validate(self._request("DELETE", f"/boot-images/{_q(name)}"))

    # -- filesystem images ----------------------------------------------

    def fs_image_add(self, **kwargs: Any) -> FilesystemImagePublic:
        return FilesystemImagePublic.model_validate(self._request("POST", "/filesystem-images", json=kwargs))

    def fs_image_list(self, storage: str | None) -> list[FilesystemImagePublic]:
        return [
            FilesystemImagePublic.model_validate(x) for x in self._get("/filesystem-images", storage=storage)
        ]

    def fs_image_show(self, name: str) -> FilesystemImagePublic:
        return FilesystemImagePublic.model_validate(self._get(f"/filesystem-images/{_q(name)}"))

    def fs_image_remove(self, name: str, purge: bool) -> FilesystemImagePublic:
        return FilesystemImagePublic.model_validate(
            self._request("DELETE", f"/filesystem-images/{_q(name)}", params={"purge": purge})
        )

    # -- virtual environments -------------------------------------------

    def ve_create(self, **kwargs: Any) -> VirtualEnvironmentPublic:
        return VirtualEnvironmentPublic.model_validate(self._request("POST", "/ves", json=kwargs))

    def ve_list(self, state: str | None) -> list[VirtualEnvironmentPublic]:
        return [VirtualEnvironmentPublic.model_validate(x) for x in self._get("/ves", state=state)]

    def ve_show(self, name: str) -> VirtualEnvironmentPublic:
        return VirtualEnvironmentPublic.model_validate(self._get(f"/ves/{_q(name)}"))

    def ve_remove(self, name: str) -> VirtualEnvironmentPublic:
        return VirtualEnvironmentPublic.model_validate(self._request("DELETE", f"/ves/{_q(name)}"))

    def ve_start(self, name: str) -> VirtualEnvironmentPublic:
        return VirtualEnvironmentPublic.model_validate(self._request("POST", f"/ves/{_q(name)}/start"))

    def ve_stop(self, name: str) -> VirtualEnvironmentPublic:
        return VirtualEnvironmentPublic.model_validate(self._request("POST", f"/ves/{_q(name)}/stop"))

    def ve_resize(self, name: str, pool_size: int) -> VirtualEnvironmentPublic:
        return VirtualEnvironmentPublic.model_validate(
            self._request("PATCH", f"/ves/{_q(name)}", json={"pool_size": pool_size})
        )

    # -- resources -------------------------------------------------------

    def resource_add(self, **kwargs: Any) -> ResourcePublic:
        return ResourcePublic.model_validate(self._request("POST", "/resources", json=kwargs))

    def resource_list(
        self,
        state: str | None = None,
        kind: str | None = None,
        ve: str | None = None,
        offset: int = 0,
        limit: int | None = None,
    ) -> ResourceListPublic:
        return ResourceListPublic.model_validate(
            self._get("/resources", state=state, kind=kind, ve=ve, offset=offset, limit=limit)
        )

    def resource_show(self, ref: str) -> ResourceDetail:
        return ResourceDetail.model_validate(self._get(f"/resources/{_q(ref)}"))

    def resource_remove(self, ref: str) -> ResourcePublic:
        return ResourcePublic.model_validate(self._request("DELETE", f"/resources/{_q(ref)}"))

    def resource_reboot(self, ref: str) -> ResourcePublic:
        return ResourcePublic.model_validate(self._request("POST", f"/resources/{_q(ref)}/reboot"))

    def resource_halt(self, ref: str) -> ResourcePublic:
        return ResourcePublic.model_validate(self._request("POST", f"/resources/{_q(ref)}/halt"))

    def partition_list(self) -> list[PartitionPublic]:
        return [PartitionPublic.model_validate(x) for x in self._get("/partitions")]

    def partition_remove(self, name: str, host: str | None) -> PartitionPublic:
        params = {"host": host} if host else None
        return PartitionPublic.model_validate(
            self._request("DELETE", f"/partitions/{_q(name)}", params=params)
        )

    # -- events, plugins, users -----------------------------------------

    def events(self, limit: int, after_id: int | None) -> list[EventPublic]:
        return [EventPublic.model_validate(x) for x in self._get("/events", limit=limit, after_id=after_id)]

    def plugins_list(self) -> list[PluginPublic]:
        return [PluginPublic.model_validate(x) for x in self._get("/plugins")]

    def plugins_set_enabled(self, name: str, enabled: bool) -> bool:
        result = self._request("POST", f"/plugins/{_q(name)}/{'enable' if enabled else 'disable'}")
        return bool(result["changed"])

    def user_add(self, name: str, password: str, role: str) -> UserPublic:
        body = {"name": name, "password": password, "role": role}
        return UserPublic.model_validate(self._request("POST", "/users", json=body))

    def user_list(self) -> list[UserPublic]:
        return [UserPublic.model_validate(x) for x in self._get("/users")]

    def user_passwd(self, name: str, password: str) -> UserPublic:
        return UserPublic.model_validate(
            self._request("POST", f"/users/{_q(name)}/password", json={"password": password})
        )

    def user_remove(self, name: str) -> UserPublic:
        return UserPublic.model_validate(self._request("DELETE", f"/users/{_q(name)}"))

    def token_create(self, name: str, user: str | None) -> ApiTokenCreated:
        body = {"name": name, "user": user}
        return ApiTokenCreated.model_validate(self._request("POST", "/auth/tokens", json=body))

    def token_list(self, user: str | None, all_users: bool) -> list[ApiTokenPublic]:
        return [
            ApiTokenPublic.model_validate(x)
            for x in self._get("/auth/tokens", user=user, all="true" if all_users else None)
        ]

    def token_revoke(self, token_id: int) -> ApiTokenPublic:
        return ApiTokenPublic.model_validate(self._request("DELETE", f"/auth/tokens/{token_id}"))

    def enrollment_token(self) -> str:
        return str(self._get("/site/enrollment-token")["token"])


def _q(part: str) -> str:
    from urllib.parse import quote

    return quote(part, safe="")
