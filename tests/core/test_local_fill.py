"""Auto images filled from the booting machine's local disk (``--fill-from local-disk``):
exactly one machine is placed to fill it (every other VE on the image, and the rest of the
pool, waits), its boot says so, its heartbeats' progress shows on the image and the VEs,
done makes the image ready and the machine goes on into its VE, a failure leaves the image
in ``error`` with the reason and the machine released; on SQLite, PostgreSQL and MariaDB.
The agent's side is tested in tests/core/bootimage/test_agent_script.py and, for real, in
tests/integration/test_netroots_e2e.py."""

from __future__ import annotations

from typing import Any

import pytest
from enginekit import Clock, Node, Site
from sqlmodel import select

from qrm_core.errors import InvalidInput, QrmError
from qrm_core.models import Event, FilesystemImage, Resource
from qrm_core.services import agent, boot, boot_images, images, local_fill, service_context
from qrm_core.services import storage as storage_service
from qrm_core.services import virtual_environments as ves


def ctx_for(settings: Any, plugins: Any) -> Any:
    return service_context(settings, actor="tester", plugins=plugins)


class DiskNode(Node):
    """A machine whose agent does what a ``qrm.fill=`` boot asks: reports ``filling`` with
    the progress it is given (``fill``: bytes, total, result), then boots on into its VE."""

    cmdline: str = ""
    fill: tuple[int, int, str | None] | None = None
    reason: str | None = None

    def boot(self, settings: Any, plugins: Any, clock: Clock) -> None:
        with service_context(settings, actor="agent", plugins=plugins) as ctx:
            self.cmdline = boot.boot_config(ctx, self.mac).cmdline
        super().boot(settings, plugins, clock)

    @property
    def filling(self) -> bool:
        return "qrm.fill=" in self.cmdline

    def beat(self, settings: Any, plugins: Any, clock: Clock) -> str:
        if not (self.filling and self.token is not None and self.alive):
            return super().beat(settings, plugins, clock)
        done, total, result = self.fill or (0, 0, None)
        with service_context(settings, actor="agent", plugins=plugins) as ctx:
            answer = agent.heartbeat(
                ctx,
                resource_id=self.resource_id,
                token=self.token,
                state="failed" if result == "failed" else "filling",
                boot_generation=self.generation,
                reason=self.reason,
                fill_bytes=done,
                fill_total=total,
                fill_device="/dev/vdb1",
                fill_result=result,  # type: ignore[arg-type]
                now=clock(),
            )
        if result == "done":
            self.cmdline = ""  # unmounted, then the VE's own root and switch_root: "active" from now on
        if answer.command == "reboot":
            self.boot(settings, plugins, clock)
        return answer.command


@pytest.fixture
def site(qrm_settings: Any, qrm_plugins: Any) -> Site:
    with ctx_for(qrm_settings, qrm_plugins) as ctx:
        storage_service.add_storage(ctx, name="st", type="fake", address="10.0.11.35")
        boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1")
    return Site(qrm_settings, qrm_plugins)


def add_nodes(site: Site, count: int) -> list[DiskNode]:
    nodes = []
    for i in range(count):
        node = DiskNode(mac=f"52:54:00:00:01:{i:02x}")
        site.nodes[node.mac] = node
        node.boot(site.settings, site.plugins, site.clock)
        nodes.append(node)
    return nodes


def placed(site: Site) -> dict[str, str | None]:
    with ctx_for(site.settings, site.plugins) as ctx:
        return {
            mac: ve
            for mac, ve in ctx.session.exec(
                select(Resource.mac, Resource.ve_id).where(Resource.ve_id.is_not(None))  # type: ignore[union-attr]
            ).all()
        }


def image_row(site: Site, name: str = "root") -> FilesystemImage:
    with ctx_for(site.settings, site.plugins) as ctx:
        row = ctx.session.exec(select(FilesystemImage).where(FilesystemImage.name == name)).one()
        ctx.session.expunge(row)
        return row


