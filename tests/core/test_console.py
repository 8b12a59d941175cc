"""The web console without a browser: sessions, CSRF, roles, error pages, the
dashboard's counts, and the vendored assets (the browser tests are in tests/console)."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlmodel import select

from qrm_core.errors import AuthError
from qrm_core.models import ConsoleSession, Event
from qrm_core.services import overview, resources, sessions, storage, users
from qrm_core.testing import RunningServer

ROOT = Path(__file__).resolve().parents[2]


def _token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def _alerts(html: str) -> list[str]:
    import html as entities

    return [entities.unescape(m.strip()) for m in re.findall(r'role="alert"[^>]*>([^<]+)<', html)]


def browser(server: RunningServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"accept": "text/html"}, timeout=30)


def log_in(client: httpx.Client, user: str = "qrm", password: str = "qrm") -> httpx.Response:
    form = client.get("/login")
    return client.post("/login", data={"user": user, "password": password, "csrf_token": _token(form.text)})


# ---------------------------------------------------------------------------
# The sessions service
# ---------------------------------------------------------------------------


def test_login_opens_a_session_that_logout_ends(qrm_ctx) -> None:
    users.create_user(qrm_ctx, name="ann", password="secret-1", role="operator")
    opened = sessions.login(qrm_ctx, name="ann", password="secret-1", client="127.0.0.1")
    assert opened.user.name == "ann" and opened.expires_in == 12 * 3600
    stored = qrm_ctx.session.exec(select(ConsoleSession)).all()
    assert [s.token_hash for s in stored] == [hashlib.sha256(opened.secret.encode()).hexdigest()]
    assert sessions.authenticate(qrm_ctx, opened.secret).role == "operator"
    sessions.logout(qrm_ctx, opened.secret)
    with pytest.raises(AuthError):
        sessions.authenticate(qrm_ctx, opened.secret)
    messages = [e.message for e in qrm_ctx.session.exec(select(Event))]
    assert "ann logged in to the console from 127.0.0.1" in messages
    assert "ann logged out of the console" in messages


def test_a_wrong_password_opens_nothing_and_is_recorded(qrm_ctx) -> None:
    users.create_user(qrm_ctx, name="ann", password="secret-1")
    with pytest.raises(AuthError, match="wrong user name or password"):
        sessions.login(qrm_ctx, name="ann", password="nope", client="10.1.2.3")
    with pytest.raises(AuthError):
        sessions.login(qrm_ctx, name="nobody", password="x")
    assert qrm_ctx.session.exec(select(ConsoleSession)).all() == []
    failed = [e for e in qrm_ctx.session.exec(select(Event)) if "failed" in e.message]
    assert [(e.level, e.message) for e in failed] == [
        ("warning", "console login of 'ann' failed from 10.1.2.3"),
        ("warning", "console login of 'nobody' failed"),
    ]


def test_expired_sessions_and_changed_passwords_log_out(qrm_ctx) -> None:
    users.create_user(qrm_ctx, name="ann", password="secret-1")
    first = sessions.login(qrm_ctx, name="ann", password="secret-1")
    second = sessions.login(qrm_ctx, name="ann", password="secret-1")
    row = qrm_ctx.session.exec(select(ConsoleSession).order_by(ConsoleSession.id)).first()
    row.expires_at = row.created_at - timedelta(seconds=1)
    qrm_ctx.session.add(row)
    qrm_ctx.commit()
    with pytest.raises(AuthError, match="expired"):
        sessions.authenticate(qrm_ctx, first.secret)
    assert sessions.authenticate(qrm_ctx, second.secret).name == "ann"
    users.set_password(qrm_ctx, name="ann", password="secret-2")
    with pytest.raises(AuthError):
        sessions.authenticate(qrm_ctx, second.secret)
    for bad in ("", "x" * 300, "not-a-session"):
        with pytest.raises(AuthError):
            sessions.authenticate(qrm_ctx, bad)


def test_csrf_tokens_belong_to_their_session() -> None:
    token = sessions.csrf_token("secret-a")
    assert sessions.check_csrf("secret-a", token)
    assert not sessions.check_csrf("secret-b", token)
    assert not sessions.check_csrf("secret-a", None)
    assert not sessions.check_csrf("secret-a", "")


def test_overview_counts_by_state_and_lists_problems_first(qrm_ctx) -> None:
    for i in range(3):
        resources.add_resource(qrm_ctx, mac=f"02:00:00:00:00:0{i + 1}", hostname=f"node{i + 1}")
    storage.add_storage(qrm_ctx, name="nfs1", type="fake", address="10.0.0.2")
    storage.add_filesystem_image(qrm_ctx, name="root", storage="nfs1", location="/exports/root")
    row = resources.find_resource_row(qrm_ctx, "node2")
    resources.transition(qrm_ctx, row, "error", "no heartbeat")
    qrm_ctx.commit()
    summary = overview.overview(qrm_ctx)
    assert summary.resources_by_state["new"] == 2 and summary.resources_by_state["error"] == 1
    assert summary.resources_total == 3 and summary.ves_total == 0
    assert [(s.name, s.images, s.in_use) for s in summary.storage] == [("nfs1", 1, 0)]
    assert [(p.object_type, p.name) for p in summary.problems] == [("resource", "node2")]
    assert summary.recent_events[0].message.startswith("resource node2 new -> error")


# ---------------------------------------------------------------------------
# Through HTTP (a real qrm server), without a browser; the pages do not depend
# on the database backend (the services under them are tested on all three).
# ---------------------------------------------------------------------------

http_test = pytest.mark.qrm_backends("sqlite")


@http_test
def test_pages_need_a_login_and_the_login_sets_a_safe_cookie(qrm_server: RunningServer) -> None:
    with browser(qrm_server) as client:
        answer = client.get("/resources?state=idle")
        assert answer.status_code == 303
        assert answer.headers["location"] == "/login?next=%2Fresources%3Fstate%3Didle"
        assert client.get("/live").status_code == 401
        form = client.get("/login")
        answer = client.post(
            "/login",
            data={
                "user": "qrm",
                "password": "qrm",
                "csrf_token": _token(form.text),
                "next": "//evil.example/",
            },
        )
        assert answer.status_code == 303 and answer.headers["location"] == "/"
        cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("qrm_session="))
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
        page = client.get("/")
        assert page.status_code == 200 and "<h1>Dashboard</h1>" in page.text
        assert "still has the default password" in page.text
        # Behind a TLS proxy the cookie is Secure.
        form = client.get("/login")
        answer = client.post(
            "/login",
            data={"user": "qrm", "password": "qrm", "csrf_token": _token(form.text)},
            headers={"x-forwarded-proto": "https"},
        )
        cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("qrm_session="))
        assert "Secure" in cookie


@http_test
def test_login_refusals_say_why(qrm_server: RunningServer) -> None:
    with browser(qrm_server) as client:
        answer = log_in(client, "qrm", "wrong")
        assert answer.status_code == 401 and _alerts(answer.text) == ["wrong user name or password"]
        client.cookies.clear()
        answer = client.post("/login", data={"user": "qrm", "password": "qrm"})
        assert answer.status_code == 403
        assert "security token (CSRF)" in _alerts(answer.text)[0]
        assert "qrm_session" not in client.cookies


@http_test
def test_every_form_needs_its_csrf_token(qrm_server: RunningServer) -> None:
    with browser(qrm_server) as client:
        log_in(client)
        for path, data in [
            ("/storage/new", {"name": "nfs1", "type": "fake", "address": "10.0.0.2"}),
            ("/users/new", {"name": "eve", "password": "x", "role": "admin"}),
            ("/logout", {}),
        ]:
            for token in (None, "0" * 64):
                body = dict(data, **({"csrf_token": token} if token else {}))
                answer = client.post(path, data=body)
                assert answer.status_code == 403, path
                assert "security token (CSRF)" in _alerts(answer.text)[0]
        listed = qrm_server.client().get("/api/v1/storage").json()
        assert listed == []
        assert [u["name"] for u in qrm_server.client().get("/api/v1/users").json()] == ["qrm"]


@http_test
def test_a_viewer_is_refused_by_the_server_too(qrm_server: RunningServer) -> None:
    with qrm_server.client() as api:
        api.post("/api/v1/users", json={"name": "vic", "password": "vic-pass", "role": "viewer"})
        api.post("/api/v1/storage", json={"name": "nfs1", "type": "fake", "address": "10.0.0.2"})
    with browser(qrm_server) as client:
        log_in(client, "vic", "vic-pass")
        page = client.get("/storage")
        assert (
            "nfs1" in page.text
            and ">Remove<" not in page.text
            and "<summary>Tools</summary>" not in page.text
        )
        token = _token(page.text)  # the logout form's
        answer = client.post("/storage/nfs1/remove", data={"csrf_token": token})
        assert answer.status_code == 403
        assert _alerts(answer.text) == ["user vic (viewer) may not do this; it needs operator"]
        assert client.get("/users").status_code == 403
        assert client.get("/storage/new").status_code == 403
    assert [s["name"] for s in qrm_server.client().get("/api/v1/storage").json()] == ["nfs1"]


@http_test
def test_form_errors_go_next_to_their_field(qrm_server: RunningServer) -> None:
    with browser(qrm_server) as client:
        log_in(client)
        token = _token(client.get("/storage/new").text)
        answer = client.post(
            "/storage/new", data={"name": "nfs1", "type": "fake", "address": "not-an-ip", "csrf_token": token}
        )
        assert answer.status_code == 422
        assert re.search(
            r'<p class="error" id="e-address" role="alert">invalid storage server address', answer.text
        )
        assert 'value="nfs1"' in answer.text  # what was typed stays
        answer = client.post(
            "/storage/new", data={"name": "nfs1", "type": "nope", "address": "10.0.0.2", "csrf_token": token}
        )
        assert re.search(r'id="e-type" role="alert">unknown storage type &#39;nope&#39;', answer.text)
        answer = client.post(
            "/ves/new",
            data={"name": "web", "boot_image": "", "fs_image": "", "pool_size": "two", "csrf_token": token},
        )
        assert answer.status_code == 422
        assert "Pool size: &#39;two&#39; is not a whole number" in answer.text
        assert 'id="e-boot_image" role="alert">Boot image is required' in answer.text


@http_test
def test_errors_are_pages_for_people_and_json_for_the_api(qrm_server: RunningServer) -> None:
    with browser(qrm_server) as client:
        log_in(client)
        missing = client.get("/resources/no-such-machine")
        assert missing.status_code == 404 and _alerts(missing.text) == [
            "resource 'no-such-machine' does not exist"
        ]
        assert client.get("/no/such/page").status_code == 404
        assert "Traceback" not in missing.text
        api = client.get("/api/v1/resources/no-such-machine", headers={"accept": "application/json"})
        assert api.status_code in (401, 404) and api.json()["error"]["code"] in ("unauthorized", "not_found")


@http_test
def test_api_docs_are_served_from_the_wheel(qrm_server: RunningServer) -> None:
    with httpx.Client(base_url=qrm_server.url) as client:
        docs = client.get("/docs")
        assert docs.status_code == 200
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", docs.text)
        assert assets and all(a.startswith("/") for a in assets), assets
        for asset in assets:
            assert client.get(asset).status_code == 200, asset
        assert client.get("/openapi.json").status_code == 200


def test_vendored_assets_match_their_pinned_checksums() -> None:
    manifest = json.loads((ROOT / "scripts" / "vendor-assets.json").read_text())
    assert {p["package"] for p in manifest["packages"]} >= {"swagger-ui-dist", "axe-core"}
    for pkg in manifest["packages"]:
        assert re.fullmatch(r"\d+\.\d+\.\d+", pkg["version"]), pkg
        assert pkg["integrity"].startswith("sha512-") and pkg["license"]
        assert "LICENSE" in pkg["files"], f"{pkg['package']}: ship its license"
        for name, digest in pkg["files"].items():
            path = ROOT / pkg["dest"] / name
            assert path.is_file(), f"{path} is missing: run scripts/fetch-assets.py"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, (
                f"{path} is not {pkg['package']}@{pkg['version']}: run scripts/fetch-assets.py, edit nothing by hand"
            )


@http_test
def test_a_hypervisor_host_shows_its_partitions_section(qrm_server: RunningServer) -> None:
    enrollment = qrm_server.enrollment_token()
    with httpx.Client(base_url=qrm_server.url, timeout=30) as agent:
        body = {
            "mac": "06:51:00:00:00:01",
            "ip": "198.18.1.1",
            "cpus": 16,
            "memory_mb": 65536,
            "hypervisors": ["fake"],
        }
        host = agent.post(
            "/agent/v1/register", json=body, headers={"Authorization": f"Bearer {enrollment}"}
        ).json()
        body = {
            "mac": "02:51:00:00:00:09",
            "ip": "198.18.1.9",
            "cpus": 2,
            "memory_mb": 2048,
            "hypervisors": [],
        }
        plain = agent.post(
            "/agent/v1/register", json=body, headers={"Authorization": f"Bearer {enrollment}"}
        ).json()
    with browser(qrm_server) as client:
        log_in(client)
        page = client.get(f"/resources/{host['resource_id']}")
        assert page.status_code == 200
        assert f'href="/resources/{host["resource_id"]}?tab=partitions"' in page.text
        tab = client.get(f"/resources/{host['resource_id']}?tab=partitions")
        assert "No partition on this host yet." in tab.text and "Add partitions" in tab.text
        assert "64 of 64 CPUs" in tab.text  # 16 CPUs, overcommit 4
        assert "Partitions" not in client.get(f"/resources/{plain['resource_id']}").text
        # The plain machine takes no partitions: its tab is its overview.
        assert "Add partitions" not in client.get(f"/resources/{plain['resource_id']}?tab=partitions").text
