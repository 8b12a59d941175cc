"""What a VE asks of monitoring plugins (``monitor`` checks, failover on monitoring),
the members' health in ``ve show``, and the service that takes a resource for
failed on a monitor's word."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from enginekit import Site
from sqlmodel import select

from qrm_core import hookimpl
from qrm_core.context import HealthCheck
from qrm_core.errors import Conflict, InvalidInput, NotFound
from qrm_core.models import Event
from qrm_core.services import boot_images, resources, service_context, storage
from qrm_core.services import validation as v
from qrm_core.services import virtual_environments as ves


def _events(ctx) -> int:
    return len(ctx.session.exec(select(Event)).all())


@pytest.fixture
def images(qrm_ctx):
    storage.add_storage(qrm_ctx, name="st", type="fake", address="10.0.0.2")
    storage.add_filesystem_image(qrm_ctx, name="root", storage="st", location="/exports/root")
    boot_images.add_boot_image(qrm_ctx, name="idle", kernel_version="6.1")


class Recorder:
    """A plugin that remembers VE updates and says something about every resource's health."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, list[str], list[str]]] = []

    @hookimpl
    def qrm_ve_updated(self, ve, changed, ctx) -> None:
        self.updates.append((ve.name, list(changed), list(ve.monitor)))

    @hookimpl
    def qrm_collect_health(self, resource, ctx) -> list[HealthCheck]:
        return [HealthCheck(source="recorder/ping", status="ok", message=f"{resource.ip} answers")]


@pytest.mark.parametrize(
    ("checks", "expected"),
    [
        (["http:80"], ["http:80"]),
        (["http:8080:/health", "tcp:5432", "http:8080:/health"], ["http:8080:/health", "tcp:5432"]),
        ([" ssh "], ["ssh"]),
        (None, []),
    ],
)
def test_monitor_checks_accepted(checks, expected) -> None:
    assert v.monitor_checks(checks) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "HTTP:80",
        "http:80;rm -rf /",
        "http:80!$USER1$",
        "http:80\n}\ndefine command {",
        "http:`id`",
        "http:a b",
        "http::80",
        "http:1:2:3:4:5",
        "9http",
        "",
        "x" * 40,
    ],
)
def test_monitor_checks_refused(bad) -> None:
    with pytest.raises(InvalidInput, match=r"monitor check|argument"):
        v.monitor_checks([bad])


def test_too_many_monitor_checks() -> None:
    with pytest.raises(InvalidInput, match="at most 16"):
        v.monitor_checks([f"tcp:{port}" for port in range(1, 18)])


def test_ve_monitor_settings_and_the_update_hook(qrm_ctx, qrm_plugins, images) -> None:
    recorder = Recorder()
    qrm_plugins.register(recorder, "recorder")
    web = ves.create_ve(
        qrm_ctx,
        name="web",
        boot_image="idle",
        fs_image="root",
        failover=True,
        monitor=["http:80"],
        monitor_failover=True,
    )
    assert (web.monitor, web.monitor_failover) == (["http:80"], True)
    assert ves.show_ve(qrm_ctx, "web").monitor == ["http:80"]
    before = _events(qrm_ctx)
    # Unchanged settings: no event, no hook.
    ves.set_ve(qrm_ctx, "web", monitor=["http:80"], monitor_failover=True)
    assert _events(qrm_ctx) == before and recorder.updates == []
    ves.set_ve(qrm_ctx, "web", monitor=["tcp:22", "http:80"])
    ves.set_ve(qrm_ctx, "web", monitor_failover=False)
    ves.set_ve(qrm_ctx, "web", monitor=[])
    assert recorder.updates == [
        ("web", ["monitor"], ["tcp:22", "http:80"]),
        ("web", ["monitor_failover"], ["tcp:22", "http:80"]),
        ("web", ["monitor"], []),
    ]
    assert _events(qrm_ctx) == before + 3


def test_bad_monitor_settings_change_nothing(qrm_ctx, images) -> None:
    ves.create_ve(qrm_ctx, name="plain", boot_image="idle", fs_image="root")
    before = _events(qrm_ctx)
    with pytest.raises(InvalidInput, match="needs failover"):
        ves.create_ve(qrm_ctx, name="x", boot_image="idle", fs_image="root", monitor_failover=True)
    with pytest.raises(InvalidInput, match="invalid monitor check"):
        ves.create_ve(qrm_ctx, name="y", boot_image="idle", fs_image="root", monitor=["http:80 -X"])
    with pytest.raises(InvalidInput, match="needs failover"):
        ves.set_ve(qrm_ctx, "plain", monitor=["tcp:22"], monitor_failover=True)
    with pytest.raises(InvalidInput, match="invalid monitor check"):
        ves.set_ve(qrm_ctx, "plain", monitor=["tcp:22;"])
    with pytest.raises(NotFound):
        ves.set_ve(qrm_ctx, "nosuch", monitor=["tcp:22"])
    assert [ve.name for ve in ves.list_ves(qrm_ctx)] == ["plain"]
    assert ves.show_ve(qrm_ctx, "plain").monitor == []
    assert _events(qrm_ctx) == before