def messages(site: Site) -> list[str]:
    with ctx_for(site.settings, site.plugins) as ctx:
        return [e.message for e in ctx.session.exec(select(Event).order_by(Event.id)).all()]


def test_one_machine_fills_the_image_and_boots_on_into_its_ve(site: Site) -> None:
    nodes = add_nodes(site, 3)
    with ctx_for(site.settings, site.plugins) as ctx:
        added = storage_service.add_filesystem_image(
            ctx, name="root", storage="st", size_mb=512, fill_from="local-disk:/dev/vdb1"
        )
        assert (added.origin, added.state, added.source, added.progress) == (
            "auto",
            "creating",
            "local-disk /dev/vdb1",
            local_fill.WAITING_FOR_MACHINE,
        )
        # Two VEs on the image (shared pools), three machines: one is placed, to fill it.
        ves.create_ve(ctx, name="pool", boot_image="idle", fs_image="root", deployment="shared", pool_size=2)
        ves.create_ve(ctx, name="pool2", boot_image="idle", fs_image="root", deployment="shared", pool_size=1)
        ves.start_ve(ctx, "pool")
        ves.start_ve(ctx, "pool2")
        # Not the engine's fill thread's job: the machine fills it.
        assert images.auto_images_wanted(ctx) == []
        assert images.fill_auto_image(ctx, "root") is False
    site.reconciler.tick()
    assert len(placed(site)) == 1
    (filler,) = [n for n in nodes if n.mac in placed(site)]
    site.step()  # it reboots into the VE's boot: told to fill first
    assert filler.filling and "qrm.fill=local-disk:/dev/vdb1 qrm.fill_mb=512" in filler.cmdline
    assert not any(n.filling for n in nodes if n is not filler)
    with ctx_for(site.settings, site.plugins) as ctx:
        said = ves.show_ve(ctx, "pool2").problem
    assert said == f"creating its filesystem image root: {local_fill.WAITING_FOR_MACHINE}", said

    filler.fill = (45_000_000, 100_000_000, None)
    site.settle(4)
    assert list(placed(site)) == [filler.mac]  # nobody else, however long it takes
    progress = image_row(site).progress
    assert progress.startswith("filling from the local disk /dev/vdb1 of ") and progress.endswith(
        ": 45% (45.0 of 100.0 MB)"
    ), progress
    with ctx_for(site.settings, site.plugins) as ctx:
        for name in ("pool", "pool2"):
            assert ves.show_ve(ctx, name).problem == f"creating its filesystem image root: {progress}"
        assert ctx.session.get(Resource, filler.resource_id).state == "booting"
    assert (
        sum("filling from the local disk /dev/vdb1" in m and m.endswith("started") for m in messages(site))
        == 1
    )

    filler.fill = (100_000_000, 100_000_000, "done")
    site.step()
    image = image_row(site)
    assert (image.state, image.progress, image.origin) == ("ready", "", "auto")
    assert image.source is not None and image.source.startswith("local-disk /dev/vdb1 of ")
    assert image.source_at is not None
    assert any(
        m.startswith("filesystem image root filled from the local disk /dev/vdb1 of ") for m in messages(site)
    )
    site.settle(10)
    with ctx_for(site.settings, site.plugins) as ctx:
        pool, pool2 = ves.show_ve(ctx, "pool"), ves.show_ve(ctx, "pool2")
    assert pool.state == "running" and filler.mac in pool.resources and len(pool.resources) == 2, pool
    assert pool2.state == "running" and len(pool2.resources) == 1, pool2
    assert not any(n.filling for n in nodes)


