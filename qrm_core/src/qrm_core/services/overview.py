"""What the console's dashboard shows: counts by state and the problems first.

One query per count, grouped in the database (no rows are loaded to count
them), so the dashboard costs the same with 10 or 10,000 resources.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlmodel import col, func, select

from qrm_core.models import (
    EventPublic,
    FilesystemImage,
    Resource,
    ResourceState,
    StorageServer,
    VEState,
    VirtualEnvironment,
)
from qrm_core.services import ServiceContext, events, public


@dataclass(frozen=True)
class Problem:
    """Something that needs a person: a VE that cannot be placed, a machine in error."""

    object_type: str  # "ve" or "resource"
    name: str
    message: str


@dataclass(frozen=True)
class StorageUse:
    name: str
    type: str
    address: str
    images: int
    in_use: int  # images used by a virtual environment


@dataclass
class Overview:
    resources_by_state: dict[str, int]
    ves_by_state: dict[str, int]
    resources_total: int
    ves_total: int
    storage: list[StorageUse]
    problems: list[Problem]
    recent_events: list[EventPublic] = field(default_factory=list)


#: Problems shown at most (the pages behind them list everything).
MAX_PROBLEMS = 20


def overview(ctx: ServiceContext, *, events_limit: int = 10) -> Overview:
    session = ctx.session
    by_state = dict(session.exec(select(Resource.state, func.count()).group_by(Resource.state)).all())
    ve_state = dict(
        session.exec(select(VirtualEnvironment.state, func.count()).group_by(VirtualEnvironment.state)).all()
    )
    resources_by_state = {s: int(by_state.get(s, 0)) for s in ResourceState.values()}
    ves_by_state = {s: int(ve_state.get(s, 0)) for s in VEState.values()}
    images = dict(
        session.exec(
            select(FilesystemImage.storage_id, func.count()).group_by(col(FilesystemImage.storage_id))
        ).all()
    )
    used = dict(
        session.exec(
            select(FilesystemImage.storage_id, func.count(func.distinct(FilesystemImage.id)))
            .join(VirtualEnvironment, col(VirtualEnvironment.fs_image_id) == col(FilesystemImage.id))
            .group_by(col(FilesystemImage.storage_id))
        ).all()
    )
    storage = [
        StorageUse(
            name=s.name,
            type=s.type,
            address=s.address,
            images=int(images.get(s.id or 0, 0)),
            in_use=int(used.get(s.id or 0, 0)),
        )
        for s in session.exec(select(StorageServer).order_by(StorageServer.name))
    ]
    problems: list[Problem] = []
    for name, state, problem in session.exec(
        select(VirtualEnvironment.name, VirtualEnvironment.state, VirtualEnvironment.problem)
        .where(VirtualEnvironment.problem != "")
        .order_by(VirtualEnvironment.name)
        .limit(MAX_PROBLEMS)
    ):
        problems.append(Problem("ve", name, f"{state}: {problem}"))
    for row in session.exec(
        select(Resource)
        .where(Resource.state == ResourceState.ERROR.value)
        .order_by(col(Resource.state_changed_at).desc())
        .limit(MAX_PROBLEMS)
    ):
        problems.append(
            Problem("resource", public.resource_label(row), f"in error since {row.state_changed_at:%H:%M:%S}")
        )
    recent = events.list_events(ctx, limit=events_limit)
    if session.in_transaction():
        session.commit()
    return Overview(
        resources_by_state=resources_by_state,
        ves_by_state=ves_by_state,
        resources_total=sum(resources_by_state.values()),
        ves_total=sum(ves_by_state.values()),
        storage=storage,
        problems=problems,
        recent_events=list(reversed(recent)),
    )
