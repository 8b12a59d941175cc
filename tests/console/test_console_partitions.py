"""A hypervisor host's Partitions tab in a real browser: add N partitions,
pause and unpause one, change its memory and virtual CPUs, pin it, migrate
it to the other host, remove one; every bad input says what is wrong in one
line next to its field, and changes nothing.

Two simulated hypervisor hosts (the fake hypervisor; its partitions boot as
simulated machines and register) on a real ``qrm server``.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import expect

from qrm_core.lab.simulate import NodeSpec, mac_for
from qrm_core.services import partitions, service_context
from qrm_core.testing import RunningServer

from .conftest import Agents, Pages, axe_violations, screenshot

pytestmark = pytest.mark.slow


def recorded(server: RunningServer) -> list[tuple[str, str, str, int, int, str]]:
    """(name, host, state, CPUs, MB, pinning) of every partition, as the services see them."""
    with service_context(server.settings, plugins=server.plugins) as ctx:
        return [
            (p.name, p.host, p.state, p.cpus, p.memory_mb, p.cpu_pinning)
            for p in partitions.list_partitions(ctx)
        ]


@pytest.fixture(scope="module")
def hosts(agents: Agents, console_server: RunningServer) -> dict[str, int]:
    """Two fake-hypervisor hosts, hv1 and hv2 (8 CPUs, 4 GB each), registered."""
    agents.add(
        NodeSpec(
            mac=mac_for(101), ip="198.18.1.1", cpus=8, memory_mb=4096, hypervisors=["fake"], hostname="hv1"
        ),
        NodeSpec(
            mac=mac_for(102), ip="198.18.1.2", cpus=8, memory_mb=4096, hypervisors=["fake"], hostname="hv2"
        ),
    )
    from qrm_core.services import resources

    def ids() -> dict[str, int]:
        with service_context(console_server.settings, plugins=console_server.plugins) as ctx:
            found = {r.hostname: r.id for r in resources.list_resources(ctx).items if r.hostname}
        return {h: found[h] for h in ("hv1", "hv2") if h in found}

    from qrm_core.testkit import wait_until

    wait_until(lambda: len(ids()) == 2, timeout=20, what="hv1 and hv2 to register")
    return ids()


def field_error(page: Any, form: str, name: str) -> Any:
    return page.locator(f"#e-{form}-{name}")


def test_add_partitions_on_the_partitions_tab(
    pages: Pages, hosts: dict[str, int], console_server: RunningServer
) -> None:
    page = pages.logged_in()
    page.goto(f"/resources/{hosts['hv1']}")
    page.get_by_role("link", name="Partitions (0)").click()
    expect(page.locator("#partitions-live")).to_contain_text("32 of 32 CPUs")
    add = page.locator("form[action$='/partitions']")
    # Bad input first: not a number, then more memory than the host has. Nothing is made.
    add.get_by_label("How many").fill("two")
    add.get_by_label("CPUs each").fill("1")
    add.get_by_label("Memory each (MB)").fill("512")
    add.get_by_role("button", name="Add partitions").click()
    expect(field_error(page, "add", "count")).to_have_text("How many: 'two' is not a whole number")
    page.get_by_label("How many").fill("2")
    page.get_by_label("Memory each (MB)").fill("9000")
    page.get_by_role("button", name="Add partitions").click()
    expect(field_error(page, "add", "memory_mb")).to_have_text(
        "host hv1 has 4096 MB: a partition cannot have 9000 MB"
    )
    expect(page.get_by_label("How many")).to_have_value("2")
    assert recorded(console_server) == []
    page.get_by_label("Memory each (MB)").fill("512")
    page.get_by_role("button", name="Add partitions").click()
    expect(page.get_by_role("status")).to_have_text("2 partitions added: hv1-1, hv1-2")
    rows = page.locator("#partition-list tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text("running")
    # The partitions boot and register as virtual resources: the tab shows it without a reload.
    page.evaluate("window.__sameDocument = true")
    expect(rows.first.get_by_role("link", name=re.compile("^52:54:00"))).to_be_visible(timeout=15_000)
    assert page.evaluate("window.__sameDocument === true")
    screenshot(page, "partitions-tab")


def test_pause_unpause_resize_pin_and_migrate_one(
    pages: Pages, hosts: dict[str, int], console_server: RunningServer
) -> None:
    page = pages.logged_in()
    page.goto(f"/resources/{hosts['hv1']}?tab=partitions")
    page.get_by_role("link", name="hv1-1").click()
    expect(page.get_by_role("heading", name="Partition hv1-1", level=1)).to_be_visible()
    live = page.locator("#partition-live")
    expect(live.locator(".lead .state")).to_have_text("running")

    def act(name: str) -> None:
        page.locator("summary", has_text="Actions").click()
        page.get_by_role("button", name=name, exact=True).click()

    act("Pause")
    expect(page.get_by_role("status")).to_have_text("partition hv1-1 is paused")
    expect(live.locator(".lead .state")).to_have_text("paused")
    page.locator("summary", has_text="Actions").click()
    expect(page.get_by_role("button", name="Pause", exact=True)).to_have_count(0)  # only what applies
    page.keyboard.press("Escape")
    act("Unpause")
    expect(page.get_by_role("status")).to_have_text("partition hv1-1 is running")

    size = page.locator("form[action$='/resize']")
    size.get_by_label("Virtual CPUs").fill("2")
    size.get_by_role("button", name="Resize").click()
    expect(page.get_by_role("status")).to_have_text("partition hv1-1 resized: 2 CPUs, 512 MB")
    expect(page.locator("#p-cpus")).to_have_text("2")
    # Bad input: more memory than it may have while running; a word for CPUs.
    size.get_by_label("Memory (MB)").fill("1024")
    size.get_by_label("Applies").select_option("live")
    size.get_by_role("button", name="Resize").click()
    expect(field_error(page, "size", "memory_mb")).to_contain_text("can have at most 512 MB while running")
    size.get_by_label("Virtual CPUs").fill("many")
    size.get_by_role("button", name="Resize").click()
    expect(field_error(page, "size", "cpus")).to_have_text("Virtual CPUs: 'many' is not a whole number")
    assert ("hv1-1", "hv1", "running", 2, 512, "") in recorded(console_server)
    # From its next start, it has 1024 MB.
    size.get_by_label("Virtual CPUs").fill("2")
    size.get_by_label("Memory (MB)").fill("1024")
    size.get_by_label("Applies").select_option("config")
    size.get_by_role("button", name="Resize").click()
    expect(page.get_by_role("status")).to_contain_text("partition hv1-1 resized")
    expect(page.locator("#partition-history")).to_contain_text("512 -> 1024 MB (from its next start)")

    pin = page.locator("form[action$='/pin']")
    pin.get_by_label("CPU assignment").fill("0:9")
    pin.get_by_role("button", name="Pin").click()
    expect(field_error(page, "pin", "pinning")).to_contain_text("invalid pinning '0:9'")
    pin.get_by_label("CPU assignment").fill("0:2,3;1:4")
    pin.get_by_role("button", name="Pin").click()
    expect(page.get_by_role("status")).to_have_text("partition hv1-1 pinned: 0:2,3;1:4")
    expect(page.locator("#p-pinning")).to_have_text("0:2,3;1:4")

    move = page.locator("form[action$='/migrate']")
    expect(move.get_by_label("To host").locator("option")).to_have_text(["hv2"])
    move.get_by_role("button", name="Migrate").click()
    expect(page.get_by_role("status")).to_have_text("partition hv1-1 migrated to hv2")
    expect(page.get_by_role("heading", name="Partition hv1-1", level=1)).to_be_visible()
    expect(live.locator(".lead")).to_contain_text("running on hv2")
    expect(page.locator("#p-pinning")).to_have_text("-")  # it named hv1's CPUs
    screenshot(page, "partition")
    assert not axe_violations(page)
    assert ("hv1-1", "hv2", "running", 2, 512, "") in recorded(console_server)


def test_remove_and_refusals_change_nothing(
    pages: Pages, hosts: dict[str, int], console_server: RunningServer
) -> None:
    page = pages.logged_in()
    before = recorded(console_server)
    # A partition of another host's name, a forged action: one line each, nothing changed.
    answer = page.goto(f"/resources/{hosts['hv1']}/partitions/hv1-1")
    assert answer is not None and answer.status == 404
    expect(page.locator("main")).to_contain_text("partition 'hv1-1' does not exist on")
    token = page.locator("input[name=csrf_token]").first.get_attribute("value") or ""
    answer = page.request.post(
        f"/resources/{hosts['hv1']}/partitions/hv1-2/explode", form={"csrf_token": token}, max_redirects=0
    )
    assert answer.status == 404 and "no partition action &#39;explode&#39;" in answer.text()
    answer = page.request.post(f"/resources/{hosts['hv1']}/partitions/hv1-2/stop", form={}, max_redirects=0)
    assert answer.status == 403 and "security token (CSRF)" in answer.text()
    assert recorded(console_server) == before
    page.goto(f"/resources/{hosts['hv1']}/partitions/hv1-2")
    page.locator("summary", has_text="Actions").click()
    page.get_by_role("button", name="Remove").click()
    expect(page.get_by_role("status")).to_have_text("partition hv1-2 removed")
    expect(page).to_have_url(re.compile(r"\?tab=partitions$"))
    expect(page.get_by_text("No partition on this host yet.")).to_be_visible()
    assert [p[0] for p in recorded(console_server)] == ["hv1-1"]


def test_a_viewer_sees_the_partitions_but_no_action(
    pages: Pages, hosts: dict[str, int], console_server: RunningServer
) -> None:
    from qrm_core.services import users

    with service_context(console_server.settings, plugins=console_server.plugins) as ctx:
        users.create_user(ctx, name="pia", password="pia-password", role="viewer")
    page = pages.logged_in("pia", "pia-password")
    page.goto(f"/resources/{hosts['hv2']}?tab=partitions")
    expect(page.locator("#partition-list")).to_contain_text("hv1-1")
    expect(page.get_by_role("button", name="Add partitions")).to_have_count(0)
    page.get_by_role("link", name="hv1-1").click()
    expect(page.locator("#partition-live .lead .state")).to_have_text("running")
    for name in ("Actions", "Resize", "Pin", "Migrate"):
        assert page.get_by_text(name, exact=True).count() == 0, f"a viewer sees {name}"
    token = page.locator("input[name=csrf_token]").first.get_attribute("value") or ""
    forged = page.request.post(
        f"/resources/{hosts['hv2']}/partitions/hv1-1/pause", form={"csrf_token": token}, max_redirects=0
    )
    assert forged.status == 403 and "user pia (viewer) may not do this; it needs operator" in forged.text()
    assert [p[2] for p in recorded(console_server)] == ["running"]