def test_a_failed_fill_leaves_the_image_in_error_and_releases_the_machine(site: Site) -> None:
    nodes = add_nodes(site, 2)
    with ctx_for(site.settings, site.plugins) as ctx:
        storage_service.add_filesystem_image(
            ctx, name="root", storage="st", size_mb=64, fill_from="local-disk"
        )
        ves.create_ve(ctx, name="web", boot_image="idle", fs_image="root")
        ves.start_ve(ctx, "web")
    site.reconciler.tick()
    site.step()
    (filler,) = [n for n in nodes if n.filling]
    assert "qrm.fill=local-disk qrm.fill_mb=64" in filler.cmdline
    reason = "cannot fill the image from the local disk (the volume is too small: /dev/vdb1 holds 80 MB)"
    filler.fill, filler.reason = (0, 80 << 20, "failed"), reason
    filler.beat(site.settings, site.plugins, site.clock)  # answered "reboot": back to the idle image
    assert not filler.filling and filler.mode == "idle"
    image = image_row(site)
    assert (image.state, image.progress) == ("error", f"filling failed: {reason}")
    with ctx_for(site.settings, site.plugins) as ctx:
        row = ctx.session.get(Resource, filler.resource_id)
        assert (row.state, row.ve_id) == ("idle", None)
    said = messages(site)
    assert any(m == f"filesystem image root: filling from the local disk of {filler.mac} failed: {reason}"
               or m.endswith(f"failed: {reason}") for m in said)  # fmt: skip
    assert any("released: could not fill filesystem image root from its local disk" in m for m in said)
    site.settle(4)
    assert placed(site) == {}  # no second try on a broken image
    with ctx_for(site.settings, site.plugins) as ctx:
        assert ves.show_ve(ctx, "web").problem.startswith(
            "its filesystem image root is not ready (error: filling failed: cannot fill"
        )


def test_a_stopped_ve_ends_the_filling(site: Site) -> None:
    nodes = add_nodes(site, 1)
    with ctx_for(site.settings, site.plugins) as ctx:
        storage_service.add_filesystem_image(
            ctx, name="root", storage="st", size_mb=64, fill_from="local-disk"
        )
        ves.create_ve(ctx, name="web", boot_image="idle", fs_image="root")
        ves.start_ve(ctx, "web")
    site.reconciler.tick()
    site.step()
    assert nodes[0].filling
    nodes[0].fill = (1, 10, None)
    site.step()
    with ctx_for(site.settings, site.plugins) as ctx:
        ves.stop_ve(ctx, "web")
    site.settle(4)
    assert not nodes[0].filling and placed(site) == {}
    assert image_row(site).state == "creating"  # still to be filled, by the next start


def test_heartbeats_about_filling_are_checked(site: Site) -> None:
    (node,) = add_nodes(site, 1)
    cases: list[dict[str, Any]] = [
        {"state": "active", "fill_result": "done"},
        {"state": "filling", "fill_result": "failed"},
        {"state": "idle", "fill_result": "failed"},
        {"state": "filling", "fill_result": "maybe"},
        {"state": "filling", "fill_bytes": -1},
        {"state": "busy"},
    ]
    for case in cases:
        with ctx_for(site.settings, site.plugins) as ctx, pytest.raises(InvalidInput) as info:
            agent.heartbeat(ctx, resource_id=node.resource_id, token=node.token, **case)
        assert "\n" not in str(info.value), case
    # A machine that fills nothing saying "filling" (or "done") changes nothing but its being seen.
    before = messages(site)
    with ctx_for(site.settings, site.plugins) as ctx:
        answer = agent.heartbeat(
            ctx, resource_id=node.resource_id, token=node.token, state="filling", fill_result="done"
        )
    assert answer.command == "reboot"  # it serves no VE: back to the idle image
    assert all("filled" not in m for m in messages(site)[len(before) :])