# ---------------------------------------------------------------------------
# Failover on a monitor's word
# ---------------------------------------------------------------------------


@pytest.fixture
def site(qrm_settings, qrm_plugins, images):
    return Site(qrm_settings, qrm_plugins)


def _member(site: Site, name: str) -> str:
    with service_context(site.settings, plugins=site.plugins) as ctx:
        return ves.show_ve(ctx, name).resources[0]


def test_a_monitor_fails_a_member_over(site, qrm_ctx) -> None:
    a = site.add_node("52:54:00:00:01:01")
    b = site.add_node("52:54:00:00:01:02")
    ves.create_ve(
        qrm_ctx, name="web", boot_image="idle", fs_image="root", failover=True, monitor_failover=True
    )
    ves.start_ve(qrm_ctx, "web")
    site.settle(3)
    victim = site.nodes[_member(site, "web")]
    other = b if victim is a else a
    with service_context(site.settings, plugins=site.plugins) as ctx:
        row = resources.show_resource(ctx, victim.mac)
        assert row.state == "active"
        failed = resources.mark_failed(
            ctx,
            victim.mac,
            reason="host DOWN (hard, 3/3): PING CRITICAL - 100% packet loss",
            monitor="nagios",
            observed_at=row.state_changed_at + timedelta(seconds=1),
        )
    assert failed.state == "error"
    # The machine still answers its heartbeats (only the monitor saw it down):
    # the engine's next pass (it runs far more often than heartbeats come)
    # releases it, it is rebooted to idle, and the VE moves to the other one.
    site.reconciler.tick()
    site.settle(3)
    with service_context(site.settings, plugins=site.plugins) as ctx:
        assert ves.show_ve(ctx, "web").resources == [other.mac]
        assert resources.show_resource(ctx, victim.mac).state == "idle"
        messages = [e.message for e in ctx.session.exec(select(Event)).all()]
    assert any("active -> error: nagios: host DOWN (hard, 3/3)" in m for m in messages)
    assert victim.mode == "idle"
    # Already failed over: a second word changes nothing and says why.
    with (
        service_context(site.settings, plugins=site.plugins) as ctx,
        pytest.raises(Conflict, match="serves no"),
    ):
        resources.mark_failed(ctx, victim.mac, reason="still down", monitor="nagios")


def test_monitors_cannot_fail_what_did_not_ask_for_it(site, qrm_ctx) -> None:
    site.add_node("52:54:00:00:02:01")
    site.add_node("52:54:00:00:02:02")
    ves.create_ve(qrm_ctx, name="plain", boot_image="idle", fs_image="root", failover=True)
    ves.start_ve(qrm_ctx, "plain")
    site.settle(3)
    member = _member(site, "plain")
    idle = next(mac for mac in site.nodes if mac != member)
    with service_context(site.settings, plugins=site.plugins) as ctx:
        before = _events(ctx)
        with pytest.raises(Conflict, match="does not fail over on monitoring"):
            resources.mark_failed(ctx, member, reason="down", monitor="nagios")
        with pytest.raises(Conflict, match="serves no virtual environment"):
            resources.mark_failed(ctx, idle, reason="down", monitor="nagios")
        with pytest.raises(NotFound):
            resources.mark_failed(ctx, "52:54:00:00:09:09", reason="down", monitor="nagios")
        with pytest.raises(InvalidInput):
            resources.mark_failed(ctx, member, reason="down", monitor="bad name")
        assert _events(ctx) == before
        assert resources.show_resource(ctx, member).state == "active"


def test_monitors_leave_booting_members_and_old_observations_alone(site, qrm_ctx) -> None:
    site.add_node("52:54:00:00:03:01")
    ves.create_ve(
        qrm_ctx, name="web", boot_image="idle", fs_image="root", failover=True, monitor_failover=True
    )
    ves.start_ve(qrm_ctx, "web")
    site.reconciler.tick()
    member = _member(site, "web")
    with service_context(site.settings, plugins=site.plugins) as ctx:
        assert resources.show_resource(ctx, member).state == "assigned"
        with pytest.raises(Conflict, match="boot timeout applies"):
            resources.mark_failed(ctx, member, reason="down while rebooting", monitor="nagios")
    site.settle(3)
    with service_context(site.settings, plugins=site.plugins) as ctx:
        row = resources.show_resource(ctx, member)
        assert row.state == "active"
        with pytest.raises(Conflict, match="older than its current state"):
            resources.mark_failed(
                ctx,
                member,
                reason="seen down during the reboot",
                monitor="nagios",
                observed_at=row.state_changed_at - timedelta(seconds=5),
            )
        assert resources.show_resource(ctx, member).state == "active"


