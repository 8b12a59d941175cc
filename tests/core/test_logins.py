"""Password logins: throttled per user name and per address (HTTP 429 with
Retry-After) on every server sharing the database, failures in the audit log
(who, from where, never the password), and an unknown user name refused in the
time a wrong password takes (SQLite, PostgreSQL, MariaDB)."""

from __future__ import annotations

import re
import statistics
import time
from datetime import timedelta

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import select

from qrm_core.errors import AuthError, TooManyAttempts
from qrm_core.models import Event, LoginFailure, utcnow
from qrm_core.plugins import PluginSystem
from qrm_core.services import service_context, sessions, users
from qrm_core.testing import running_server

PASSWORD = "right-password-1"


def _token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def _events(settings) -> list[Event]:
    with service_context(settings) as ctx:
        return list(ctx.session.exec(select(Event).order_by(Event.id)))


def _add_user(settings, plugins, name: str, role: str = "admin") -> None:
    with service_context(settings, plugins=plugins) as ctx:
        users.create_user(ctx, name=name, password=PASSWORD, role=role)


def test_api_logins_are_throttled_per_user_on_every_server_and_audited(qrm_settings) -> None:
    settings = qrm_settings.model_copy(update={"login_user_failures": 3, "login_address_failures": 1000})
    plugins = PluginSystem(settings, discover_plugins=False).load()
    _add_user(settings, plugins, "ann")
    _add_user(settings, plugins, "bob")
    with running_server(settings, plugins=plugins) as one, running_server(settings, plugins=plugins) as two:
        for server in (one, two, one):
            with server.client("ann", "wrong-guess-1") as guess:
                answer = guess.get("/api/v1/storage")
                assert answer.status_code == 401, answer.text
        # The user name has used up its failures: refused on the other server too,
        # the right password included, with a Retry-After header.
        for server in (two, one):
            with server.client("ann", PASSWORD) as right:
                answer = right.get("/api/v1/storage")
            assert answer.status_code == 429, answer.text
            body = answer.json()["error"]
            assert body["code"] == "too_many_attempts"
            assert "too many failed logins for user 'ann'" in body["message"]
            wait = int(answer.headers["retry-after"])
            assert 0 < wait <= 300 and body["details"]["retry_after"] == wait
        # Another user from the same address is not affected.
        with two.client("bob", PASSWORD) as bob:
            assert bob.get("/api/v1/storage").status_code == 200
        # The remote CLI says so in one line.
        from qrm_core.client import RemoteClient

        remote = RemoteClient(one.url, user="ann", password=PASSWORD)
        with pytest.raises(TooManyAttempts, match="try again in"):
            remote.storage_list()
    failed = [e for e in _events(settings) if "login of" in e.message]
    assert [e.message for e in failed] == ["API login of 'ann' failed from 127.0.0.1"] * 3
    assert all(e.level == "warning" and e.object_name == "ann" for e in failed)
    assert not any("wrong-guess" in e.message or PASSWORD in e.message for e in _events(settings))


def test_a_right_password_forgets_the_user_names_failures_and_the_window_ends(qrm_ctx) -> None:
    qrm_ctx.settings = qrm_ctx.settings.model_copy(
        update={"login_user_failures": 2, "login_address_failures": 1000, "login_window": 120}
    )
    users.create_user(qrm_ctx, name="ann", password=PASSWORD)
    with pytest.raises(AuthError):
        users.authenticate(qrm_ctx, "ann", "wrong-1", address="10.0.0.9")
    assert users.authenticate(qrm_ctx, "ann", PASSWORD, address="10.0.0.9").name == "ann"
    for _ in range(2):  # counted from zero again
        with pytest.raises(AuthError):
            users.authenticate(qrm_ctx, "ANN", "wrong-2", address="10.0.0.9")
    with pytest.raises(TooManyAttempts) as refused:
        users.authenticate(qrm_ctx, "ann", PASSWORD, address="10.0.0.8")
    assert 100 < refused.value.details["retry_after"] <= 120
    # Two minutes later (the counts' clock moved back), the window has ended.
    qrm_ctx.session.connection().execute(
        sa.update(LoginFailure).values(first_at=utcnow() - timedelta(seconds=121))
    )
    qrm_ctx.commit()
    assert users.authenticate(qrm_ctx, "ann", PASSWORD, address="10.0.0.9").name == "ann"


def test_an_address_is_throttled_across_user_names(qrm_ctx) -> None:
    qrm_ctx.settings = qrm_ctx.settings.model_copy(
        update={"login_user_failures": 1000, "login_address_failures": 4}
    )
    users.create_user(qrm_ctx, name="ann", password=PASSWORD)
    for n in range(4):
        with pytest.raises(AuthError):
            users.authenticate(qrm_ctx, f"guess{n}", "x", address="192.0.2.7")
    with pytest.raises(TooManyAttempts, match=r"address 192\.0\.2\.7; try again in"):
        users.authenticate(qrm_ctx, "ann", PASSWORD, address="192.0.2.7")
    assert users.authenticate(qrm_ctx, "ann", PASSWORD, address="192.0.2.8").name == "ann"


@pytest.mark.qrm_backends("sqlite")
def test_console_logins_are_throttled_with_a_429_page(qrm_settings) -> None:
    settings = qrm_settings.model_copy(update={"login_user_failures": 2})
    plugins = PluginSystem(settings, discover_plugins=False).load()
    with running_server(settings, plugins=plugins) as server:
        with httpx.Client(base_url=server.url, headers={"accept": "text/html"}, timeout=30) as browser:
            statuses = []
            for password in ("wrong-1", "wrong-2", "qrm"):
                form = browser.get("/login")
                answer = browser.post(
                    "/login", data={"user": "qrm", "password": password, "csrf_token": _token(form.text)}
                )
                statuses.append(answer.status_code)
            assert statuses == [401, 401, 429]
            assert "too many failed logins for user &#39;qrm&#39;" in answer.text
            assert int(answer.headers["retry-after"]) > 0
    # The API's and the console's failures count together (one rule).
    with service_context(settings, plugins=plugins) as ctx, pytest.raises(TooManyAttempts):
        sessions.login(ctx, name="qrm", password="qrm", client="127.0.0.1")
    failed = [e.message for e in _events(settings) if "login of" in e.message]
    assert failed == ["console login of 'qrm' failed from 127.0.0.1"] * 2


@pytest.mark.qrm_backends("sqlite")
def test_an_unknown_user_costs_what_a_wrong_password_costs(qrm_ctx) -> None:
    qrm_ctx.settings = qrm_ctx.settings.model_copy(
        update={"login_user_failures": 1000, "login_address_failures": 1000}
    )
    users.create_user(qrm_ctx, name="ann", password=PASSWORD)

    def timed(name: str) -> float:
        started = time.perf_counter()
        with pytest.raises(AuthError):
            users.authenticate(qrm_ctx, name, "wrong-password", address="10.0.0.1")
        return time.perf_counter() - started

    timed("nobody")  # the first unknown name makes the comparison hash
    known, unknown = [], []
    for n in range(6):
        known.append(timed("ann"))
        unknown.append(timed(f"nobody{n}"))
    ratio = statistics.median(unknown) / statistics.median(known)
    assert 0.4 < ratio < 2.5, (known, unknown)  # before: 3 ms against 174 ms, a ratio of 0.02