def test_bad_input_is_one_line_and_nothing_is_made(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    from qrm_core.drivers.fake import FakeStorage

    def state() -> tuple[Any, ...]:
        with ctx_for(site.settings, site.plugins) as ctx:
            names = ctx.session.exec(select(FilesystemImage.name)).all()
            count = len(ctx.session.exec(select(Event)).all())
        fake = site.settings.state_dir / "fake-storage" / "st.json"
        return tuple(sorted(names)), count, fake.read_text() if fake.exists() else ""

    before = state()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"fill_from": "local-disk:/dev/../x"}, "name the partition as local-disk:/dev/NAME"),
        ({"fill_from": "local-disk:/dev/./sda"}, "name the partition as local-disk:/dev/NAME"),
        ({"fill_from": "local-disk:/dev/"}, "name the partition as local-disk:/dev/NAME"),
        ({"fill_from": "local-disk:"}, "name the partition as local-disk:/dev/NAME"),
        ({"fill_from": "local-disk:/tmp/sda1"}, "name the partition as local-disk:/dev/NAME"),
        ({"fill_from": "local-disk:/dev/sda1;reboot"}, "name the partition as local-disk:/dev/NAME"),
        ({"fill_from": "local-disk:/dev/sd a"}, "name the partition as local-disk:/dev/NAME"),
        ({"fill_from": "local-disk:/dev/sda\n1"}, "name the partition as local-disk:/dev/NAME"),
        ({"fill_from": "local-disk", "sha256": "0" * 64}, "--sha256 is for archives, not a local disk"),
    ]
    for change, said in cases:
        options: dict[str, Any] = {"name": "auto", "storage": "st", "size_mb": 100}
        options.update(change)
        with ctx_for(site.settings, site.plugins) as ctx, pytest.raises(QrmError) as info:
            storage_service.add_filesystem_image(ctx, **options)
        assert said in str(info.value) and "\n" not in str(info.value), (change, str(info.value))
        assert state() == before, change
    # A storage type whose machines each get a copy of their own (a RAM root) cannot be filled so.
    monkeypatch.setattr(FakeStorage, "copies_per_machine", True)
    with ctx_for(site.settings, site.plugins) as ctx, pytest.raises(InvalidInput) as info:
        storage_service.add_filesystem_image(
            ctx, name="auto", storage="st", size_mb=100, fill_from="local-disk"
        )
    assert "gives each machine a copy of its own" in str(info.value) and "\n" not in str(info.value)
    assert state() == before
    monkeypatch.setattr(FakeStorage, "copies_per_machine", False)
    with ctx_for(site.settings, site.plugins) as ctx:
        made = storage_service.add_filesystem_image(
            ctx, name="auto", storage="st", size_mb=100, fill_from="local-disk:/dev/disk/by-label/root_1"
        )
    assert made.source == "local-disk /dev/disk/by-label/root_1"


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_the_command_and_the_api(qrm_server: Any, qrm_cli: Any) -> None:
    with ctx_for(qrm_server.settings, qrm_server.plugins) as ctx:
        storage_service.add_storage(ctx, name="st", type="fake", address="10.0.11.35")
    server = ["--server", qrm_server.url, "-u", "qrm", "-p", "qrm"]
    add = [*server, "filesystem-image", "add", "-s", "st", "--size", "100", "--auto"]
    done = qrm_cli(*add, "-n", "one", "--fill-from", "local-disk")
    assert done.exit_code == 0 and "filled from local-disk on the first start" in done.stdout, done.stderr
    bad = qrm_cli(*add, "-n", "two", "--fill-from", "local-disk:/dev/../x")
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.exit_code != 0 and len(lines) == 1 and "local-disk:/dev/NAME" in lines[0], bad.stderr
    with qrm_server.client() as api:
        made = api.post(
            "/api/v1/filesystem-images",
            json={"name": "three", "storage": "st", "size_mb": 10, "fill_from": "local-disk:/dev/vdb1"},
        )
        assert made.status_code == 201 and made.json()["source"] == "local-disk /dev/vdb1", made.text
        refused = api.post(
            "/api/v1/filesystem-images",
            json={"name": "four", "storage": "st", "size_mb": 10, "fill_from": "local-disk:/dev/a/../b"},
        )
        assert refused.status_code == 422 and "local-disk:/dev/NAME" in refused.text
        assert api.get("/api/v1/filesystem-images/four").status_code == 404
