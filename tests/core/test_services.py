"""Domain rules of the services layer, on SQLite, PostgreSQL and MariaDB."""

from pathlib import Path

import pytest
from sqlmodel import select

from qrm_core.errors import (
    AlreadyExists,
    Conflict,
    DriverNotFound,
    IllegalTransition,
    InUse,
    InvalidInput,
    NotFound,
)
from qrm_core.models import Event, Resource
from qrm_core.services import boot_images, events, resources, storage, users
from qrm_core.services import virtual_environments as ves


def _count_events(ctx) -> int:
    return len(ctx.session.exec(select(Event)).all())


def _setup(ctx, tmp_path: Path):
    storage.add_storage(ctx, name="st1", type="fake", address="10.0.11.35", comment="QRMSRC")
    storage.add_filesystem_image(ctx, name="web-root", storage="st1", location="/exports/web")
    kernel = tmp_path / "vmlinuz"
    initrd = tmp_path / "initrd"
    kernel.write_bytes(b"kernel" * 100)
    initrd.write_bytes(b"initrd" * 100)
    boot_images.add_boot_image(
        ctx, name="default", kernel_version="6.1.0-28-amd64", kernel=kernel, initrd=initrd
    )


def test_storage_add_is_case_insensitive_and_recorded(qrm_ctx) -> None:
    result = storage.add_storage(qrm_ctx, name="NFS", type="FAKE", address="10.0.11.35", comment="QRMSRC")
    assert (result.name, result.type, result.address, result.comment) == (
        "NFS",
        "fake",
        "10.0.11.35",
        "QRMSRC",
    )
    last = events.list_events(qrm_ctx, limit=1)[0]
    assert last.actor == "tester" and last.object_type == "storage" and last.object_name == "NFS"


def test_bad_storage_input_changes_nothing(qrm_ctx) -> None:
    storage.add_storage(qrm_ctx, name="st1", type="fake", address="10.0.0.1")
    before = _count_events(qrm_ctx)
    with pytest.raises(DriverNotFound, match="installed: fake"):
        storage.add_storage(qrm_ctx, name="st2", type="nosuch", address="10.0.0.1")
    with pytest.raises(InvalidInput):
        storage.add_storage(qrm_ctx, name="st2", type="fake", address="10.0.0.300")
    with pytest.raises(AlreadyExists):
        storage.add_storage(qrm_ctx, name="st1", type="fake", address="10.0.0.2")
    with pytest.raises(InvalidInput):
        storage.add_storage(qrm_ctx, name="bad name", type="fake", address="10.0.0.2")
    with pytest.raises(InvalidInput):
        storage.add_storage(qrm_ctx, name="st3", type="fake", address="10.0.0.2", comment="x\ny")
    assert [s.name for s in storage.list_storage(qrm_ctx)] == ["st1"]
    assert _count_events(qrm_ctx) == before


def test_in_use_objects_cannot_be_removed(qrm_ctx, tmp_path: Path) -> None:
    _setup(qrm_ctx, tmp_path)
    ves.create_ve(qrm_ctx, name="web", boot_image="default", fs_image="web-root")
    with pytest.raises(InUse, match="web-root"):
        storage.remove_storage(qrm_ctx, "st1")
    with pytest.raises(InUse, match=r"virtual environment.*web"):
        storage.remove_filesystem_image(qrm_ctx, "web-root")
    with pytest.raises(InUse, match="web"):
        boot_images.remove_boot_image(qrm_ctx, "default")
    ves.remove_ve(qrm_ctx, "web")
    storage.remove_filesystem_image(qrm_ctx, "web-root")
    storage.remove_storage(qrm_ctx, "st1")
    boot_images.remove_boot_image(qrm_ctx, "default")


def test_filesystem_image_rules(qrm_ctx, tmp_path: Path) -> None:
    _setup(qrm_ctx, tmp_path)
    with pytest.raises(AlreadyExists, match="already filesystem image 'web-root'"):
        storage.add_filesystem_image(qrm_ctx, name="other", storage="st1", location="/exports/web")
    with pytest.raises(NotFound):
        storage.add_filesystem_image(qrm_ctx, name="x", storage="nosuch", location="/x")
    with pytest.raises(InvalidInput):
        storage.add_filesystem_image(qrm_ctx, name="x", storage="st1", location="relative/path")
    with pytest.raises(InvalidInput):
        storage.add_filesystem_image(qrm_ctx, name="x", storage="st1")
    created = storage.add_filesystem_image(qrm_ctx, name="blank", storage="st1", size_mb=512)
    assert (created.origin, created.size_mb, created.location) == ("empty", 512, "/volumes/blank")
    driver = qrm_ctx.plugins.storage_driver("fake")
    target = storage.target(storage.get_storage_row(qrm_ctx, "st1"))
    assert [v.location for v in driver.list_volumes(target)] == ["/volumes/blank"]
    storage.remove_filesystem_image(qrm_ctx, "blank", purge=True)
    assert driver.list_volumes(target) == []


