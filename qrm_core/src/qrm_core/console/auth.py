"""Who is using the console: the session cookie, CSRF tokens and roles.

The rules (password check, throttling, audit, session lifetime) are in
:mod:`qrm_core.services.sessions`; this module only moves the secret between
the cookie and the service and refuses forms without their CSRF token.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from qrm_core.errors import AuthError, Forbidden, QrmError
from qrm_core.models import Role
from qrm_core.services import service_context, sessions

SESSION_COOKIE = "qrm_session"
#: Before login there is no session to bind a CSRF token to: the login form
#: carries a random token that must equal this cookie's (double submit).
LOGIN_COOKIE = "qrm_login_csrf"
ROLE_RANK = {Role.VIEWER.value: 0, Role.OPERATOR.value: 1, Role.ADMIN.value: 2}


class NotLoggedIn(Exception):
    """The request has no valid session: pages redirect to the login form."""


class CsrfRefused(QrmError):
    code = "csrf_refused"
    http_status = 403


@dataclass(frozen=True)
class ConsoleUser:
    name: str
    role: str
    secret: str

    @property
    def csrf(self) -> str:
        return sessions.csrf_token(self.secret)

    def can(self, role: str) -> bool:
        return ROLE_RANK.get(self.role, -1) >= ROLE_RANK[role]

    @property
    def operator(self) -> bool:
        return self.can(Role.OPERATOR.value)

    @property
    def admin(self) -> bool:
        return self.can(Role.ADMIN.value)

    def require(self, role: Role) -> None:
        """The same refusal as the API's for a user below ``role``."""
        if not self.can(role.value):
            raise Forbidden(f"user {self.name} ({self.role}) may not do this; it needs {role.value}")


def secure_request(request: Request) -> bool:
    """Served over TLS (directly, or behind a proxy that says so)."""
    if request.url.scheme == "https":
        return True
    return request.headers.get("x-forwarded-proto", "").lower() == "https"


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict" if name == SESSION_COOKIE else "lax",
        secure=secure_request(request),
    )


def _lookup(request: Request) -> ConsoleUser | None:
    secret = request.cookies.get(SESSION_COOKIE)
    if not secret:
        return None
    state = request.app.state
    with service_context(state.settings, actor="console", plugins=state.plugins, check_schema=False) as ctx:
        try:
            user = sessions.authenticate(ctx, secret)
        except AuthError:
            return None
    return ConsoleUser(name=user.name, role=user.role, secret=secret)


async def current_user(request: Request) -> ConsoleUser | None:
    cached: ConsoleUser | None = getattr(request.state, "console_user", None)
    if cached is not None:
        return cached
    user = await run_in_threadpool(_lookup, request)
    request.state.console_user = user
    return user


async def page_user(request: Request) -> ConsoleUser:
    """A dependency for pages: the logged-in user, or a redirect to the login form."""
    user = await current_user(request)
    if user is None:
        raise NotLoggedIn
    return user


async def form_user(request: Request) -> ConsoleUser:
    """A dependency for every form post: a session and the form's CSRF token."""
    user = await current_user(request)
    form = await request.form()
    if user is None:
        raise NotLoggedIn
    if not sessions.check_csrf(user.secret, _field(form.get("csrf_token"))):
        raise CsrfRefused(
            "the form came without its security token (CSRF) or from another site; "
            "nothing was changed: reload the page and try again"
        )
    return user


def _field(value: object) -> str | None:
    return value if isinstance(value, str) else None


def new_login_token() -> str:
    return secrets.token_urlsafe(24)


def check_login_token(request: Request, presented: str | None) -> bool:
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    return bool(cookie) and bool(presented) and hmac.compare_digest(cookie, presented or "")
