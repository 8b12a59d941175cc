"""What the CLI talks to: the local database through the services
(:class:`~qrm_core.local_client.LocalClient`), or (with ``--server``) a qrm
server through its REST API (:class:`RemoteClient`). Both return the same
public shapes, so every command prints the same either way.

This module imports neither the database layer nor the services: a command
through a server starts without them (``LocalClient`` is imported on first use).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from qrm_core.errors import InvalidInput, ServerUnavailable, error_for_code
from qrm_core.shapes import (
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

T = TypeVar("T")


class Client(Protocol):
    """The operations behind the CLI."""

    def init(self, admin_password: str | None) -> InitPublic: ...

    def storage_add(
        self, name: str, type: str, address: str, comment: str | None, **options: Any
    ) -> StorageServerPublic: ...
    def storage_set(self, name: str, **options: Any) -> StorageServerPublic: ...
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
    def fs_image_capture(
        self, progress: Callable[[str], None] | None, **kwargs: Any
    ) -> FilesystemImagePublic: ...
    def fs_image_resume(
        self,
        name: str,
        identity: str | None,
        host_key: str | None,
        progress: Callable[[str], None] | None,
        password: str | None = None,
    ) -> FilesystemImagePublic: ...
    def fs_image_clone(
        self,
        source: str,
        name: str,
        storage: str | None,
        comment: str | None,
        progress: Callable[[str], None] | None = None,
    ) -> FilesystemImagePublic: ...
    def fs_image_snapshot(self, name: str, label: str | None) -> ImageSnapshotPublic: ...
    def fs_image_snapshots(self, name: str) -> list[ImageSnapshotPublic]: ...
    def fs_image_snapshot_remove(self, name: str, label: str) -> ImageSnapshotPublic: ...
    def fs_image_revert(self, name: str, label: str) -> ImageSnapshotPublic: ...
    def ve_reset(self, name: str, progress: Callable[[str], None] | None) -> VirtualEnvironmentPublic: ...
    def fs_image_import(
        self, progress: Callable[[str], None] | None, **kwargs: Any
    ) -> FilesystemImagePublic: ...

    def ve_create(self, **kwargs: Any) -> VirtualEnvironmentPublic: ...
    def ve_list(self, state: str | None) -> list[VirtualEnvironmentPublic]: ...
    def ve_show(self, name: str) -> VirtualEnvironmentDetail: ...
    def ve_set(
        self, name: str, monitor: list[str] | None, monitor_failover: bool | None
    ) -> VirtualEnvironmentPublic: ...
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
    def resource_set(self, ref: str, **kwargs: Any) -> ResourceDetail: ...
    def resource_power(self, ref: str, action: str) -> PowerStatePublic: ...

    def partition_list(self, host: str | None = None) -> list[PartitionPublic]: ...
    def partition_add(self, **kwargs: Any) -> list[PartitionPublic]: ...
    def partition_show(self, name: str, host: str | None) -> PartitionDetail: ...
    def partition_action(self, name: str, host: str | None, action: str, force: bool) -> PartitionPublic: ...
    def partition_set(
        self, name: str, host: str | None, memory_mb: int | None, cpus: int | None, mode: str
    ) -> PartitionPublic: ...
    def partition_pin(self, name: str, host: str | None, pinning: str, mode: str) -> PartitionPublic: ...
    def partition_migrate(self, name: str, host: str | None, to: str, offline: bool) -> PartitionPublic: ...
    def partition_sync(self, host: str) -> PartitionSyncPublic: ...
    def partition_remove(self, name: str, host: str | None) -> PartitionPublic: ...

    def events(self, limit: int, after_id: int | None) -> list[EventPublic]: ...

    def plugins_list(self) -> list[PluginPublic]: ...
    def plugins_set_enabled(self, name: str, enabled: bool) -> bool: ...

    def user_add(self, name: str, password: str, role: str) -> UserPublic: ...
    def user_list(self) -> list[UserPublic]: ...
    def user_passwd(self, name: str, password: str, current: str | None = None) -> UserPublic: ...
    def user_remove(self, name: str) -> UserPublic: ...

    def token_create(self, name: str, user: str | None) -> ApiTokenCreated: ...
    def token_list(self, user: str | None, all_users: bool) -> list[ApiTokenPublic]: ...
    def token_revoke(self, token_id: int) -> ApiTokenPublic: ...

    def enrollment_token(self) -> str: ...


def _given(options: dict[str, Any]) -> dict[str, Any]:
    """The options that were given (the API's defaults stand for the others)."""
    return {k: v for k, v in options.items() if v not in (None, (), [], {})}


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

        if not server.startswith(("http://", "https://")):
            raise InvalidInput(f"--server must be an http:// or https:// URL, not {server!r}")
        auth: Any = None
        headers = {"User-Agent": "qrm-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif user is not None:
            auth = httpx.BasicAuth(user, password or "")
        self.server = server.rstrip("/")
        self._user, self._password = (None, None) if token else (user, password)
        self._http = httpx.Client(base_url=self.server, auth=auth, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

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
        raise InvalidInput("qrm init works on a database, not through a server; run it where the server runs")

    # -- storage ---------------------------------------------------------

    def storage_add(
        self, name: str, type: str, address: str, comment: str | None, **options: Any
    ) -> StorageServerPublic:
        body = {"name": name, "type": type, "address": address, "comment": comment, **_given(options)}
        return StorageServerPublic.model_validate(self._request("POST", "/storage", json=body))

    def storage_set(self, name: str, **options: Any) -> StorageServerPublic:
        body = _given(options)
        return StorageServerPublic.model_validate(self._request("PATCH", f"/storage/{_q(name)}", json=body))

    def storage_list(self) -> list[StorageServerPublic]:
        return [StorageServerPublic.model_validate(x) for x in self._get("/storage")]

    def storage_show(self, name: str) -> StorageServerPublic:
        return StorageServerPublic.model_validate(self._get(f"/storage/{_q(name)}"))

    def storage_remove(self, name: str) -> StorageServerPublic:
        return StorageServerPublic.model_validate(self._request("DELETE", f"/storage/{_q(name)}"))

    # -- boot images -----------------------------------------------------

    def boot_image_add(self, **kwargs: Any) -> BootImagePublic:
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

    def fs_image_capture(
        self, progress: Callable[[str], None] | None, **kwargs: Any
    ) -> FilesystemImagePublic:
        started = FilesystemImagePublic.model_validate(
            self._request("POST", "/filesystem-images/capture", json=kwargs, timeout=300)
        )
        return self._follow(started.name, progress)

    def fs_image_resume(
        self,
        name: str,
        identity: str | None,
        host_key: str | None,
        progress: Callable[[str], None] | None,
        password: str | None = None,
    ) -> FilesystemImagePublic:
        self._request(
            "POST",
            f"/filesystem-images/{_q(name)}/capture",
            json={"identity": identity, "host_key": host_key, "password": password},
        )
        return self._follow(name, progress)

    def _follow(self, name: str, progress: Callable[[str], None] | None) -> FilesystemImagePublic:
        """The server copies in the background: show its progress until the image is ready."""
        import time

        from qrm_core.errors import DriverError, NotFound

        shown = ""
        while True:
            try:
                image = self.fs_image_show(name)
            except NotFound:
                raise DriverError(f"capture of {name} failed and was removed (see 'qrm events')") from None
            if image.state == "ready":
                return image
            if image.state == "error":
                raise DriverError(f"capture of {name}: {image.progress}")
            if progress is not None and image.progress and image.progress != shown:
                shown = image.progress
                progress(image.progress.removeprefix("capturing: "))
            time.sleep(1)

    def fs_image_clone(
        self,
        source: str,
        name: str,
        storage: str | None,
        comment: str | None,
        progress: Callable[[str], None] | None = None,
    ) -> FilesystemImagePublic:
        """The server copies and answers when done; meanwhile, a clone onto another
        storage server shows the progress the server keeps on the new image's row."""

        def clone() -> FilesystemImagePublic:
            return FilesystemImagePublic.model_validate(
                self._request(
                    "POST",
                    f"/filesystem-images/{_q(source)}/clone",
                    json={"name": name, "storage": storage, "comment": comment},
                    timeout=6 * 3600,
                )
            )

        if progress is None or storage is None:
            return clone()

        def clone_progress() -> str | None:
            image = self.fs_image_show(name)
            return image.progress.removeprefix("cloning: ") if image.state == "creating" else None

        return self._showing(clone, clone_progress, progress)

    def _showing(
        self,
        call: Callable[[], T],
        look: Callable[[], str | None],
        progress: Callable[[str], None],
        every: float = 0.5,
    ) -> T:
        """Make a long request while asking ``look`` what the server says about it (a
        second request every ``every`` seconds) and showing each new line."""
        from concurrent.futures import ThreadPoolExecutor

        from qrm_core.errors import NotFound

        shown = None
        with ThreadPoolExecutor(1, thread_name_prefix="qrm-request") as pool:
            future = pool.submit(call)
            while True:
                try:
                    return future.result(timeout=every)
                except TimeoutError:
                    pass
                try:
                    line = look()
                except NotFound:
                    line = None
                if line and line != shown:
                    shown = line
                    progress(line)

    def fs_image_snapshot(self, name: str, label: str | None) -> ImageSnapshotPublic:
        return ImageSnapshotPublic.model_validate(
            self._request(
                "POST", f"/filesystem-images/{_q(name)}/snapshots", json={"label": label}, timeout=6 * 3600
            )
        )

    def fs_image_snapshots(self, name: str) -> list[ImageSnapshotPublic]:
        return [
            ImageSnapshotPublic.model_validate(x)
            for x in self._get(f"/filesystem-images/{_q(name)}/snapshots")
        ]

    def fs_image_snapshot_remove(self, name: str, label: str) -> ImageSnapshotPublic:
        return ImageSnapshotPublic.model_validate(
            self._request("DELETE", f"/filesystem-images/{_q(name)}/snapshots/{_q(label)}")
        )

    def fs_image_revert(self, name: str, label: str) -> ImageSnapshotPublic:
        return ImageSnapshotPublic.model_validate(
            self._request(
                "POST", f"/filesystem-images/{_q(name)}/revert", json={"label": label}, timeout=6 * 3600
            )
        )

    def fs_image_import(self, progress: Callable[[str], None] | None, **kwargs: Any) -> FilesystemImagePublic:
        if not str(kwargs.get("archive", "")).startswith(("http://", "https://")):
            raise InvalidInput(
                "through a server, import from an http(s) URL the server can fetch "
                "(or run the import where qrm keeps its data)"
            )
        if progress is not None:
            progress("the server downloads, checks and unpacks the archive")
        return FilesystemImagePublic.model_validate(
            self._request("POST", "/filesystem-images/import", json=kwargs, timeout=6 * 3600)
        )

    def ve_reset(self, name: str, progress: Callable[[str], None] | None) -> VirtualEnvironmentPublic:
        """The server reboots the VE's machines, holds their boot while it reverts the
        image, and lets them boot on; meanwhile the VE's state and problem (resetting:
        waiting for its machines to reboot, reverting its image) are shown."""

        def reset() -> VirtualEnvironmentPublic:
            return VirtualEnvironmentPublic.model_validate(
                self._request("POST", f"/ves/{_q(name)}/reset", timeout=6 * 3600)
            )

        if progress is None:
            return reset()
        progress(f"resetting {name} on the server")

        def state() -> str | None:
            ve = self.ve_show(name)
            said = {"stopped": "stopped; reverting its filesystem image"}.get(ve.state, ve.state)
            return f"{name}: {said}" + (f" ({ve.problem})" if ve.problem and ve.state != "stopped" else "")

        return self._showing(reset, state, progress)

    def fs_image_remove(self, name: str, purge: bool) -> FilesystemImagePublic:
        return FilesystemImagePublic.model_validate(
            self._request("DELETE", f"/filesystem-images/{_q(name)}", params={"purge": purge})
        )

    # -- virtual environments -------------------------------------------

    def ve_create(self, **kwargs: Any) -> VirtualEnvironmentPublic:
        return VirtualEnvironmentPublic.model_validate(self._request("POST", "/ves", json=kwargs))

    def ve_list(self, state: str | None) -> list[VirtualEnvironmentPublic]:
        return [VirtualEnvironmentPublic.model_validate(x) for x in self._get("/ves", state=state)]

    def ve_show(self, name: str) -> VirtualEnvironmentDetail:
        return VirtualEnvironmentDetail.model_validate(self._get(f"/ves/{_q(name)}"))

    def ve_set(
        self, name: str, monitor: list[str] | None, monitor_failover: bool | None
    ) -> VirtualEnvironmentPublic:
        body = {
            k: v for k, v in (("monitor", monitor), ("monitor_failover", monitor_failover)) if v is not None
        }
        return VirtualEnvironmentPublic.model_validate(self._request("PATCH", f"/ves/{_q(name)}", json=body))

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

    def resource_set(self, ref: str, **kwargs: Any) -> ResourceDetail:
        return ResourceDetail.model_validate(self._request("PATCH", f"/resources/{_q(ref)}", json=kwargs))

    def resource_power(self, ref: str, action: str) -> PowerStatePublic:
        if action == "status":
            return PowerStatePublic.model_validate(self._get(f"/resources/{_q(ref)}/power"))
        return PowerStatePublic.model_validate(
            self._request("POST", f"/resources/{_q(ref)}/power/{_q(action)}")
        )

    def partition_list(self, host: str | None = None) -> list[PartitionPublic]:
        return [PartitionPublic.model_validate(x) for x in self._get("/partitions", host=host)]

    def partition_add(self, **kwargs: Any) -> list[PartitionPublic]:
        body = {("name" if k == "prefix" else k): val for k, val in kwargs.items()}
        return [PartitionPublic.model_validate(x) for x in self._request("POST", "/partitions", json=body)]

    def partition_show(self, name: str, host: str | None) -> PartitionDetail:
        return PartitionDetail.model_validate(self._get(f"/partitions/{_q(name)}", host=host))

    def _partition(
        self, method: str, name: str, host: str | None, tail: str = "", **body: Any
    ) -> PartitionPublic:
        params = {"host": host} if host else None
        return PartitionPublic.model_validate(
            self._request(method, f"/partitions/{_q(name)}{tail}", params=params, json=body or None)
        )

    def partition_action(self, name: str, host: str | None, action: str, force: bool) -> PartitionPublic:
        return self._partition("POST", name, host, f"/{_q(action)}", force=force)

    def partition_set(
        self, name: str, host: str | None, memory_mb: int | None, cpus: int | None, mode: str
    ) -> PartitionPublic:
        return self._partition("PATCH", name, host, memory_mb=memory_mb, cpus=cpus, mode=mode)

    def partition_pin(self, name: str, host: str | None, pinning: str, mode: str) -> PartitionPublic:
        return self._partition("POST", name, host, "/pin", pinning=pinning, mode=mode)

    def partition_migrate(self, name: str, host: str | None, to: str, offline: bool) -> PartitionPublic:
        return self._partition("POST", name, host, "/migrate", to=to, offline=offline)

    def partition_sync(self, host: str) -> PartitionSyncPublic:
        return PartitionSyncPublic.model_validate(self._request("POST", f"/resources/{_q(host)}/sync"))

    def partition_remove(self, name: str, host: str | None) -> PartitionPublic:
        return self._partition("DELETE", name, host)

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

    def user_passwd(self, name: str, password: str, current: str | None = None) -> UserPublic:
        if current is None and name == self._user:
            current = self._password  # changing your own: the password you logged in with
        body = {"password": password, **({"current_password": current} if current is not None else {})}
        return UserPublic.model_validate(self._request("POST", f"/users/{_q(name)}/password", json=body))

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


def __getattr__(name: str) -> Any:
    if name == "LocalClient":  # where it lived before; it needs the services
        from qrm_core.local_client import LocalClient

        return LocalClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