def test_boot_images_store_files_and_keep_one_default(qrm_ctx, tmp_path: Path) -> None:
    _setup(qrm_ctx, tmp_path)
    first = boot_images.show_boot_image(qrm_ctx, "default")
    assert first.is_default
    assert Path(first.kernel_path).read_bytes() == b"kernel" * 100
    assert first.kernel_sha256 and len(first.kernel_sha256) == 64
    second = boot_images.add_boot_image(qrm_ctx, name="new", kernel_version="6.1", make_default=True)
    assert second.is_default
    assert not boot_images.show_boot_image(qrm_ctx, "default").is_default
    boot_images.set_default_boot_image(qrm_ctx, "default")
    assert [b.name for b in boot_images.list_boot_images(qrm_ctx) if b.is_default] == ["default"]
    with pytest.raises(InvalidInput):
        boot_images.add_boot_image(
            qrm_ctx, name="x", kernel_version="6.1", kernel=tmp_path / "missing", initrd=tmp_path / "initrd"
        )
    with pytest.raises(InvalidInput, match="both"):
        boot_images.add_boot_image(qrm_ctx, name="x", kernel_version="6.1", kernel=tmp_path / "vmlinuz")
    path = Path(first.kernel_path)
    boot_images.remove_boot_image(qrm_ctx, "default")
    assert not path.exists()


def test_ve_definitions(qrm_ctx, tmp_path: Path) -> None:
    _setup(qrm_ctx, tmp_path)
    shared = ves.create_ve(
        qrm_ctx, name="pool", boot_image="default", fs_image="web-root", deployment="shared", failover=True
    )
    assert (shared.pool_size, shared.state, shared.desired_state, shared.failover) == (
        2,
        "stopped",
        "stopped",
        True,
    )
    part = ves.create_ve(
        qrm_ctx,
        name="vm",
        boot_image="default",
        fs_image="web-root",
        deployment="partitioned",
        hypervisor="FAKE",
        memory_mb=512,
    )
    assert (part.req_hypervisor, part.req_kind, part.req_cpus, part.req_memory_mb) == (
        "fake",
        "virtual",
        1,
        512,
    )
    with pytest.raises(InvalidInput, match="--hypervisor"):
        ves.create_ve(qrm_ctx, name="x", boot_image="default", fs_image="web-root", deployment="partitioned")
    with pytest.raises(InvalidInput, match="shared"):
        ves.create_ve(qrm_ctx, name="x", boot_image="default", fs_image="web-root", pool_size=3)
    with pytest.raises(InvalidInput, match="deployment"):
        ves.create_ve(qrm_ctx, name="x", boot_image="default", fs_image="web-root", deployment="cloud")
    with pytest.raises(DriverNotFound, match="hypervisor 'xen'"):
        ves.create_ve(qrm_ctx, name="x", boot_image="default", fs_image="web-root", hypervisor="xen")
    with pytest.raises(NotFound, match="boot image"):
        ves.create_ve(qrm_ctx, name="x", boot_image="nosuch", fs_image="web-root")
    with pytest.raises(InvalidInput):
        ves.create_ve(qrm_ctx, name="x", boot_image="default", fs_image="web-root", kernel_args="a;reboot")
    with pytest.raises(AlreadyExists):
        ves.create_ve(qrm_ctx, name="pool", boot_image="default", fs_image="web-root")
    assert [v.name for v in ves.list_ves(qrm_ctx)] == ["pool", "vm"]


