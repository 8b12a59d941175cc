"""The errors qrm reports to its users.

Every error a user can cause is a :class:`QrmError` with a stable ``code``
(used in the API's JSON error bodies and in ``--output json``), an HTTP status,
and a one-line message that says what is wrong and, where it helps, what to do.
Anything else escaping to the CLI or API is a bug.
"""

from __future__ import annotations

from typing import Any, ClassVar


class QrmError(Exception):
    """Base of every error meant for a user."""

    code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 400

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class InvalidInput(QrmError):
    code = "invalid_input"
    http_status = 422


class NotFound(QrmError):
    code = "not_found"
    http_status = 404


class AlreadyExists(QrmError):
    code = "already_exists"
    http_status = 409


class InUse(QrmError):
    """The object is still referenced by something else."""

    code = "in_use"
    http_status = 409


class Conflict(QrmError):
    """The request contradicts the current state (e.g. a concurrent change)."""

    code = "conflict"
    http_status = 409


class IllegalTransition(QrmError):
    code = "illegal_transition"
    http_status = 409


class NotInitialized(QrmError):
    code = "not_initialized"
    http_status = 503


class DatabaseUnavailable(QrmError):
    code = "database_unavailable"
    http_status = 503


class ServerUnavailable(QrmError):
    """The qrm server given with --server cannot be reached."""

    code = "server_unavailable"
    http_status = 503


class PluginError(QrmError):
    """A plugin is missing, broken, or failed while doing its part."""

    code = "plugin_error"
    http_status = 500


class DriverNotFound(PluginError):
    code = "driver_not_found"
    http_status = 422

    def __init__(self, namespace: str, name: str, available: list[str]) -> None:
        kind = {
            "qrm.storage": "storage type",
            "qrm.hypervisors": "hypervisor",
            "qrm.power": "power driver",
        }.get(namespace, f"{namespace} driver")
        installed = ", ".join(available) if available else "none"
        super().__init__(
            f"unknown {kind} {name!r}; installed: {installed}",
            namespace=namespace,
            name=name,
            available=available,
        )


class DriverLoadError(PluginError):
    code = "driver_load_error"
    http_status = 500

    def __init__(self, namespace: str, name: str, reason: str) -> None:
        super().__init__(
            f"driver {name!r} ({namespace}) failed to load: {reason}",
            namespace=namespace,
            name=name,
            reason=reason,
        )


class DriverError(QrmError):
    """A driver refused or failed an operation on a real backend."""

    code = "driver_error"
    http_status = 502


class UnsupportedOperation(QrmError):
    """A driver cannot do an optional operation (on this host or server):
    ``xen on hv1 cannot pin CPUs``."""

    code = "unsupported_operation"
    http_status = 409


class AuthError(QrmError):
    code = "unauthorized"
    http_status = 401


class Forbidden(QrmError):
    code = "forbidden"
    http_status = 403


class TooManyAttempts(QrmError):
    """Logins refused for a while after too many failures (HTTP 429 with
    ``Retry-After``; ``details["retry_after"]`` holds the seconds)."""

    code = "too_many_attempts"
    http_status = 429


def error_for_code(code: str, message: str, details: dict[str, Any] | None = None) -> QrmError:
    """Rebuild the error a server reported (remote CLI), by its stable code."""

    def subclasses(cls: type[QrmError]) -> list[type[QrmError]]:
        found = [cls]
        for sub in cls.__subclasses__():
            found.extend(subclasses(sub))
        return found

    for cls in subclasses(QrmError):
        if cls.code == code and cls.__init__ is QrmError.__init__:
            return cls(message, **(details or {}))
    error = QrmError(message, **(details or {}))
    error.code = code  # type: ignore[misc]
    return error
