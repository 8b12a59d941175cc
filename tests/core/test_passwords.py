"""The password policy (length, not the user name, not 'qrm') wherever a
password is chosen, and the current password for changing one's own
(SQLite, PostgreSQL, MariaDB)."""

from __future__ import annotations

import re

import httpx
import pytest
from sqlmodel import select

from qrm_core.errors import Forbidden, InvalidInput
from qrm_core.models import Event, User
from qrm_core.services import service_context, users

WEAK = [
    ("", "must not be empty"),
    ("a", "too short (1 characters; at least 8)"),
    ("qrm", "must not be 'qrm'"),
    ("QRM", "must not be 'qrm'"),
    ("short-7", "too short"),
    ("x" * 1025, "too long"),
]


def test_weak_passwords_are_refused_for_new_users_and_changes(qrm_ctx) -> None:
    users.create_user(qrm_ctx, name="annabel-lee", password="long-enough-1")
    for password, why in [*WEAK, ("Annabel-Lee", "must not be the user name")]:
        with pytest.raises(InvalidInput, match=re.escape(why)):
            users.create_user(qrm_ctx, name="annabel-lee", password=password)
        with pytest.raises(InvalidInput, match=re.escape(why)):
            users.create_user(
                qrm_ctx, name="other-user", password=password.replace("Annabel-Lee", "Other-User")
            )
        with pytest.raises(InvalidInput, match=re.escape(why)):
            users.set_password(qrm_ctx, name="annabel-lee", password=password)
    assert [u.name for u in users.list_users(qrm_ctx)] == ["annabel-lee"]
    assert users.authenticate(qrm_ctx, "annabel-lee", "long-enough-1").name == "annabel-lee"


@pytest.mark.qrm_backends("sqlite")
def test_qrm_init_refuses_a_weak_admin_password_before_creating_anything(qrm_cli, qrm_settings) -> None:
    for weak, why in (("a", "too short"), ("qrm", "must not be 'qrm'"), ("qrmqrmqrm", None)):
        result = qrm_cli("init", "--admin-password", weak)
        if why is None:  # long enough, not the name, not the default
            assert result.exit_code == 0, result.stderr
            continue
        assert result.exit_code != 0
        assert why in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert not (qrm_settings.data_dir / "qrm.db").exists() or qrm_settings.database_url
    with service_context(qrm_settings) as ctx:
        assert users.authenticate(ctx, "qrm", "qrmqrmqrm").name == "qrm"
        assert not users.default_password_unchanged(ctx)


@pytest.mark.qrm_backends("sqlite")
def test_user_add_and_passwd_on_the_cli_apply_the_policy(qrm_cli) -> None:
    assert qrm_cli("init").exit_code == 0
    added = qrm_cli("user", "add", "-n", "annabel-lee", "-p", "Annabel-Lee")
    assert added.exit_code != 0 and added.stderr == "error: the password must not be the user name\n"
    assert qrm_cli("user", "add", "-n", "ann", "-p", "ann-password").exit_code == 0
    short = qrm_cli("user", "passwd", "ann", "-p", "abc")
    assert short.exit_code != 0 and "too short" in short.stderr
    # The local CLI works on the database itself: no current password needed.
    assert qrm_cli("user", "passwd", "ann", "-p", "ann-password-2").exit_code == 0