def test_resources_and_state_machine(qrm_ctx, tmp_path: Path) -> None:
    _setup(qrm_ctx, tmp_path)
    host = resources.add_resource(
        qrm_ctx, mac="52-54-00-00-00-01", ip="10.0.0.10", hostname="node1", cpus=4, memory_mb=4096
    )
    assert host.mac == "52:54:00:00:00:01" and host.state == "new"
    vm = resources.add_resource(
        qrm_ctx, mac="52:54:00:00:00:02", kind="virtual", host="node1", hypervisor="fake"
    )
    assert vm.host == "node1"
    with pytest.raises(AlreadyExists):
        resources.add_resource(qrm_ctx, mac="52:54:00:00:00:01")
    with pytest.raises(InvalidInput):
        resources.add_resource(qrm_ctx, mac="52:54:00:00:00:03", host="node1")
    assert resources.show_resource(qrm_ctx, "52:54:00:00:00:01").id == host.id
    assert resources.show_resource(qrm_ctx, str(host.id)).hostname == "node1"
    assert resources.show_resource(qrm_ctx, "node1").id == host.id
    with pytest.raises(InUse, match="hosts virtual resource"):
        resources.remove_resource(qrm_ctx, "node1")

    row = resources.find_resource_row(qrm_ctx, "node1")
    with pytest.raises(IllegalTransition):
        resources.transition(qrm_ctx, row, "active")
    resources.transition(qrm_ctx, row, "idle", "registered")
    qrm_ctx.commit()
    assert resources.list_resources(qrm_ctx, state="idle").total == 1
    page = resources.list_resources(qrm_ctx, offset=1, limit=1)
    assert page.total == 2 and [r.mac for r in page.items] == ["52:54:00:00:00:02"]
    with pytest.raises(InvalidInput):
        resources.list_resources(qrm_ctx, state="sleeping")

    web = ves.create_ve(qrm_ctx, name="web", boot_image="default", fs_image="web-root")
    row.ve_id = web.id
    resources.transition(qrm_ctx, row, "assigned")
    qrm_ctx.commit()
    with pytest.raises(InUse, match="serves virtual environment web"):
        resources.remove_resource(qrm_ctx, "node1")
    with pytest.raises(InUse):
        ves.remove_ve(qrm_ctx, "web")
    assert ves.show_ve(qrm_ctx, "web").resources == ["node1"]


def test_every_transition_is_declared() -> None:
    from qrm_core.models import ResourceState

    assert set(resources.TRANSITIONS) == set(ResourceState)
    for target_states in resources.TRANSITIONS.values():
        assert target_states <= set(ResourceState)
    # Heartbeats stopping can put any state into error, except off and error itself.
    for state in ResourceState:
        if state not in (ResourceState.ERROR, ResourceState.OFF):
            assert resources.can_transition(state, "error")


def test_users_and_passwords(qrm_ctx) -> None:
    admin, created = users.ensure_admin(qrm_ctx, None)
    assert created and admin.role == "admin"
    assert users.default_password_unchanged(qrm_ctx)
    users.ensure_admin(qrm_ctx, "s3cret-admin")
    assert not users.default_password_unchanged(qrm_ctx)
    assert users.authenticate(qrm_ctx, "qrm", "s3cret-admin").name == "qrm"
    from qrm_core.errors import AuthError

    with pytest.raises(AuthError):
        users.authenticate(qrm_ctx, "qrm", "qrm")
    stored = qrm_ctx.session.exec(select(users.User)).first()
    assert stored.password_hash.startswith("$argon2")
    with pytest.raises(Conflict, match="last admin"):
        users.remove_user(qrm_ctx, "qrm")
    with pytest.raises(InvalidInput, match="role"):
        users.create_user(qrm_ctx, name="op", password="op-password-1", role="root")


def test_events_after_id_and_limit(qrm_ctx) -> None:
    for i in range(5):
        storage.add_storage(qrm_ctx, name=f"s{i}", type="fake", address=f"10.0.0.{i + 1}")
    newest = events.list_events(qrm_ctx, limit=2)
    assert [e.object_name for e in newest] == ["s3", "s4"]
    after = events.list_events(qrm_ctx, after_id=newest[0].id)
    assert [e.object_name for e in after] == ["s4"]
    with pytest.raises(InvalidInput):
        events.list_events(qrm_ctx, limit=0)


def test_no_resource_row_is_left_half_written(qrm_ctx) -> None:
    with pytest.raises(NotFound):
        resources.add_resource(qrm_ctx, mac="52:54:00:00:00:09", kind="virtual", host="nosuch")
    assert qrm_ctx.session.exec(select(Resource)).all() == []
