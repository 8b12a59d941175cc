"""Users of the console: argon2 password hashes and roles."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlmodel import select

from qrm_core.errors import AlreadyExists, AuthError, InvalidInput, NotFound
from qrm_core.models import Role, User, UserPublic
from qrm_core.services import ServiceContext
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


def _check_password(password: str) -> str:
    if not password:
        raise InvalidInput("the password must not be empty")
    if len(password) > 1024:
        raise InvalidInput("the password is too long (at most 1024 characters)")
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
    _check_password(password)
    role = role.strip().lower()
    if role not in Role.values():
        raise InvalidInput(f"unknown role {role!r}; use one of {', '.join(Role.values())}")
    if ctx.session.exec(select(User.id).where(User.name == name)).first():
        raise AlreadyExists(f"user {name!r} already exists")
    row = User(name=name, password_hash=hash_password(password), role=role)
    ctx.session.add(row)
    ctx.record("user", name, f"user {name} created ({role})")
    ctx.commit()
    return _public(row)


def set_password(ctx: ServiceContext, *, name: str, password: str) -> UserPublic:
    _check_password(password)
    row = get_user_row(ctx, name)
    row.password_hash = hash_password(password)
    ctx.session.add(row)
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
            raise InvalidInput(f"user {name!r} is the last admin and cannot be removed")
    result = _public(row)
    ctx.session.delete(row)
    ctx.record("user", name, f"user {name} removed")
    ctx.commit()
    return result


def authenticate(ctx: ServiceContext, name: str, password: str) -> UserPublic:
    row = ctx.session.exec(select(User).where(User.name == name)).first()
    if row is None or not verify_password(row.password_hash, password):
        raise AuthError("wrong user name or password")
    return _public(row)


def default_password_unchanged(ctx: ServiceContext) -> bool:
    """True while the default admin still has openQRM's default password."""
    row = ctx.session.exec(select(User).where(User.name == DEFAULT_ADMIN)).first()
    return row is not None and verify_password(row.password_hash, DEFAULT_PASSWORD)


def ensure_admin(ctx: ServiceContext, password: str | None) -> tuple[UserPublic, bool]:
    """Create the default admin ``qrm`` if missing (password ``qrm`` unless given);
    with an explicit password, set it. Returns (user, created)."""
    row = ctx.session.exec(select(User).where(User.name == DEFAULT_ADMIN)).first()
    if row is None:
        user = create_user(
            ctx, name=DEFAULT_ADMIN, password=password or DEFAULT_PASSWORD, role=Role.ADMIN.value
        )
        return user, True
    if password is not None:
        return set_password(ctx, name=DEFAULT_ADMIN, password=password), False
    return _public(row), False
