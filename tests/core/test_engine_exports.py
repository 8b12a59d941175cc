"""A VE is running only when every member has its filesystem image exported;
until then it shows why, and the problem neither goes stale nor is cleared while
an export still fails."""

import pytest
from enginekit import Site
from sqlmodel import select

from qrm_core.models import Resource
from qrm_core.services import boot_images, service_context, storage
from qrm_core.services import virtual_environments as ves


@pytest.fixture
def site(qrm_ctx, qrm_settings, qrm_plugins):
    storage.add_storage(qrm_ctx, name="st", type="fake", address="10.0.0.2")
    storage.add_filesystem_image(qrm_ctx, name="root", storage="st", location="/exports/root")
    boot_images.add_boot_image(qrm_ctx, name="idle", kernel_version="6.1")
    return Site(qrm_settings, qrm_plugins)


def _ve(site, name):
    with service_context(site.settings, plugins=site.plugins) as ctx:
        return ves.show_ve(ctx, name)


def _exported_to(site, qrm_ctx) -> list[tuple[str, ...]]:
    fake = site.plugins.storage_driver("fake")
    target = storage.target(storage.get_storage_row(qrm_ctx, "st"))
    return [v.exported_to for v in fake.list_volumes(target)]


def _give_ip(site, node, ip: str) -> None:
    """The machine's address becomes known (as its next registration would report it)."""
    node.ip = ip
    with service_context(site.settings, plugins=site.plugins) as ctx:
        row = ctx.session.exec(select(Resource).where(Resource.mac == node.mac)).one()
        row.ip = ip
        ctx.session.add(row)
        ctx.commit()


def test_a_member_without_export_keeps_the_ve_from_running(site, qrm_ctx) -> None:
    node = site.add_node("52:54:00:00:01:01", ip="")
    ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="root")
    ves.start_ve(qrm_ctx, "web")
    site.settle(5)
    web = _ve(site, "web")
    assert web.resources == [node.mac] and node.mode == "ve"  # the machine itself runs the VE's OS
    assert web.state == "starting", web
    assert web.problem.startswith("cannot export the filesystem image to ") and "no IP address" in web.problem
    # The placement step of the next passes does not wipe the export's problem.
    site.settle(3)
    assert _ve(site, "web").problem == web.problem

    _give_ip(site, node, "198.18.1.1")
    site.settle(3)
    web = _ve(site, "web")
    assert web.state == "running" and web.problem == ""
    assert _exported_to(site, qrm_ctx) == [("198.18.1.1",)]


def test_one_export_that_succeeds_does_not_clear_another_that_fails(site, qrm_ctx) -> None:
    good = site.add_node("52:54:00:00:01:02")
    bad = site.add_node("52:54:00:00:01:03", ip="")
    ves.create_ve(qrm_ctx, name="farm", boot_image="idle", fs_image="root", deployment="shared", pool_size=2)
    ves.start_ve(qrm_ctx, "farm")
    site.settle(6)
    farm = _ve(site, "farm")
    assert sorted(farm.resources) == sorted([good.mac, bad.mac])
    assert farm.state == "starting"
    assert bad.mac in farm.problem and "no IP address" in farm.problem
    assert _exported_to(site, qrm_ctx) == [(good.ip,)]


def test_stopping_leaves_no_stale_export_problem(site, qrm_ctx) -> None:
    site.add_node("52:54:00:00:01:04", ip="")
    ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="root")
    ves.start_ve(qrm_ctx, "web")
    site.settle(4)
    assert _ve(site, "web").problem.startswith("cannot export")
    ves.stop_ve(qrm_ctx, "web")
    # While the machine takes its time to reboot, the stopping VE is exported to no more.
    for _ in range(3):
        site.clock.advance(1)
        site.reconciler.tick()
    assert _ve(site, "web").state == "stopping" and _ve(site, "web").problem == ""
    site.settle(6)
    web = _ve(site, "web")
    assert web.state == "stopped" and web.resources == [] and web.problem == ""
    site.settle(3)
    assert _ve(site, "web").problem == ""
