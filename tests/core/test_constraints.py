"""The database itself refuses invalid states, whatever code writes to it."""

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from qrm_core import db
from qrm_core.models import (
    BootImage,
    FilesystemImage,
    Resource,
    StorageServer,
    VirtualEnvironment,
)


@pytest.fixture
def session(qrm_db_url: str):
    engine = db.create_db_engine(qrm_db_url)
    with Session(engine) as s:
        yield s
    engine.dispose()


def _base(session: Session) -> VirtualEnvironment:
    storage = StorageServer(name="s", type="fake", address="10.0.0.1")
    session.add(storage)
    session.flush()
    fs = FilesystemImage(name="f", storage_id=storage.id, location="/f")
    boot = BootImage(name="b", kernel_version="6.1")
    session.add_all([fs, boot])
    session.flush()
    ve = VirtualEnvironment(name="ve", boot_image_id=boot.id, fs_image_id=fs.id)
    session.add(ve)
    session.commit()
    return ve


def _refused(session: Session, *rows) -> None:
    with pytest.raises(IntegrityError):
        session.add_all(rows)
        session.commit()
    session.rollback()


def test_unique_mac_and_names(session: Session) -> None:
    _base(session)
    session.add(Resource(mac="52:54:00:00:00:01"))
    session.commit()
    _refused(session, Resource(mac="52:54:00:00:00:01"))
    _refused(session, StorageServer(name="s", type="fake", address="10.0.0.2"))
    _refused(session, BootImage(name="b", kernel_version="x"))


def test_one_default_boot_image(session: Session) -> None:
    session.add(BootImage(name="a", kernel_version="1", default_marker=1))
    session.commit()
    _refused(session, BootImage(name="c", kernel_version="1", default_marker=1))
    _refused(session, BootImage(name="d", kernel_version="1", default_marker=2))


def test_assigned_resource_needs_a_ve(session: Session) -> None:
    ve = _base(session)
    _refused(session, Resource(mac="52:54:00:00:00:02", state="active"))
    session.add(Resource(mac="52:54:00:00:00:02", state="active", ve_id=ve.id))
    session.commit()


def test_enums_and_ranges(session: Session) -> None:
    ve = _base(session)
    _refused(session, Resource(mac="52:54:00:00:00:03", state="dancing"))
    _refused(session, Resource(mac="52:54:00:00:00:04", kind="cloud"))
    _refused(session, Resource(mac="52:54:00:00:00:05", cpus=-1))
    _refused(
        session,
        VirtualEnvironment(
            name="p", boot_image_id=ve.boot_image_id, fs_image_id=ve.fs_image_id, deployment="partitioned"
        ),
    )
    _refused(
        session,
        VirtualEnvironment(
            name="q",
            boot_image_id=ve.boot_image_id,
            fs_image_id=ve.fs_image_id,
            deployment="single",
            pool_size=3,
        ),
    )


def test_physical_resource_has_no_host(session: Session) -> None:
    host = Resource(mac="52:54:00:00:00:10")
    session.add(host)
    session.commit()
    _refused(session, Resource(mac="52:54:00:00:00:11", kind="physical", host_id=host.id))
    session.add(Resource(mac="52:54:00:00:00:12", kind="virtual", host_id=host.id))
    session.commit()


def test_foreign_keys_restrict(session: Session) -> None:
    ve = _base(session)
    with pytest.raises(IntegrityError):
        session.execute(sa.delete(FilesystemImage).where(FilesystemImage.id == ve.fs_image_id))
        session.commit()
    session.rollback()
    _refused(session, Resource(mac="52:54:00:00:00:20", ve_id=999999, state="active"))
