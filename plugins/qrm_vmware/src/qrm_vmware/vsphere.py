"""Sessions with vCenter or ESXi through pyVmomi (imported here, by the driver and the sync only).

Three rules hold for everything qrm asks vCenter:

* **Inventory through the PropertyCollector.** Many objects and many
  properties come back in one ``RetrievePropertiesEx`` over a ContainerView
  (or a traversal from one object), paged with
  ``ContinueRetrievePropertiesEx``; never attribute by attribute, which costs
  one round trip per property of every object.
* **Tasks are waited for with a timeout** (``QRM_VMWARE_TASK_TIMEOUT``): one
  look at the task first (most finish at once), then vCenter's own updates
  (``WaitForUpdatesEx`` on a private PropertyCollector) until it ends. A
  failed task becomes one line: what qrm asked, and vCenter's fault.
* **Every fault is one line** (:class:`~qrm_core.errors.DriverError` and
  friends), never a traceback or a SOAP dump.

A :class:`Pool` keeps one logged-in session per connection and logs in again
when vCenter has dropped it (``NotAuthenticated``).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from qrm_core.plugin_api import AuthError, DriverError, NotFound, QrmError
from qrm_vmware.connections import Connection
from qrm_vmware.settings import VmwareSettings

log = logging.getLogger("qrm.plugins.vmware")
T = TypeVar("T")

PC = vmodl.query.PropertyCollector
_SPACE = re.compile(r"\s+")


class UnreachableError(DriverError):
    code = "vcenter_unreachable"
    http_status = 502


class TaskFailed(DriverError):
    """A vCenter task ended in error; ``fault`` is vCenter's fault type (``InvalidPowerState``)."""

    code = "vcenter_task_failed"
    http_status = 502

    def __init__(self, message: str, fault: str = "") -> None:
        super().__init__(message, fault=fault)
        self.fault = fault


def fault_name(fault: Any) -> str:
    return str(getattr(type(fault), "_wsdlName", type(fault).__name__))


def describe_fault(fault: Any) -> str:
    """vCenter's fault as one line: ``InvalidPowerState: the operation is not allowed ...``."""
    name = fault_name(fault)
    message = str(getattr(fault, "msg", "") or "")
    if not message:
        messages = getattr(fault, "faultMessage", None) or []
        message = "; ".join(str(getattr(m, "message", "") or "") for m in messages if m)
    message = _SPACE.sub(" ", message).strip()
    return f"{name}: {message}" if message and message != name else name


