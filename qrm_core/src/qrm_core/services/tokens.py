"""API tokens: bearer secrets that stand for a user in the REST API.

A token belongs to one user and acts with that user's role. Its secret is
shown once, when it is created; only a SHA-256 hash of it is stored (the
secret is 32 random bytes, so a slow hash would buy nothing and cost every
request). Names are unique per user, so people can tell their tokens apart;
tokens are addressed by id.

Who may do what: users manage their own tokens; an admin manages everyone's.
The services get this as ``admin``: the API passes whether the caller is an
admin, and the local command line passes ``True``, since whoever holds the
database is trusted there as for ``qrm user`` (``ctx.actor`` still names who
acted in the audit log).
"""

from __future__ import annotations

import hashlib
import secrets

from sqlmodel import col, select

from qrm_core.errors import AlreadyExists, AuthError, Forbidden, NotFound
from qrm_core.models import MAX_ID, ApiToken, ApiTokenCreated, ApiTokenPublic, User, UserPublic, utcnow
from qrm_core.services import ServiceContext
from qrm_core.services import validation as v

PREFIX = "qrm_"


def hash_api_token(token: str) -> str:
    """What is stored of a token, and what a presented token is looked up by."""
    return hashlib.sha256(token.encode()).hexdigest()


def _public(row: ApiToken, owner: str) -> ApiTokenPublic:
    return ApiTokenPublic.model_validate(row, from_attributes=True, update={"user": owner})


def _owner(ctx: ServiceContext, user: str | None, *, admin: bool, lock: bool = False) -> User:
    """The user whose tokens are meant: ``user``, or the caller when None."""
    name = user if user is not None else ctx.actor
    if name != ctx.actor and not admin:
        raise Forbidden(f"only an admin may manage another user's API tokens; {ctx.actor} is not one")
    query = select(User).where(User.name == name)
    if lock:
        query = query.with_for_update()
    row = ctx.session.exec(query).first()
    if row is None:
        if user is None:
            raise NotFound(f"{ctx.actor!r} is not a qrm user; say whose API tokens are meant (--user)")
        raise NotFound(f"user {name!r} does not exist")
    return row


def create_token(
    ctx: ServiceContext, *, name: str, user: str | None = None, admin: bool = False
) -> ApiTokenCreated:
    """Create a token for ``user`` (default: the caller); the result carries the secret."""
    name = v.name(name, "token name")
    # The owner's row is locked, so two requests cannot both take one name
    # (on SQLite every writing transaction holds the database's write lock).
    owner = _owner(ctx, user, admin=admin, lock=True)
    assert owner.id is not None
    taken = ctx.session.exec(
        select(ApiToken.id).where(ApiToken.user_id == owner.id, v.same_name(ApiToken.name, name))
    ).first()
    if taken is not None:
        raise AlreadyExists(f"user {owner.name} already has an API token named {name!r} (id {taken})")
    secret = PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user_id=owner.id, name=name, token_hash=hash_api_token(secret))
    ctx.session.add(row)
    ctx.flush()
    ctx.record("user", owner.name, f"API token {name} (id {row.id}) created for {owner.name}")
    ctx.commit()
    return ApiTokenCreated.model_validate(
        row, from_attributes=True, update={"user": owner.name, "token": secret}
    )


def list_tokens(
    ctx: ServiceContext, *, user: str | None = None, all_users: bool = False, admin: bool = False
) -> list[ApiTokenPublic]:
    """The tokens of ``user`` (default: the caller), or of everyone (admins;
    with ``user`` too, that user's)."""
    query = select(ApiToken, User.name).join(User, col(User.id) == col(ApiToken.user_id))
    if all_users and not admin:
        raise Forbidden(f"only an admin may list every user's API tokens; {ctx.actor} is not one")
    if not all_users or user is not None:
        owner = _owner(ctx, user, admin=admin)
        query = query.where(ApiToken.user_id == owner.id)
    rows = ctx.session.exec(query.order_by(col(User.name), col(ApiToken.id))).all()
    return [_public(row, owner_name) for row, owner_name in rows]


def revoke_token(ctx: ServiceContext, token_id: int, *, admin: bool = False) -> ApiTokenPublic:
    """Delete a token: its owner or an admin may. It stops working at once."""
    found = None
    if 1 <= token_id <= MAX_ID:
        found = ctx.session.exec(
            select(ApiToken, User.name)
            .join(User, col(User.id) == col(ApiToken.user_id))
            .where(ApiToken.id == token_id)
        ).first()
    if found is None:
        raise NotFound(f"API token {token_id} does not exist")
    row, owner = found
    if owner != ctx.actor and not admin:
        raise Forbidden(
            f"API token {token_id} belongs to another user; only its owner or an admin may revoke it"
        )
    result = _public(row, owner)
    ctx.session.delete(row)
    ctx.record("user", owner, f"API token {row.name} (id {token_id}) of {owner} revoked")
    ctx.commit()
    return result


def authenticate(ctx: ServiceContext, token: str) -> UserPublic:
    """The user a presented token stands for; its use is recorded (``last_used``)."""
    row = ctx.session.exec(select(ApiToken).where(ApiToken.token_hash == hash_api_token(token))).first()
    owner = ctx.session.get(User, row.user_id) if row is not None else None
    if row is None or owner is None:
        raise AuthError("unknown or revoked API token")
    row.last_used = utcnow()
    ctx.session.add(row)
    ctx.commit()
    return UserPublic.model_validate(owner, from_attributes=True)
