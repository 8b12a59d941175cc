"""Password logins: throttled per user name and per client address, failures audited.

Every password login (the API's HTTP basic authentication, which the remote
CLI sends with each request, and the web console's login form) goes through
:func:`qrm_core.services.users.authenticate`, which calls this module:

* :func:`check` before the password is looked at: a user name with
  ``login_user_failures`` failed logins, or an address with
  ``login_address_failures``, within ``login_window`` seconds of the first
  of them, is refused with :class:`~qrm_core.errors.TooManyAttempts` (HTTP
  429 with ``Retry-After``) until that window ends, the right password
  included, so that guessing stops paying off. The address limit is higher:
  many people may share one address (NAT), while one user name is one
  account. A login with the right password ends the user name's count;
  an address's count only runs out with its window (else an attacker with
  an account could clear his address between guesses).
* :func:`failed` after a wrong password or an unknown user: both counts go
  up and an audit event says who (the user name given) and from where
  (the client address), never the password.

The counts live in the database (table ``login_failure``), so several
``qrm server`` processes on one PostgreSQL or MariaDB throttle together:
an attacker gains nothing by spreading guesses over them. A count is
increased with one atomic UPDATE, so concurrent failures on different
servers are all counted. Keys are SHA-256 digests of the lower-cased user
name or of the address, so no backend's collation can merge or split them.

API tokens and console session cookies are 32 random bytes and are not
throttled here: guessing one is hopeless.
"""

from __future__ import annotations

import hashlib
import math
from datetime import datetime, timedelta

import sqlalchemy as sa

from qrm_core.errors import Conflict, TooManyAttempts
from qrm_core.models import EventLevel, LoginFailure, utcnow
from qrm_core.services import ServiceContext

_TABLE = LoginFailure.__table__  # type: ignore[attr-defined]
# Built once (every password login runs it): a Core statement, no ORM objects.
_FAILURES = sa.select(_TABLE.c.key, _TABLE.c.failures, _TABLE.c.first_at).where(
    _TABLE.c.key.in_(sa.bindparam("keys", expanding=True))
)


def _key(kind: str, value: str) -> str:
    return f"{kind}:{hashlib.sha256(value.lower().encode('utf-8', 'replace')).hexdigest()}"


def shown(name: str) -> str:
    """A user name as typed, safe for one line of the audit log."""
    return repr(name[:64])


def _limits(ctx: ServiceContext, name: str, address: str | None) -> dict[str, tuple[str, int]]:
    keys = {_key("user", name): (f"user {shown(name)}", ctx.settings.login_user_failures)}
    if address:
        keys[_key("address", address)] = (f"address {address}", ctx.settings.login_address_failures)
    return keys


def check(ctx: ServiceContext, name: str, address: str | None) -> bool:
    """Refuse (TooManyAttempts) while the user name or the address has used up
    its failed logins. Returns whether the user name has failures counted
    (a successful login then calls :func:`succeeded`)."""
    keys = _limits(ctx, name, address)
    now = utcnow()
    window = timedelta(seconds=ctx.settings.login_window)
    rows = ctx.session.connection().execute(_FAILURES, {"keys": list(keys)}).all()
    blocked: list[tuple[float, str]] = []
    user_counted = False
    for key, failures, first_at in rows:
        what, limit = keys[key]
        ends = first_at + window
        if ends <= now:
            continue
        if key.startswith("user:"):
            user_counted = True
        if failures >= limit:
            blocked.append(((ends - now).total_seconds(), what))
    if blocked:
        wait, what = max(blocked)
        seconds = max(1, math.ceil(wait))
        raise TooManyAttempts(
            f"too many failed logins for {what}; try again in {seconds} s",
            retry_after=seconds,
        )
    return user_counted


def _bump(conn: sa.Connection, key: str, now: datetime, window: timedelta) -> None:
    increased = conn.execute(
        sa.update(_TABLE)
        .where(_TABLE.c.key == key, _TABLE.c.first_at > now - window)
        .values(failures=_TABLE.c.failures + 1)
    )
    if increased.rowcount:
        return
    conn.execute(sa.delete(_TABLE).where(_TABLE.c.key == key))  # a window that has ended
    conn.execute(sa.insert(_TABLE).values(key=key, failures=1, first_at=now))


def failed(ctx: ServiceContext, name: str, address: str | None, via: str) -> None:
    """Count a failed login of ``name`` from ``address`` and audit it."""
    ctx.rollback()
    keys = _limits(ctx, name, address)
    window = timedelta(seconds=ctx.settings.login_window)
    where = f" from {address}" if address else ""
    for attempt in range(3):
        now = utcnow()
        conn = ctx.session.connection()
        # Rows whose window ended long ago go (the table holds only recent failures).
        conn.execute(sa.delete(_TABLE).where(_TABLE.c.first_at < now - 2 * window))
        for key in keys:
            _bump(conn, key, now, window)
        ctx.record(
            "user",
            shown(name)[1:-1],
            f"{via} login of {shown(name)} failed{where}",
            level=EventLevel.WARNING,
            actor="anonymous",
        )
        try:
            ctx.commit()
            return
        except Conflict:
            # Another server inserted the same key at the same moment: count again.
            if attempt == 2:
                raise


def succeeded(ctx: ServiceContext, name: str) -> None:
    """A login with the right password: the user name's failures are forgotten."""
    ctx.session.connection().execute(sa.delete(_TABLE).where(_TABLE.c.key == _key("user", name)))
    ctx.commit()
