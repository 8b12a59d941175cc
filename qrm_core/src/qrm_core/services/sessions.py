"""Logins to the web console: sessions held in a cookie, checked per request.

A session is a random secret the browser keeps in an HttpOnly cookie; the
database keeps only its SHA-256 hash (as for API tokens: the secret is 32
random bytes, so a slow hash would buy nothing and cost every page), who it
belongs to and when it expires. Logging out deletes the row, so a copied
cookie stops working at once; so does changing the user's password or
removing the user. The user's role is read with the session on every
request, so a role change applies at once too.

Logging in checks the password with :func:`qrm_core.services.users.authenticate`,
the same rule (and the same throttling and audit of failures) as the API's
password logins. The forms' CSRF token is derived from the session secret
(:func:`csrf_token`), so it needs no storage and dies with the session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlmodel import col, delete, select

from qrm_core.errors import AuthError
from qrm_core.models import ConsoleSession, User, UserPublic, utcnow
from qrm_core.services import ServiceContext, users

#: How long a console login lasts.
SESSION_LIFETIME = timedelta(hours=12)
#: Sessions kept per user; the oldest go when a user logs in more often.
MAX_SESSIONS_PER_USER = 50


@dataclass(frozen=True)
class ConsoleLogin:
    """A session just opened: the secret goes into the cookie, once."""

    secret: str
    user: UserPublic
    expires_in: int  # seconds


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def csrf_token(secret: str) -> str:
    """The token every console form of this session carries."""
    return hmac.new(secret.encode(), b"qrm console csrf", hashlib.sha256).hexdigest()


def check_csrf(secret: str, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(csrf_token(secret), str(presented))


def login(ctx: ServiceContext, *, name: str, password: str, client: str | None = None) -> ConsoleLogin:
    """Check a user's password and open a console session for them."""
    where = f" from {client}" if client else ""
    user = users.authenticate(ctx, name, password, address=client, via="console")
    row = ctx.session.exec(select(User).where(User.name == user.name)).one()
    now = utcnow()
    ctx.session.exec(delete(ConsoleSession).where(col(ConsoleSession.expires_at) <= now))
    mine = ctx.session.exec(
        select(ConsoleSession.id)
        .where(ConsoleSession.user_id == row.id)
        .order_by(col(ConsoleSession.created_at).desc(), col(ConsoleSession.id).desc())
    ).all()
    stale = list(mine[MAX_SESSIONS_PER_USER - 1 :])
    if stale:
        ctx.session.exec(delete(ConsoleSession).where(col(ConsoleSession.id).in_(stale)))
    secret = secrets.token_urlsafe(32)
    assert row.id is not None
    ctx.session.add(
        ConsoleSession(
            token_hash=_hash(secret), user_id=row.id, created_at=now, expires_at=now + SESSION_LIFETIME
        )
    )
    ctx.record("user", user.name, f"{user.name} logged in to the console{where}")
    ctx.commit()
    return ConsoleLogin(secret=secret, user=user, expires_in=int(SESSION_LIFETIME.total_seconds()))


def authenticate(ctx: ServiceContext, secret: str) -> UserPublic:
    """The user a console session cookie stands for; AuthError when it has
    expired, was logged out, or its user's password changed since."""
    if not secret or len(secret) > 200:
        raise AuthError("not logged in")
    found = ctx.session.exec(
        select(ConsoleSession, User)
        .join(User, col(User.id) == col(ConsoleSession.user_id))
        .where(ConsoleSession.token_hash == _hash(secret))
    ).first()
    if found is None:
        raise AuthError("not logged in, or the session ended; log in again")
    session_row, user = found
    if session_row.expires_at <= utcnow():
        raise AuthError("the session expired; log in again")
    return UserPublic.model_validate(user, from_attributes=True)


def logout(ctx: ServiceContext, secret: str) -> None:
    """End a console session (nothing happens for an unknown one)."""
    row = ctx.session.exec(select(ConsoleSession).where(ConsoleSession.token_hash == _hash(secret))).first()
    if row is None:
        ctx.rollback()
        return
    user = ctx.session.get(User, row.user_id)
    ctx.session.delete(row)
    if user is not None:
        ctx.record("user", user.name, f"{user.name} logged out of the console")
    ctx.commit()


def end_user_sessions(ctx: ServiceContext, user_id: int) -> None:
    """Drop every console session of a user in the current transaction (a
    password change: whoever had the old one is logged out)."""
    ctx.session.exec(delete(ConsoleSession).where(col(ConsoleSession.user_id) == user_id))
