"""The console in a real browser (Debian's Chromium through Playwright),
against a real ``qrm server`` whose machines are simulated agents speaking
the real protocol. The scenarios follow openQRM's article: log in as qrm/qrm,
add the storage server through the Tools menu, create a filesystem image and
a virtual environment with the forms, start it from its actions menu and
watch it and its machine turn active without reloading the page."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from qrm_core.lab.simulate import NodeSpec, mac_for
from qrm_core.services import service_context, users
from qrm_core.testing import RunningServer

from .conftest import Agents, Pages, axe_violations, screenshot

pytestmark = pytest.mark.slow


def test_a_wrong_password_says_so_and_qrm_qrm_logs_in(pages: Pages) -> None:
    page = pages.new()
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login\?next=%2F$"))
    page.get_by_label("User").fill("qrm")
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#login-error")).to_have_text("wrong user name or password")
    page.get_by_label("Password").fill("qrm")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Dashboard", level=1)).to_be_visible()
    expect(page.get_by_role("alert").first).to_contain_text("still has the default password")
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["qrm_session"]["httpOnly"] and cookies["qrm_session"]["sameSite"] == "Strict"
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("heading", name="Log in to qrm")).to_be_visible()
    page.goto("/resources")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Fresources$"))


def test_add_new_storage_server_through_the_tools_menu(pages: Pages) -> None:
    page = pages.logged_in()
    page.get_by_role("link", name="Storage/Server").click()
    expect(page.get_by_role("heading", name="Storage/Server")).to_be_visible()
    page.locator("summary", has_text="Tools").click()
    page.get_by_role("link", name="Add New Storage Server").click()
    expect(page.get_by_role("heading", name="Add New Storage Server")).to_be_visible()
    page.get_by_label("Name").fill("NFS")
    page.get_by_label("Type").select_option("fake")
    page.get_by_label("Address").fill("10.0.11.35.7")  # a bad field first
    page.get_by_label("Comment").fill("QRMSRC")
    page.get_by_role("button", name="Add storage server").click()
    error = page.locator("#e-address")
    expect(error).to_have_text("invalid storage server address '10.0.11.35.7'")
    expect(page.get_by_label("Address")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Name")).to_have_value("NFS")
    page.get_by_label("Address").fill("10.0.11.35")
    page.get_by_role("button", name="Add storage server").click()
    expect(page.get_by_role("status")).to_have_text("storage server NFS added (fake at 10.0.11.35)")
    row = page.get_by_role("row", name=re.compile(r"^NFS fake 10\.0\.11\.35"))
    expect(row).to_be_visible()
    screenshot(page, "storage")


def test_create_a_filesystem_image_a_boot_image_and_a_ve_through_the_forms(pages: Pages) -> None:
    page = pages.logged_in()
    page.goto("/filesystem-images")
    page.get_by_role("link", name="New Filesystem Image").click()
    page.get_by_label("Name").fill("centos")
    page.get_by_label("Storage server").select_option("NFS")
    page.get_by_label("Location").fill("/exports/centos")
    page.get_by_role("button", name="Add filesystem image").click()
    expect(page.get_by_role("status")).to_have_text("filesystem image centos added")
    page.goto("/boot-images/new")
    page.get_by_label("Name").fill("idle")
    page.get_by_label("Kernel version").fill("6.1")
    page.get_by_label("Make it the default boot image").check()
    page.get_by_role("button", name="Add boot image").click()
    expect(page.get_by_role("status")).to_have_text("boot image idle added")
    page.get_by_role("link", name="Virtual Environments").click()
    page.get_by_role("link", name="New Virtual Environment").click()
    page.get_by_label("Name").fill("web")
    page.get_by_label("Boot image").select_option("idle")
    page.get_by_label("Filesystem image").select_option("centos")
    page.get_by_label("Deployment type").select_option("single")
    page.get_by_label("Pool size").fill("3")  # only for shared: the service says so, next to the field
    page.get_by_role("button", name="Create").click()
    expect(page.locator("#e-pool_size")).to_have_text("--pool-size applies to shared deployments only")
    page.get_by_label("Pool size").fill("")
    page.get_by_label("Failover").check()
    page.get_by_role("button", name="Create").click()
    expect(page.get_by_role("heading", name="Virtual Environment web")).to_be_visible()
    expect(page.locator("#ve-live .lead")).to_contain_text("stopped")
    screenshot(page, "ve-form-result")


def test_start_from_the_actions_menu_and_watch_it_turn_active_live(
    pages: Pages, agents: Agents, console_server: RunningServer
) -> None:
    agents.add(NodeSpec(mac=mac_for(1), ip="198.18.0.1", cpus=2, memory_mb=2048))
    page = pages.logged_in()
    page.goto("/resources")
    expect(page.locator("#resource-list")).to_contain_text("idle", timeout=15_000)
    page.goto("/ves/web")
    page.evaluate("window.__sameDocument = true")
    page.locator("summary", has_text="Actions").click()
    page.get_by_role("button", name="Start").click()
    expect(page.get_by_role("status")).to_have_text("start of web requested")
    page.evaluate("window.__sameDocument = true")
    expect(page.locator("#ve-live .lead .state")).to_have_text("running", timeout=15_000)
    assert page.evaluate("window.__sameDocument === true"), "the page was reloaded"
    member = page.locator("#ve-live").get_by_role("row", name=re.compile(mac_for(1)))
    expect(member).to_contain_text("active")
    member.get_by_role("link").click()
    expect(page.locator("#resource-live .lead .state")).to_have_text("active")
    expect(page.locator("#resource-live")).to_contain_text("booting -> active")
    screenshot(page, "resource")
    page.goto("/")
    screenshot(page, "dashboard")


def test_the_resources_page_updates_live_when_a_machine_registers(pages: Pages, agents: Agents) -> None:
    page = pages.logged_in()
    page.goto("/resources")
    page.evaluate("window.__sameDocument = true")
    before = page.locator("#res-count").inner_text()
    agents.add(NodeSpec(mac=mac_for(2), ip="198.18.0.2"))
    expect(page.locator("#resource-list")).to_contain_text(mac_for(2), timeout=15_000)
    assert page.evaluate("window.__sameDocument === true")
    assert page.locator("#res-count").inner_text() != before
    page.goto("/events")
    page.evaluate("window.__sameDocument = true")
    agents.add(NodeSpec(mac=mac_for(3), ip="198.18.0.3"))
    expect(page.locator("#event-list")).to_contain_text(f"{mac_for(3)} registered", timeout=15_000)
    assert page.evaluate("window.__sameDocument === true")


def test_a_viewer_sees_no_write_actions_and_a_forged_post_is_refused(
    pages: Pages, console_server: RunningServer
) -> None:
    with service_context(console_server.settings, plugins=console_server.plugins) as ctx:
        users.create_user(ctx, name="vic", password="vic-password", role="viewer")
    page = pages.logged_in("vic", "vic-password")
    for path in (
        "/",
        "/resources",
        "/ves",
        "/ves/web",
        "/storage",
        "/filesystem-images",
        "/boot-images",
        "/plugins",
    ):
        page.goto(path)
        for name in ("Actions", "Tools", "Start", "Stop", "Remove", "New Virtual Environment", "Disable"):
            assert page.get_by_text(name, exact=True).count() == 0, f"{path} shows {name} to a viewer"
    expect(page.get_by_role("link", name="Users")).to_have_count(0)
    token = page.locator("input[name=csrf_token]").first.get_attribute("value")
    forged = page.request.post("/ves/web/stop", form={"csrf_token": token or ""}, max_redirects=0)
    assert forged.status == 403
    assert "user vic (viewer) may not do this; it needs operator" in forged.text()
    page.goto("/ves/web")
    expect(page.locator("#ve-live .lead .state")).to_have_text("running")


def test_a_post_without_its_csrf_token_is_refused_with_a_clear_message(pages: Pages) -> None:
    page = pages.logged_in()
    answer = page.request.post(
        "/storage/new", form={"name": "evil", "type": "fake", "address": "10.9.9.9"}, max_redirects=0
    )
    assert answer.status == 403
    assert "without its security token (CSRF)" in answer.text()
    page.goto("/storage")
    expect(page.get_by_text("evil")).to_have_count(0)


def test_plugin_panels_and_links_show_and_stay_escaped(pages: Pages, console_server: RunningServer) -> None:
    from qrm_core.plugin_api import ConsoleLink, ConsolePanel, hookimpl

    class Monitor:
        @hookimpl
        def qrm_console_panels(self, object_type: str, object_name: str) -> list[ConsolePanel]:
            if object_type != "resource":
                return []
            return [
                ConsolePanel(
                    "Nagios status",
                    rows=(("PING", "OK - 0.1 ms"), ("note", "<script>window.__owned = 1</script> fine")),
                    status="ok",
                    links=(
                        ConsoleLink("bad", "javascript:alert(1)"),
                        ConsoleLink("Open in Nagios", "/nagios/"),
                    ),
                )
            ]

        @hookimpl
        def qrm_console_links(self, object_type: str) -> list[ConsoleLink]:
            return [ConsoleLink("Nagios", "/nagios/")] if object_type == "dashboard" else []

    class Broken:
        @hookimpl
        def qrm_console_panels(self, object_type: str) -> list[ConsolePanel]:
            raise RuntimeError("cannot reach the rack database")

    console_server.plugins.register(Monitor(), "test-monitor")
    try:
        page = pages.logged_in()
        expect(page.get_by_role("link", name="Nagios", exact=True)).to_have_attribute("href", "/nagios/")
        page.goto(f"/resources/{mac_for(1)}")
        panel = page.locator(".panel", has_text="Nagios status")
        expect(panel).to_contain_text("OK - 0.1 ms")
        expect(panel).to_contain_text("<script>window.__owned = 1</script> fine")
        expect(panel.get_by_role("link", name="bad")).to_have_count(0)
        expect(panel.get_by_role("link", name="Open in Nagios")).to_be_visible()
        assert page.evaluate("window.__owned === undefined")
        # A second plugin fails: it gets a panel saying so, and the first one's panel stays.
        console_server.plugins.register(Broken(), "test-broken")
        page.reload()
        expect(page.locator(".panel", has_text="test-broken")).to_contain_text(
            "cannot reach the rack database"
        )
        expect(page.locator(".panel", has_text="Nagios status")).to_contain_text("OK - 0.1 ms")
        expect(page.get_by_role("heading", name=re.compile("Resource"), level=1)).to_be_visible()
    finally:
        console_server.plugins.unregister("test-monitor")
        console_server.plugins.unregister("test-broken")


def test_docs_work_offline(pages: Pages) -> None:
    page = pages.new()
    page.goto("/docs")
    expect(page.locator(".swagger-ui .information-container .title")).to_contain_text("qrm", timeout=15_000)
    expect(page.locator(".opblock-tag-section").first).to_be_visible()
    # pages.external (checked after the test) holds any request beyond this server.


def test_keyboard_only_open_the_actions_menu_and_reach_an_action(pages: Pages) -> None:
    page = pages.logged_in()
    page.goto("/ves/web")
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Enter")
    summary = page.locator("details.actions > summary").first
    summary.focus()
    page.keyboard.press("Enter")
    expect(page.locator("details.actions").first).to_have_attribute("open", "")
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Start")).to_be_focused()
    page.keyboard.press("Escape")
    expect(page.locator("details.actions").first).not_to_have_attribute("open", "")
    expect(summary).to_be_focused()


def test_usable_on_a_phone(pages: Pages) -> None:
    page = pages.logged_in(phone=True)
    nav = page.locator("#nav")
    expect(nav).to_be_hidden()
    page.get_by_role("button", name="Menu").click()
    expect(nav).to_be_visible()
    nav.get_by_role("link", name="Virtual Environments").click()
    # level 1: the dashboard has a "Virtual Environments" heading too, and is measured otherwise
    expect(page.get_by_role("heading", name="Virtual Environments", level=1)).to_be_visible()
    width = page.evaluate("document.documentElement.scrollWidth")
    wide = page.evaluate(
        "[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > 392)"
        ".filter(e => !e.closest('.scroll')).slice(0, 12).map(e => e.tagName + '.' + e.className + ' < ' + e.parentElement.tagName + '.' + e.parentElement.className + ' ' + Math.round(e.getBoundingClientRect().right) + ' ' + getComputedStyle(e).overflowX)"
    )
    screenshot(page, "phone-ves")
    # A page being laid out again (a live refresh) can be wider for a moment: what counts is where it settles.
    try:
        page.wait_for_function("document.documentElement.scrollWidth <= 391", timeout=5_000)
    except Exception:  # the assertion below says what is too wide
        pass
    width = page.evaluate("document.documentElement.scrollWidth")
    layout = page.evaluate(
        "[window.innerWidth, document.documentElement.clientWidth, matchMedia('(max-width: 760px)').matches]"
    )
    assert width <= 390 + 1, f"the page is {width} px wide on a 390 px phone ({layout}): {wide}"


MAIN_PAGES = [
    ("dashboard", "/"),
    ("resources", "/resources"),
    ("resource", f"/resources/{mac_for(1)}"),
    ("ves", "/ves"),
    ("ve", "/ves/web"),
    ("ve-new", "/ves/new"),
    ("storage", "/storage"),
    ("storage-new", "/storage/new"),
    ("filesystem-images", "/filesystem-images"),
    ("boot-images", "/boot-images"),
    ("events", "/events"),
    ("plugins", "/plugins"),
    ("users", "/users"),
    ("account", "/account"),
]


def test_main_pages_screenshots_and_accessibility(pages: Pages) -> None:
    """Every main page: a screenshot (an artefact) and no WCAG 2.1 A/AA violation axe-core finds."""
    page = pages.logged_in()
    found: dict[str, list[str]] = {}
    for name, path in MAIN_PAGES:
        answer = page.goto(path)
        assert answer is not None and answer.ok, f"{path}: {answer.status if answer else None}"
        assert page.locator("h1").count() == 1, f"{path}: one h1"
        screenshot(page, name)
        violations = axe_violations(page)
        if violations:
            found[path] = violations
    login = pages.new()
    login.goto("/login")
    screenshot(login, "login")
    if axe_violations(login):
        found["/login"] = axe_violations(login)
    assert not found, "accessibility: " + "; ".join(f"{p}: {v}" for p, v in found.items())


def test_no_page_shows_a_traceback(pages: Pages) -> None:
    page = pages.logged_in()
    for path in (
        "/resources/12345",
        "/ves/nope",
        "/storage/nope",
        "/resources?state=bogus&page=x",
        "/no/such/page",
    ):
        answer = page.goto(path)
        assert answer is not None and answer.status in (200, 404), path
        text = page.content()
        assert "Traceback" not in text and "Internal Server Error" not in text
    answer = page.request.post("/ves/web/explode", form={}, max_redirects=0)
    assert answer.status in (403, 404) and "Traceback" not in answer.text()


def test_a_filesystem_image_page_snapshot_revert_clone_and_plugin_panels(
    pages: Pages, console_server: RunningServer
) -> None:
    from qrm_core.plugin_api import ConsolePanel, hookimpl
    from qrm_core.services import storage

    class Backup:
        @hookimpl
        def qrm_console_panels(self, object_type: str, object_name: str) -> list[ConsolePanel]:
            if object_type in ("filesystem_image", "boot_image", "partition"):
                return [ConsolePanel("Backup", rows=(("last", f"{object_type} {object_name} at 02:00"),))]
            return []

    with service_context(console_server.settings, plugins=console_server.plugins) as ctx:
        storage.add_filesystem_image(ctx, name="base", storage="NFS", size_mb=64)
        storage.add_storage(ctx, name="SAN", type="fake", address="10.0.11.36")
    console_server.plugins.register(Backup(), "test-backup")
    try:
        page = pages.logged_in()
        page.goto("/filesystem-images")
        page.get_by_role("link", name="base", exact=True).click()
        expect(page.get_by_role("heading", name="Filesystem image base", level=1)).to_be_visible()
        expect(page.locator(".panel", has_text="Backup")).to_contain_text("filesystem_image base at 02:00")
        snap = page.locator("form[action$='/snapshot']")
        snap.get_by_label("Label").fill("bad label!")
        snap.get_by_role("button", name="Take snapshot").click()
        expect(page.locator("#e-snap-label")).to_contain_text(
            "snapshot label 'bad label!' must be 1-64 letters"
        )
        expect(page.get_by_text("No snapshot.")).to_be_visible()
        page.get_by_label("Label").fill("before")
        page.get_by_role("button", name="Take snapshot").click()
        expect(page.get_by_role("status")).to_contain_text("snapshot before of base taken")
        expect(page.locator("#snapshot-list")).to_contain_text("before")
        page.locator("#snapshot-list summary").click()
        page.get_by_role("button", name="Revert to it").click()
        expect(page.get_by_role("status")).to_have_text("filesystem image base reverted to snapshot before")
        page.locator("#snapshot-list summary").click()
        page.get_by_role("button", name="Remove snapshot").click()
        expect(page.get_by_role("status")).to_have_text("snapshot before of base removed")
        clone = page.locator("form[action$='/clone']")
        clone.get_by_label("Name of the copy").fill("centos")
        clone.get_by_role("button", name="Clone").click()
        expect(page.locator("#e-clone-name")).to_have_text("filesystem image 'centos' already exists")
        page.get_by_label("Name of the copy").fill("base-copy")
        page.get_by_role("button", name="Clone").click()
        expect(page.get_by_role("status")).to_have_text("filesystem image base-copy cloned from base")
        expect(page.get_by_role("heading", name="Filesystem image base-copy", level=1)).to_be_visible()
        # onto another storage server: the form offers the others, the image's own is "the same"
        page.goto("/filesystem-images/base")
        clone = page.locator("form[action$='/clone']")
        where = clone.get_by_label("Storage server")
        expect(where.locator("option")).to_have_text(["the same (NFS)", "SAN"])
        clone.get_by_label("Name of the copy").fill("base-san")
        where.select_option("SAN")
        clone.get_by_role("button", name="Clone").click()
        expect(page.get_by_role("status")).to_have_text("filesystem image base-san cloned from base")
        expect(page.get_by_role("heading", name="Filesystem image base-san", level=1)).to_be_visible()
        with service_context(console_server.settings, plugins=console_server.plugins) as ctx:
            assert storage.show_filesystem_image(ctx, "base-san").storage == "SAN"
        screenshot(page, "filesystem-image")
        assert not axe_violations(page)
        # An image in use: the service's refusal, above the form; nothing made.
        page.goto("/filesystem-images/centos")
        page.get_by_label("Name of the copy").fill("centos-copy")
        page.get_by_role("button", name="Clone").click()
        expect(page.locator("#clone-form-error")).to_have_text(
            "cannot clone filesystem image centos: virtual environment web is using it (stop it first)"
        )
        page.goto("/filesystem-images")
        expect(page.get_by_role("link", name="centos-copy")).to_have_count(0)
        page.goto("/boot-images")
        page.get_by_role("link", name="idle", exact=True).click()
        expect(page.get_by_role("heading", name="Boot image idle", level=1)).to_be_visible()
        expect(page.locator(".panel", has_text="Backup")).to_contain_text("boot_image idle at 02:00")
    finally:
        console_server.plugins.unregister("test-backup")


def test_a_capture_form_refuses_bad_input_and_its_progress_shows_live(
    pages: Pages, console_server: RunningServer
) -> None:
    from qrm_core.models import ImageState
    from qrm_core.services import images, storage

    page = pages.logged_in()
    page.goto("/filesystem-images")
    page.get_by_role("link", name="Capture a running machine").click()
    page.get_by_label("Name").fill("web1")
    page.get_by_label("Storage server").select_option("NFS")
    page.get_by_label("Machine to capture").fill("root@10.0.11.172")
    page.get_by_label("SSH private key").fill("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    page.get_by_role("button", name="Capture").click()
    expect(page.locator("#e-source")).to_contain_text("give [user@]host:/path")
    expect(page.get_by_label("SSH private key")).to_have_value("")  # a secret is never sent back
    assert "secret" not in page.content()
    page.get_by_label("Machine to capture").fill("root@10.0.11.172:/")
    page.get_by_label("SSH private key").fill("not a key")
    page.get_by_role("button", name="Capture").click()
    expect(page.locator("#e-identity")).to_contain_text("the identity must be a private key file")
    with service_context(console_server.settings, plugins=console_server.plugins) as ctx:
        assert "web1" not in [f.name for f in storage.list_filesystem_images(ctx)]
        # A capture under way (as one started from the CLI writes it): the page follows its progress.
        storage.add_filesystem_image(ctx, name="web2", storage="NFS", location="/exports/web2")
        images._set(ctx, "web2", state=ImageState.CREATING.value, progress="capturing: 10% (1.0 GB)")
    page.goto("/filesystem-images/web2")
    page.evaluate("window.__sameDocument = true")
    expect(page.locator("#fs-progress")).to_have_text("capturing: 10% (1.0 GB)")
    with service_context(console_server.settings, plugins=console_server.plugins) as ctx:
        images._set(ctx, "web2", progress="capturing: 60% (6.0 GB)")
    expect(page.locator("#fs-progress")).to_have_text("capturing: 60% (6.0 GB)", timeout=5_000)
    with service_context(console_server.settings, plugins=console_server.plugins) as ctx:
        images._set(ctx, "web2", state=ImageState.READY.value, progress="")
    expect(page.locator("#fs-live .lead .state")).to_have_text("ready", timeout=5_000)
    assert page.evaluate("window.__sameDocument === true")
    expect(page.locator("#fs-live")).not_to_have_attribute("data-poll", re.compile("."))


def test_an_admin_sets_another_users_password(pages: Pages) -> None:
    page = pages.logged_in()
    page.goto("/users")
    row = page.get_by_role("row", name=re.compile(r"^vic viewer"))
    row.locator("summary").click()
    row.get_by_role("link", name="Set password").click()
    expect(page.get_by_role("heading", name="Password of vic", level=1)).to_be_visible()
    expect(page.get_by_label("Current password")).to_have_count(0)  # an admin resets it without
    page.locator("#f-password").fill("vic")
    page.locator("#f-confirm").fill("vic")
    page.get_by_role("button", name="Change password").click()
    expect(page.locator("#e-password")).to_contain_text("password")
    page.locator("#f-password").fill("vic-new-password")
    page.locator("#f-confirm").fill("vic-other-password")
    page.get_by_role("button", name="Change password").click()
    expect(page.locator("#e-confirm")).to_have_text("the two passwords differ")
    page.locator("#f-password").fill("vic-new-password")
    page.locator("#f-confirm").fill("vic-new-password")
    page.get_by_role("button", name="Change password").click()
    expect(page.get_by_role("status")).to_have_text("password of vic changed")
    vic = pages.logged_in("vic", "vic-new-password")
    expect(vic.get_by_role("heading", name="Dashboard", level=1)).to_be_visible()


def test_reset_a_pristine_ve_from_its_actions_menu(pages: Pages, console_server: RunningServer) -> None:
    from qrm_core.services import storage
    from qrm_core.services import virtual_environments as ves
    from qrm_core.testkit import wait_until

    page = pages.logged_in()
    # Not pristine: the service says so in one line, nothing changes.
    token = page.locator("input[name=csrf_token]").first.get_attribute("value") or ""
    answer = page.request.post("/ves/web/reset", form={"csrf_token": token})
    assert "web is not kept pristine" in answer.text()
    with service_context(console_server.settings, plugins=console_server.plugins) as ctx:
        storage.add_filesystem_image(ctx, name="kiosk-root", storage="NFS", size_mb=64)
    page.goto("/ves/new")
    page.get_by_label("Name").fill("kiosk")
    page.get_by_label("Boot image").select_option("idle")
    page.get_by_label("Filesystem image").select_option("kiosk-root")
    page.get_by_label("Pristine").check()
    page.get_by_role("button", name="Create").click()
    expect(page.locator("#ve-live")).to_contain_text("yes: Reset gives it back its first start")
    page.locator("summary", has_text="Actions").click()
    page.get_by_role("button", name="Start").click()
    expect(page.locator("#ve-live .lead .state")).to_have_text("running", timeout=15_000)

    def state() -> str:
        with service_context(console_server.settings, plugins=console_server.plugins) as ctx:
            return ves.show_ve(ctx, "kiosk").state

    wait_until(lambda: state() == "running", what="kiosk to run", timeout=20)
    page.locator("summary", has_text="Actions").click()
    page.get_by_role("button", name="Reset").click()
    expect(page.get_by_role("status")).to_have_text("virtual environment kiosk reset to what it started with")
    expect(page.locator("#ve-live")).to_contain_text("kiosk-root reverted to its first start")
    expect(page.locator("#ve-live .lead .state")).to_have_text("running", timeout=15_000)


def test_build_a_boot_image_and_watch_its_progress(pages: Pages, console_server: RunningServer) -> None:
    """From a real Debian kernel package (the one tests/core/bootimage downloads once)."""
    import os
    from pathlib import Path

    from qrm_core.bootimage import kernel as kernels
    from qrm_core.services.boot_build import kernel_cache_dir
    from qrm_core.testing import missing

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qrm-test" / "kernel"
    found = kernels.cached_debs(cache)
    if not found:
        missing("a Debian kernel package", f"run tests/core/bootimage once (it downloads one into {cache})")
    version, deb = found[-1]
    target = kernel_cache_dir(console_server.settings)
    target.mkdir(parents=True, exist_ok=True)
    (target / deb.name).unlink(missing_ok=True)
    os.symlink(deb, target / deb.name)
    page = pages.logged_in()
    page.goto("/boot-images")
    page.get_by_role("link", name="Build a boot image").click()
    page.get_by_label("Name").fill("bad name!")
    page.locator("#f-kernel_version").select_option(version)
    page.get_by_role("button", name="Build").click()
    expect(page.locator("#e-name")).to_contain_text("boot image name")
    assert not [b for b in page.locator("#build-list li").all_inner_texts()]  # nothing started
    page.get_by_label("Name").fill("built")
    page.get_by_role("button", name="Build").click()
    expect(page.get_by_role("status")).to_have_text("build of boot image built started")
    page.evaluate("window.__sameDocument = true")
    builds = page.locator("#build-list")
    expect(builds.locator("progress")).to_be_visible()
    expect(builds).to_contain_text("done", timeout=180_000)
    assert page.evaluate("window.__sameDocument === true")
    row = page.get_by_role("row", name=re.compile(r"^built "))
    expect(row).to_contain_text(version)
    expect(row).to_contain_text("kernel + initrd")
