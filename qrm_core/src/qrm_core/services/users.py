"""Users of the console: argon2 password hashes and roles."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlmodel import select

from qrm_core.errors import AlreadyExists, AuthError, Conflict, Forbidden, InvalidInput, NotFound
from qrm_core.models import Role, User, UserPublic
from qrm_core.services import ServiceContext, logins
from qrm_core.services import validation as v

DEFAULT_ADMIN = "qrm"
DEFAULT_PASSWORD = "qrm"  # openQRM's default login; the server refuses public addresses with it

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


#: The shortest password qrm accepts (NIST SP 800-63B's minimum for passwords a user chooses).
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024


def check_password_policy(password: str, name: str) -> str:
    """A password someone chooses for user ``name``: at least
    :data:`MIN_PASSWORD_LENGTH` characters, not the user name, not qrm's
    default. Only the default admin made by ``qrm init`` without
    ``--admin-password`` gets the default (the server then refuses to
    listen beyond loopback)."""
    if not isinstance(password, str) or not password:
        raise InvalidInput("the password must not be empty")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise InvalidInput(f"the password is too long (at most {MAX_PASSWORD_LENGTH} characters)")
    if password.lower() == DEFAULT_PASSWORD:
        raise InvalidInput(f"the password must not be {DEFAULT_PASSWORD!r}, qrm's default; choose another")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(
            f"the password is too short ({len(password)} characters; at least {MIN_PASSWORD_LENGTH})"
        )
    if password.lower() == name.lower():
        raise InvalidInput("the password must not be the user name")
    return password


def _public(row: User) -> UserPublic:
    return UserPublic.model_validate(row, from_attributes=True)


def get_user_row(ctx: ServiceContext, name: str) -> User:
    row = ctx.session.exec(select(User).where(User.name == name)).first()
    if row is None:
        raise NotFound(f"user {name!r} does not exist")
    return row


def create_user(
    ctx: ServiceContext, *, name: str, password: str, role: str = Role.VIEWER.value
) -> UserPublic:
    name = v.name(name, "user name")
    check_password_policy(password, name)
    return _create(ctx, name, password, role)


def _create(ctx: ServiceContext, name: str, password: str, role: str) -> UserPublic:
    role = role.strip().lower()
    if role not in Role.values():
        raise InvalidInput(f"unknown role {role!r}; use one of {', '.join(Role.values())}")
    taken = ctx.session.exec(select(User.name).where(v.same_name(User.name, name))).first()
    if taken:
        raise AlreadyExists(f"user {taken!r} already exists")
    row = User(name=name, password_hash=hash_password(password), role=role)
    ctx.session.add(row)
    ctx.record("user", name, f"user {name} created ({role})")
    ctx.commit()
    return _public(row)


def set_password(
    ctx: ServiceContext,
    *,
    name: str,
    password: str,
    by: str | None = None,
    current_password: str | None = None,
    address: str | None = None,
) -> UserPublic:
    """Set user ``name``'s password. ``by`` is the user asking (API, console):
    a user changing their own password must give the current one (an API
    token or a console session alone is not enough); only an admin changes
    another user's, without it. ``by=None`` is the local CLI and ``qrm init``,
    which act on the database itself."""
    row = get_user_row(ctx, name)
    if by is not None:
        if by == row.name:
            if not current_password:
                raise Forbidden(
                    "changing your own password needs your current password "
                    "(current_password; qrm user passwd --current-password)"
                )
        else:
            asking = ctx.session.exec(select(User.role).where(User.name == by)).first()
            if asking != Role.ADMIN.value:
                raise Forbidden("only an admin may change another user's password")
    check_password_policy(password, row.name)
    if by == row.name:
        try:
            authenticate(ctx, row.name, current_password or "", address=address, via="password change")
        except AuthError:
            raise Forbidden("the current password is wrong; the password was not changed") from None
        row = get_user_row(ctx, name)
    row.password_hash = hash_password(password)
    ctx.session.add(row)
    if row.id is not None:  # whoever had the old password is logged out of the console
        from qrm_core.services.sessions import end_user_sessions

        end_user_sessions(ctx, row.id)
    ctx.record("user", name, f"password of user {name} changed")
    ctx.commit()
    return _public(row)


def list_users(ctx: ServiceContext) -> list[UserPublic]:
    return [_public(r) for r in ctx.session.exec(select(User).order_by(User.name))]


def remove_user(ctx: ServiceContext, name: str) -> UserPublic:
    row = get_user_row(ctx, name)
    if row.role == Role.ADMIN.value:
        admins = ctx.session.exec(select(User.id).where(User.role == Role.ADMIN.value)).all()
        if len(admins) <= 1:
            raise Conflict(f"user {name!r} is the last admin and cannot be removed")
    result = _public(row)
    ctx.session.delete(row)
    ctx.record("user", name, f"user {name} removed")
    ctx.commit()
    return result


_dummy_hash: str | None = None


def _unknown_user_check(password: str) -> None:
    """The cost of a password check, for a user name that does not exist: a
    wrong name must take as long to refuse as a wrong password, or the
    answer's time tells which user names exist."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = hash_password(secrets.token_urlsafe(16))
    verify_password(_dummy_hash, password)


def authenticate(
    ctx: ServiceContext,
    name: str,
    password: str,
    *,
    address: str | None = None,
    via: str = "password",
    verify: Callable[[User, str], bool] | None = None,
) -> UserPublic:
    """Check a user's password: refused (TooManyAttempts) while the user name
    or the address is throttled, AuthError when wrong; a failure is counted
    and audited with the user name and the address, never the password
    (:mod:`qrm_core.services.logins`). ``verify`` replaces the argon2 check
    (the API's cache of recent successful checks)."""
    user_counted = logins.check(ctx, name, address)
    row = ctx.session.exec(select(User).where(User.name == name)).first() if len(name) <= 255 else None
    if row is None:
        _unknown_user_check(password)
        ok = False
    elif verify is not None:
        ok = verify(row, password)
    else:
        ok = verify_password(row.password_hash, password)
    if not ok or row is None:
        logins.failed(ctx, name, address, via)
        raise AuthError("wrong user name or password")
    user = _public(row)
    if user_counted:
        logins.succeeded(ctx, name)
    return user


def default_password_unchanged(ctx: ServiceContext) -> bool:
    """True while the default admin still has openQRM's default password."""
    row = ctx.session.exec(select(User).where(User.name == DEFAULT_ADMIN)).first()
    return row is not None and verify_password(row.password_hash, DEFAULT_PASSWORD)


def ensure_admin(ctx: ServiceContext, password: str | None) -> tuple[UserPublic, bool]:
    """Create the default admin ``qrm`` if missing (password ``qrm`` unless given);
    with an explicit password, set it. Returns (user, created)."""
    row = ctx.session.exec(select(User).where(User.name == DEFAULT_ADMIN)).first()
    if row is None:
        if password is None:  # openQRM's default login, for a first look on this machine
            return _create(ctx, DEFAULT_ADMIN, DEFAULT_PASSWORD, Role.ADMIN.value), True
        return create_user(ctx, name=DEFAULT_ADMIN, password=password, role=Role.ADMIN.value), True
    if password is not None:
        return set_password(ctx, name=DEFAULT_ADMIN, password=password), False
    return _public(row), False