def one_line(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def _ssl_context(connection: Connection) -> ssl.SSLContext:
    if connection.insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    context = ssl.create_default_context()
    if connection.ca_file:
        try:
            context.load_verify_locations(cafile=connection.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise DriverError(f"cannot use the CA file {connection.ca_file}: {exc}") from None
    return context


def connection_error(connection: Connection, exc: BaseException) -> QrmError:
    """What a failed connect means for the user, in one line."""
    where = connection.url
    if isinstance(exc, vim.fault.InvalidLogin):
        return AuthError(f"vCenter refused the login for {connection.username} ({where})")
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or str(exc)
        return UnreachableError(
            f"the certificate of {connection.host}:{connection.port} cannot be verified ({reason}); "
            "give --ca-file with the CA that signed it, or --insecure to skip the check "
            "(then anyone on the path can read the password)"
        )
    if isinstance(exc, ssl.SSLError):
        return UnreachableError(f"TLS with {where} failed: {one_line(str(exc))}")
    if isinstance(exc, socket.gaierror):
        return UnreachableError(
            f"cannot reach vCenter at {where}: the name {connection.host} does not resolve"
        )
    if isinstance(exc, TimeoutError | socket.timeout):
        return UnreachableError(f"cannot reach vCenter at {where}: no answer (timed out)")
    if isinstance(exc, ConnectionRefusedError):
        return UnreachableError(f"cannot reach vCenter at {where}: connection refused")
    if isinstance(exc, OSError):
        return UnreachableError(f"cannot reach vCenter at {where}: {exc.strerror or one_line(str(exc))}")
    if isinstance(exc, http.client.HTTPException):
        return UnreachableError(
            f"{where} does not answer like vCenter: {one_line(str(exc)) or type(exc).__name__}"
        )
    if isinstance(exc, vmodl.MethodFault):
        return DriverError(f"vCenter at {where} refused the connection: {describe_fault(exc)}")
    return UnreachableError(
        f"{where} does not answer like vCenter or ESXi: {one_line(str(exc)) or type(exc).__name__}"
    )


@dataclass(frozen=True)
class Obj:
    """One managed object and the properties retrieved for it (unset ones are absent)."""

    ref: Any
    props: dict[str, Any]

    @property
    def moid(self) -> str:
        return str(self.ref._moId)

    @property
    def kind(self) -> str:
        return str(self.ref._wsdlName)

    def get(self, path: str, default: Any = None) -> Any:
        return self.props.get(path, default)


class Session:
    """One login to a vCenter or ESXi host."""

    def __init__(self, connection: Connection, settings: VmwareSettings) -> None:
        self.connection = connection
        self.settings = settings
        self.si: Any = None
        self.content: Any = None
        self._lock = threading.Lock()

    # -- connecting ------------------------------------------------------

    def login(self) -> Session:
        connection = self.connection
        context = _ssl_context(connection)
        try:
            si = SmartConnect(
                protocol="https",
                host=connection.host.strip("[]"),
                port=connection.port,
                path=connection.path,
                user=connection.username,
                pwd=connection.password,
                sslContext=context,
                httpConnectionTimeout=self.settings.connect_timeout,
            )
            content = si.RetrieveContent()
        except Exception as exc:  # noqa: BLE001 - pyVmomi raises faults, socket, TLS and HTTP errors here
            raise connection_error(connection, exc) from None
        self.si, self.content = si, content
        return self

    def logout(self) -> None:
        si, self.si = self.si, None
        if si is not None:
            with contextlib.suppress(Exception):
                Disconnect(si)

    @property
    def about(self) -> Any:
        return self.content.about

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one SOAP call; a fault or a broken connection is one line naming ``what``."""
        try:
            return fn(*args, **kwargs)
        except vim.fault.NotAuthenticated:
            raise
        except vmodl.fault.ManagedObjectNotFound as exc:
            raise NotFound(f"{what}: vCenter no longer has that object ({describe_fault(exc)})") from None
        except vmodl.MethodFault as exc:
            raise DriverError(f"{what}: vCenter refused: {describe_fault(exc)}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise connection_error(self.connection, exc) from None

    # -- the PropertyCollector -------------------------------------------

    def _retrieve(self, specs: list[Any]) -> list[Obj]:
        collector = self.content.propertyCollector
        options = PC.RetrieveOptions(maxObjects=self.settings.page_size)
        result = collector.RetrievePropertiesEx(specSet=specs, options=options)
        found: list[Obj] = []
        while result is not None:
            for item in result.objects or ():
                found.append(Obj(item.obj, {p.name: p.val for p in item.propSet or ()}))
            token = result.token
            if not token:
                break
            result = collector.ContinueRetrievePropertiesEx(token=token)
        return found

    def retrieve_view(
        self, kinds: Sequence[tuple[type, Sequence[str]]], root: Any = None, what: str = "inventory"
    ) -> list[Obj]:
        """Every object of the given types under ``root`` (default: the whole
        inventory), with the given properties: a ContainerView and one
        RetrievePropertiesEx (plus one ContinueRetrievePropertiesEx per
        further page)."""

        def run() -> list[Obj]:
            view = self.content.viewManager.CreateContainerView(
                container=root or self.content.rootFolder, type=[k for k, _ in kinds], recursive=True
            )
            try:
                spec = PC.FilterSpec(
                    objectSet=[
                        PC.ObjectSpec(
                            obj=view,
                            skip=True,
                            selectSet=[
                                PC.TraversalSpec(name="view", type=vim.view.ContainerView, path="view")
                            ],
                        )
                    ],
                    propSet=[PC.PropertySpec(type=k, pathSet=list(paths)) for k, paths in kinds],
                )
                return self._retrieve([spec])
            finally:
                with contextlib.suppress(Exception):
                    view.Destroy()

        return self.call(f"reading the {what}", run)

    def retrieve_objects(
        self,
        objects: Iterable[Any],
        kinds: Sequence[tuple[type, Sequence[str]]],
        traversal: Sequence[Any] = (),
        *,
        skip: bool = False,
        what: str = "objects",
    ) -> list[Obj]:
        """Properties of the given objects (and of what ``traversal`` reaches from them), in one call."""
        specs = [
            PC.FilterSpec(
                objectSet=[PC.ObjectSpec(obj=o, skip=skip, selectSet=list(traversal)) for o in objects],
                propSet=[PC.PropertySpec(type=k, pathSet=list(paths)) for k, paths in kinds],
            )
        ]
        if not specs[0].objectSet:
            return []
        return self.call(f"reading {what}", self._retrieve, specs)

    # -- tasks -----------------------------------------------------------

    def wait(self, task: Any, what: str, timeout: float | None = None) -> Any:
        """Wait for ``task``; its result, or :class:`TaskFailed` with vCenter's fault in one line."""
        limit = self.settings.task_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        paths = ["info.state", "info.error", "info.result"]
        state = self._task_state(task, paths, what)
        if state["info.state"] not in ("success", "error"):
            state = self._follow_task(task, paths, state, deadline, what, limit)
        if state["info.state"] == "error":
            fault = state.get("info.error")
            raise TaskFailed(
                f"{what} failed: {describe_fault(fault) if fault is not None else 'vCenter gave no reason'}",
                fault_name(fault) if fault is not None else "",
            )
        return state.get("info.result")

    def _task_state(self, task: Any, paths: list[str], what: str) -> dict[str, Any]:
        found = self.retrieve_objects([task], [(vim.Task, paths)], what=f"the task of {what}")
        return dict(found[0].props) if found else {"info.state": "error"}

    def _follow_task(
        self, task: Any, paths: list[str], state: dict[str, Any], deadline: float, what: str, limit: float
    ) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            collector = self.content.propertyCollector.CreatePropertyCollector()
            try:
                collector.CreateFilter(
                    PC.FilterSpec(
                        objectSet=[PC.ObjectSpec(obj=task)],
                        propSet=[PC.PropertySpec(type=vim.Task, pathSet=paths)],
                    ),
                    partialUpdates=False,
                )
                version = ""
                current = dict(state)
                while current.get("info.state") not in ("success", "error"):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise DriverError(
                            f"{what} did not finish within {limit:g} s (QRM_VMWARE_TASK_TIMEOUT); "
                            "it may still complete in vCenter"
                        )
                    update = collector.WaitForUpdatesEx(
                        version=version, options=PC.WaitOptions(maxWaitSeconds=max(1, min(int(left), 60)))
                    )
                    if update is None:
                        continue
                    version = update.version
                    for filter_update in update.filterSet or ():
                        for change in filter_update.objectSet or ():
                            for item in change.changeSet or ():
                                current[item.name] = item.val
                return current
            finally:
                with contextlib.suppress(Exception):
                    collector.DestroyPropertyCollector()

        return self.call(f"waiting for {what}", run)


class Pool:
    """One session per connection, shared by every thread; logs in again when needed."""

    def __init__(self) -> None:
        self._sessions: dict[str, tuple[tuple[Any, ...], Session]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _fingerprint(connection: Connection) -> tuple[Any, ...]:
        return (
            connection.url,
            connection.username,
            connection.password,
            connection.insecure,
            connection.ca_file,
        )

    def session(self, connection: Connection, settings: VmwareSettings) -> Session:
        with self._lock:
            known = self._sessions.get(connection.name)
            if known is not None and known[0] == self._fingerprint(connection):
                known[1].settings = settings  # the caller's timeouts and page size
                return known[1]
        session = Session(connection, settings).login()
        with self._lock:
            old = self._sessions.get(connection.name)
            self._sessions[connection.name] = (self._fingerprint(connection), session)
        if old is not None and old[1] is not session:
            old[1].logout()
        return session

    def run(self, connection: Connection, settings: VmwareSettings, fn: Callable[[Session], T]) -> T:
        """``fn(session)``; once more with a fresh login if vCenter dropped the session."""
        session = self.session(connection, settings)
        try:
            return fn(session)
        except vim.fault.NotAuthenticated:
            self.forget(connection.name)
            session = self.session(connection, settings)
            try:
                return fn(session)
            except vim.fault.NotAuthenticated:
                raise AuthError(
                    f"vCenter {connection.url} keeps dropping the session of {connection.username}"
                ) from None

    def forget(self, name: str) -> None:
        with self._lock:
            known = self._sessions.pop(name, None)
        if known is not None:
            known[1].logout()

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for _, session in sessions:
            session.logout()


#: The process's sessions (the driver, the sync and the watcher share them).
POOL = Pool()