@pytest.mark.qrm_backends("sqlite")
def test_changing_your_own_password_needs_the_current_one(qrm_server, qrm_cli) -> None:
    with qrm_server.client() as admin:
        assert (
            admin.post("/api/v1/users", json={"name": "ann", "password": "a", "role": "viewer"}).status_code
            == 422
        )
        created = admin.post(
            "/api/v1/users", json={"name": "ann", "password": "ann-pass-1", "role": "viewer"}
        )
        assert created.status_code == 201, created.text
        admin.post("/api/v1/users", json={"name": "bob", "password": "bob-pass-1", "role": "operator"})
        token = admin.post("/api/v1/auth/tokens", json={"name": "ci", "user": "ann"}).json()["token"]
    # Ann's API token alone cannot change her password.
    with qrm_server.client(token=token) as ann:
        refused = ann.post("/api/v1/users/ann/password", json={"password": "taken-over-1"})
        assert refused.status_code == 403
        assert "needs your current password" in refused.json()["error"]["message"]
        wrong = ann.post(
            "/api/v1/users/ann/password", json={"password": "taken-over-1", "current_password": "guess-1234"}
        )
        assert wrong.status_code == 403
        assert (
            wrong.json()["error"]["message"] == "the current password is wrong; the password was not changed"
        )
        weak = ann.post(
            "/api/v1/users/ann/password", json={"password": "qrm", "current_password": "ann-pass-1"}
        )
        assert weak.status_code == 422
        ok = ann.post(
            "/api/v1/users/ann/password", json={"password": "ann-pass-2", "current_password": "ann-pass-1"}
        )
        assert ok.status_code == 200, ok.text
        # Nor anyone else's (not an admin).
        assert ann.post("/api/v1/users/bob/password", json={"password": "bob-pass-9"}).status_code == 403
    # An admin resets another user's password without knowing it, and its own only with it.
    with qrm_server.client() as admin:
        assert admin.post("/api/v1/users/ann/password", json={"password": "ann-pass-3"}).status_code == 200
        assert admin.post("/api/v1/users/qrm/password", json={"password": "admin-pass-1"}).status_code == 403
    # The remote CLI sends the password it logged in with as the current one.
    remote = ("--server", qrm_server.url)
    changed = qrm_cli(
        *remote, "-u", "bob", "-p", "bob-pass-1", "user", "passwd", "bob", "--password", "bob-pass-2"
    )
    assert changed.exit_code == 0, changed.stderr
    with_token = qrm_cli(*remote, "--token", token, "user", "passwd", "ann", "--password", "ann-pass-4")
    assert with_token.exit_code != 0 and "--current-password" in with_token.stderr
    given = qrm_cli(
        *remote,
        "--token",
        token,
        "user",
        "passwd",
        "ann",
        "--password",
        "ann-pass-4",
        "--current-password",
        "ann-pass-3",
    )
    assert given.exit_code == 0, given.stderr
    with service_context(qrm_server.settings) as ctx:
        assert users.authenticate(ctx, "ann", "ann-pass-4").name == "ann"
        assert users.authenticate(ctx, "bob", "bob-pass-2").name == "bob"
        messages = [e.message for e in ctx.session.exec(select(Event))]
    # A wrong current password counts as a failed login (throttled and audited).
    assert "password change login of 'ann' failed from 127.0.0.1" in messages
    assert not any("guess-1234" in m or "ann-pass" in m for m in messages)


@pytest.mark.qrm_backends("sqlite")
def test_the_console_asks_for_the_current_password(qrm_server) -> None:
    with qrm_server.client() as admin:
        admin.post("/api/v1/users", json={"name": "ann", "password": "ann-pass-1", "role": "viewer"})
    with httpx.Client(base_url=qrm_server.url, headers={"accept": "text/html"}, timeout=30) as browser:
        form = browser.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        browser.post("/login", data={"user": "ann", "password": "ann-pass-1", "csrf_token": token})
        page = browser.get("/account")
        assert 'name="current"' in page.text
        csrf = re.search(r'action="/users/ann/password".*?name="csrf_token" value="([^"]+)"', page.text, re.S)
        assert csrf, page.text[:2000]
        data = {"csrf_token": csrf.group(1), "password": "ann-pass-2", "confirm": "ann-pass-2"}
        missing = browser.post("/users/ann/password", data=data)
        assert missing.status_code == 422
        wrong = browser.post("/users/ann/password", data={**data, "current": "not-it-123"})
        assert wrong.status_code == 422 and "the current password is wrong" in wrong.text
        ok = browser.post("/users/ann/password", data={**data, "current": "ann-pass-1"})
        assert ok.status_code in (302, 303), ok.text[:500]
    with service_context(qrm_server.settings) as ctx:
        assert users.authenticate(ctx, "ann", "ann-pass-2").name == "ann"


def test_the_default_admin_alone_gets_the_default_password(qrm_ctx) -> None:
    _admin, created = users.ensure_admin(qrm_ctx, None)
    assert created and users.default_password_unchanged(qrm_ctx)
    with pytest.raises(InvalidInput):
        users.ensure_admin(qrm_ctx, "qrm")
    with pytest.raises(Forbidden, match="current password"):
        users.set_password(qrm_ctx, name="qrm", password="admin-pass-1", by="qrm")
    assert qrm_ctx.session.exec(select(User)).one().name == "qrm"
