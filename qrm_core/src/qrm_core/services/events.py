"""The audit log: reading events back."""

from __future__ import annotations

from sqlmodel import col, func, select

from qrm_core.errors import InvalidInput
from qrm_core.models import MAX_ID, Event, EventLevel, EventPublic
from qrm_core.services import ServiceContext


def list_events(
    ctx: ServiceContext,
    *,
    limit: int = 50,
    after_id: int | None = None,
    object_type: str | None = None,
    object_name: str | None = None,
    level: str | None = None,
) -> list[EventPublic]:
    """The newest ``limit`` events (oldest first), optionally only those after ``after_id``."""
    if limit < 1 or limit > 10000:
        raise InvalidInput("limit must be between 1 and 10000")
    if after_id is not None and not 0 <= after_id <= MAX_ID:
        raise InvalidInput("after_id is out of range")
    if level is not None and level not in EventLevel.values():
        raise InvalidInput(f"unknown level {level!r}; use one of {', '.join(EventLevel.values())}")
    query = select(Event)
    if after_id is not None:
        query = query.where(col(Event.id) > after_id)
    if object_type:
        query = query.where(Event.object_type == object_type)
    if object_name:
        query = query.where(Event.object_name == object_name)
    if level:
        query = query.where(Event.level == level)
    if after_id is not None:
        rows = list(ctx.session.exec(query.order_by(col(Event.id)).limit(limit)))
    else:
        rows = list(reversed(ctx.session.exec(query.order_by(col(Event.id).desc()).limit(limit)).all()))
    return [EventPublic.model_validate(r, from_attributes=True) for r in rows]


def newest_id(ctx: ServiceContext) -> int:
    """The id of the newest event (0 when there is none): where a follower starts."""
    return int(ctx.session.exec(select(func.max(Event.id))).one() or 0)
