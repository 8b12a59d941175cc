"""Site-wide settings kept in the database, shared by every qrm server of a site."""

from __future__ import annotations

import hmac
import secrets

from qrm_core.errors import Conflict
from qrm_core.models import SiteSetting, utcnow
from qrm_core.services import ServiceContext

ENROLLMENT_TOKEN = "enrollment_token"


def _get(ctx: ServiceContext, key: str) -> str | None:
    row = ctx.session.get(SiteSetting, key)
    return row.value if row is not None else None


def get_enrollment_token(ctx: ServiceContext) -> str:
    """The token a booting machine presents to register (``qrm.enroll=`` on its
    kernel command line). Created on first use; the same for every server of
    the site."""
    token = _get(ctx, ENROLLMENT_TOKEN)
    if token is not None:
        return token
    row = SiteSetting(key=ENROLLMENT_TOKEN, value=secrets.token_urlsafe(24))
    ctx.session.add(row)
    ctx.record("site", ENROLLMENT_TOKEN, "enrollment token created")
    try:
        ctx.commit()
    except Conflict:  # another server created it at the same moment
        ctx.rollback()
        token = _get(ctx, ENROLLMENT_TOKEN)
        if token is None:
            raise
        return token
    return row.value


def rotate_enrollment_token(ctx: ServiceContext) -> str:
    """Replace the enrollment token; machines booted before keep their resource tokens."""
    row = ctx.session.get(SiteSetting, ENROLLMENT_TOKEN)
    value = secrets.token_urlsafe(24)
    if row is None:
        row = SiteSetting(key=ENROLLMENT_TOKEN, value=value)
    else:
        row.value = value
        row.changed_at = utcnow()
    ctx.session.add(row)
    ctx.record("site", ENROLLMENT_TOKEN, "enrollment token rotated")
    ctx.commit()
    return value


def check_enrollment_token(ctx: ServiceContext, presented: str | None) -> bool:
    if not presented:
        return False
    return hmac.compare_digest(get_enrollment_token(ctx).encode(), presented.encode())
