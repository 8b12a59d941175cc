"""Request dependencies: the service context, and who is asking (users and machines)."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security.http import HTTPBase

from qrm_core.errors import AuthError, Forbidden
from qrm_core.models import Role
from qrm_core.services import ServiceContext, service_context, tokens, users

ROLE_RANK = {Role.VIEWER.value: 0, Role.OPERATOR.value: 1, Role.ADMIN.value: 2}


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    via: str  # "password" or "token"


class _PasswordCache:
    """Argon2 is deliberately slow (~50 ms); a CLI in remote mode sends the
    password with every request. Remember a successful check briefly, keyed by
    a hash of the password and the stored hash (a password change invalidates)."""

    def __init__(self, ttl: float = 60.0) -> None:
        self.ttl = ttl
        self._ok: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()

    def check(self, name: str, password: str, stored_hash: str) -> bool:
        key = (name, hashlib.sha256(password.encode()).hexdigest(), stored_hash)
        now = time.monotonic()
        with self._lock:
            expires = self._ok.get(key)
            if expires is not None and expires > now:
                return True
        if not users.verify_password(stored_hash, password):
            return False
        with self._lock:
            if len(self._ok) > 1000:
                self._ok.clear()
            self._ok[key] = now + self.ttl
        return True


password_cache = _PasswordCache()


def get_ctx(request: Request) -> Iterator[ServiceContext]:
    """A service context per request, acting as the authenticated user if any."""
    state = request.app.state
    principal: Principal | None = getattr(request.state, "principal", None)
    actor = principal.name if principal else "anonymous"
    with service_context(state.settings, actor=actor, plugins=state.plugins, check_schema=False) as ctx:
        yield ctx


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def _authenticate(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    state = request.app.state
    with service_context(state.settings, actor="auth", plugins=state.plugins, check_schema=False) as ctx:
        if scheme.lower() == "basic":
            try:
                name, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise AuthError("malformed basic credentials") from None
            user = users.authenticate(
                ctx,
                name,
                password,
                address=request.client.host if request.client else None,
                via="API",
                verify=lambda row, given: password_cache.check(row.name, given, row.password_hash),
            )
            return Principal(name=user.name, role=user.role, via="password")
        if scheme.lower() == "bearer" and value.strip():
            user = tokens.authenticate(ctx, value.strip())
            return Principal(name=user.name, role=user.role, via="token")
    raise AuthError("authentication required (HTTP basic with user and password, or a bearer API token)")


class _Scheme(HTTPBase):
    """A security scheme for the OpenAPI document (``securitySchemes``, and each
    operation's ``security`` with the role it needs). It reads nothing:
    :func:`_authenticate` checks the credentials, UTF-8 passwords included."""

    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        return None


_password_scheme = _Scheme(
    scheme="basic", scheme_name="basicAuth", description="a qrm user's name and password"
)
_token_scheme = _Scheme(
    scheme="bearer",
    scheme_name="apiToken",
    description="an API token (qrm token create, POST /api/v1/auth/tokens)",
)


def require(role: Role) -> Callable[..., Principal]:
    """A dependency admitting users of ``role`` or higher."""

    def dependency(
        request: Request,
        _password: None = Security(_password_scheme, scopes=[role.value]),
        _token: None = Security(_token_scheme, scopes=[role.value]),
    ) -> Principal:
        principal = _authenticate(request)
        if ROLE_RANK[principal.role] < ROLE_RANK[role.value]:
            raise Forbidden(
                f"user {principal.name} ({principal.role}) may not do this; it needs {role.value}"
            )
        request.state.principal = principal
        return principal

    return dependency


Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
Ctx = Annotated[ServiceContext, Depends(get_ctx)]