def test_ve_show_carries_the_members_health(site, qrm_ctx, qrm_plugins) -> None:
    qrm_plugins.register(Recorder(), "recorder")
    node = site.add_node("52:54:00:00:04:01", ip="10.9.0.4")
    ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="root")
    ves.start_ve(qrm_ctx, "web")
    site.settle(3)
    from qrm_core.client import LocalClient

    detail = LocalClient(site.settings, plugins=qrm_plugins).ve_show("web")
    assert [(h.resource, h.source, h.status, h.message) for h in detail.health] == [
        (node.mac, "recorder/ping", "ok", "10.9.0.4 answers")
    ]


def test_ve_set_and_show_through_the_cli(qrm_cli, images) -> None:
    created = qrm_cli(
        "ve", "create", "-n", "web", "-b", "idle", "-f", "root", "--failover",
        "--monitor", "http:80", "--monitor", "tcp:22", "--output", "json",
    )  # fmt: skip
    assert created.exit_code == 0, created.stderr
    assert created.json()["monitor"] == ["http:80", "tcp:22"]
    changed = qrm_cli("ve", "set", "web", "--monitor", "https:443", "--monitor-failover")
    assert changed.exit_code == 0, changed.stderr
    assert "monitor https:443, failover on monitoring on" in changed.stdout
    shown = qrm_cli("ve", "show", "web", "--output", "json").json()
    assert (shown["monitor"], shown["monitor_failover"], shown["health"]) == (["https:443"], True, [])
    cleared = qrm_cli("ve", "set", "web", "--no-monitor", "--no-monitor-failover")
    assert cleared.exit_code == 0 and "monitor none, failover on monitoring off" in cleared.stdout
    for args, text in (
        (["ve", "set", "web"], "nothing to change"),
        (["ve", "set", "web", "--monitor", "tcp:22", "--no-monitor"], "not both"),
        (["ve", "set", "web", "--monitor", "tcp:22;reboot"], "invalid monitor check"),
        (["ve", "create", "-n", "x", "-b", "idle", "-f", "root", "--monitor-failover"], "needs failover"),
    ):
        result = qrm_cli(*args)
        assert (
            result.exit_code == 1 and text in result.stderr and len(result.stderr.strip().splitlines()) == 1
        )


def test_ve_monitor_through_the_api(qrm_server, qrm_settings) -> None:
    with service_context(qrm_settings, plugins=qrm_server.plugins) as ctx:
        storage.add_storage(ctx, name="st", type="fake", address="10.0.0.2")
        storage.add_filesystem_image(ctx, name="root", storage="st", location="/exports/root")
        boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1")
    with qrm_server.client() as api:
        body = {
            "name": "web",
            "boot_image": "idle",
            "fs_image": "root",
            "failover": True,
            "monitor": ["tcp:22"],
        }
        assert api.post("/api/v1/ves", json=body).status_code == 201
        r = api.patch("/api/v1/ves/web", json={"monitor": ["http:80"], "monitor_failover": True})
        assert r.status_code == 200, r.text
        assert (r.json()["monitor"], r.json()["monitor_failover"]) == (["http:80"], True)
        shown = api.get("/api/v1/ves/web").json()
        assert shown["monitor"] == ["http:80"] and shown["health"] == []
        bad = api.patch("/api/v1/ves/web", json={"monitor": ["http:80$"]})
        assert bad.status_code == 422 and "invalid monitor check" in bad.json()["error"]["message"]
        both = api.patch("/api/v1/ves/web", json={"monitor": ["tcp:1"], "pool_size": 3})
        assert both.status_code == 422 and "shared" in both.json()["error"]["message"]
        assert api.patch("/api/v1/ves/web", json={}).status_code == 422
        assert api.get("/api/v1/ves/web").json()["monitor"] == ["http:80"]


def test_the_monitoring_view_has_what_monitoring_plugins_use(qrm_ctx, images) -> None:
    from qrm_core.services.monitoring import monitoring_view

    host = resources.add_resource(qrm_ctx, mac="52:54:00:00:05:01", ip="10.9.5.1", hostname="hv1")
    resources.add_resource(qrm_ctx, mac="52:54:00:00:05:02", kind="virtual", host="hv1")
    ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="root", failover=True, monitor=["http:80"])
    ves.create_ve(qrm_ctx, name="db", boot_image="idle", fs_image="root", monitor_failover=False)
    qrm_ctx.session.connection().execute(
        sa.text("UPDATE resource SET ve_id = (SELECT id FROM virtual_environment WHERE name = 'web'), "
                "state = 'active' WHERE mac = '52:54:00:00:05:02'")
    )  # fmt: skip
    qrm_ctx.session.commit()
    machines, view = monitoring_view(qrm_ctx)
    assert [(m.label, m.ip, m.host_id, m.ve, m.state) for m in machines] == [
        ("hv1", "10.9.5.1", None, None, "new"),
        ("52:54:00:00:05:02", None, host.id, "web", "active"),
    ]
    assert [(v.name, v.monitor, v.failover, v.monitor_failover, v.storage) for v in view] == [
        ("db", (), False, False, "st"),
        ("web", ("http:80",), True, False, "st"),
    ]
    assert not qrm_ctx.session.in_transaction()
