"""API tokens: the rules in the services, the REST API through real HTTP, and
``qrm token`` locally and through a server (SQLite, PostgreSQL and MariaDB)."""

import hashlib

import pytest
from sqlmodel import select

from qrm_core.errors import AlreadyExists, AuthError, Forbidden, InvalidInput, NotFound
from qrm_core.models import ApiToken, Event
from qrm_core.services import service_context, tokens, users

PUBLIC_FIELDS = {"id", "name", "user", "created_at", "last_used"}


def _events(settings, plugins) -> list[tuple[str, str, str]]:
    with service_context(settings, plugins=plugins) as ctx:
        return [
            (e.actor, e.object_name, e.message) for e in ctx.session.exec(select(Event).order_by(Event.id))
        ]


def _token_rows(settings, plugins) -> list[ApiToken]:
    with service_context(settings, plugins=plugins) as ctx:
        return list(ctx.session.exec(select(ApiToken).order_by(ApiToken.id)))


def _as(settings, plugins, actor):
    return service_context(settings, actor=actor, plugins=plugins)


def _add_user(settings, plugins, name, role, password="pw-" + "x" * 8) -> str:
    with service_context(settings, plugins=plugins) as ctx:
        users.create_user(ctx, name=name, password=password, role=role)
    return password


# ---------------------------------------------------------------------------
# Services
# ---------------------------------------------------------------------------


def test_a_token_is_shown_once_and_only_its_hash_is_stored(qrm_settings, qrm_plugins) -> None:
    _add_user(qrm_settings, qrm_plugins, "alice", "viewer")
    with _as(qrm_settings, qrm_plugins, "alice") as ctx:
        created = tokens.create_token(ctx, name="laptop")
    assert created.user == "alice" and created.name == "laptop" and created.last_used is None
    assert created.token.startswith("qrm_") and len(created.token) > 40
    rows = _token_rows(qrm_settings, qrm_plugins)
    assert [r.token_hash for r in rows] == [hashlib.sha256(created.token.encode()).hexdigest()]
    assert created.token not in repr(rows)
    with _as(qrm_settings, qrm_plugins, "alice") as ctx:
        listed = tokens.list_tokens(ctx)
    assert [t.model_dump() for t in listed] == [created.model_dump(exclude={"token"})]
    assert set(listed[0].model_dump()) == PUBLIC_FIELDS
    assert _events(qrm_settings, qrm_plugins)[-1] == (
        "alice",
        "alice",
        f"API token laptop (id {created.id}) created for alice",
    )


def test_a_token_authenticates_its_owner_until_revoked(qrm_settings, qrm_plugins) -> None:
    _add_user(qrm_settings, qrm_plugins, "alice", "operator")
    with _as(qrm_settings, qrm_plugins, "alice") as ctx:
        created = tokens.create_token(ctx, name="ci")
    with _as(qrm_settings, qrm_plugins, "auth") as ctx:
        user = tokens.authenticate(ctx, created.token)
    assert (user.name, user.role) == ("alice", "operator")
    with _as(qrm_settings, qrm_plugins, "alice") as ctx:
        assert tokens.list_tokens(ctx)[0].last_used is not None
        revoked = tokens.revoke_token(ctx, created.id)
    assert revoked.id == created.id and revoked.user == "alice"
    with _as(qrm_settings, qrm_plugins, "auth") as ctx:
        with pytest.raises(AuthError, match="unknown or revoked API token"):
            tokens.authenticate(ctx, created.token)
        with pytest.raises(AuthError):
            tokens.authenticate(ctx, "qrm_" + "x" * 43)
    assert _events(qrm_settings, qrm_plugins)[-1] == (
        "alice",
        "alice",
        f"API token ci (id {created.id}) of alice revoked",
    )


def test_names_are_unique_per_user_and_validated(qrm_settings, qrm_plugins) -> None:
    _add_user(qrm_settings, qrm_plugins, "alice", "viewer")
    _add_user(qrm_settings, qrm_plugins, "bob", "viewer")
    with _as(qrm_settings, qrm_plugins, "alice") as ctx:
        first = tokens.create_token(ctx, name="ci")
    with _as(qrm_settings, qrm_plugins, "bob") as ctx:
        tokens.create_token(ctx, name="ci")  # another user's namesake is fine
    before = _events(qrm_settings, qrm_plugins)
    with _as(qrm_settings, qrm_plugins, "alice") as ctx:
        with pytest.raises(
            AlreadyExists, match=rf"alice already has an API token named 'ci' \(id {first.id}\)"
        ):
            tokens.create_token(ctx, name="ci")
        for bad in ("", "two words", "x" * 65, "123", "-x", "a;b"):
            with pytest.raises(InvalidInput, match="invalid token name"):
                tokens.create_token(ctx, name=bad)
    assert _events(qrm_settings, qrm_plugins) == before
    assert len(_token_rows(qrm_settings, qrm_plugins)) == 2


def test_users_manage_their_own_tokens_and_admins_everyone_s(qrm_settings, qrm_plugins) -> None:
    _add_user(qrm_settings, qrm_plugins, "alice", "viewer")
    _add_user(qrm_settings, qrm_plugins, "bob", "operator")
    _add_user(qrm_settings, qrm_plugins, "root", "admin")
    with _as(qrm_settings, qrm_plugins, "alice") as ctx:
        alices = tokens.create_token(ctx, name="a1")
    with _as(qrm_settings, qrm_plugins, "bob") as ctx:
        bobs = tokens.create_token(ctx, name="b1")
    before = _events(qrm_settings, qrm_plugins)
    with _as(qrm_settings, qrm_plugins, "alice") as ctx:
        assert [t.name for t in tokens.list_tokens(ctx)] == ["a1"]
        assert [t.name for t in tokens.list_tokens(ctx, user="alice")] == ["a1"]
        with pytest.raises(Forbidden, match="only an admin may manage another user's API tokens"):
            tokens.list_tokens(ctx, user="bob")
        with pytest.raises(Forbidden, match="only an admin may list every user's"):
            tokens.list_tokens(ctx, all_users=True)
        with pytest.raises(Forbidden):
            tokens.create_token(ctx, name="sneaky", user="bob")
        with pytest.raises(Forbidden, match=f"API token {bobs.id} belongs to another user"):
            tokens.revoke_token(ctx, bobs.id)
        for missing in (bobs.id + 100, 0, -1, 2**40):
            with pytest.raises(NotFound, match=f"API token {missing} does not exist"):
                tokens.revoke_token(ctx, missing)
    assert _events(qrm_settings, qrm_plugins) == before
    with _as(qrm_settings, qrm_plugins, "root") as ctx:
        assert [(t.user, t.name) for t in tokens.list_tokens(ctx, all_users=True, admin=True)] == [
            ("alice", "a1"),
            ("bob", "b1"),
        ]
        assert [t.name for t in tokens.list_tokens(ctx, user="bob", admin=True)] == ["b1"]
        with pytest.raises(NotFound, match="user 'nobody' does not exist"):
            tokens.list_tokens(ctx, user="nobody", admin=True)
        assert [t.name for t in tokens.list_tokens(ctx, user="bob", all_users=True, admin=True)] == ["b1"]
        for_bob = tokens.create_token(ctx, name="deploy", user="bob", admin=True)
        assert for_bob.user == "bob"
        assert tokens.revoke_token(ctx, alices.id, admin=True).user == "alice"
    assert _events(qrm_settings, qrm_plugins)[-2:] == [
        ("root", "bob", f"API token deploy (id {for_bob.id}) created for bob"),
        ("root", "alice", f"API token a1 (id {alices.id}) of alice revoked"),
    ]
    with _as(qrm_settings, qrm_plugins, "root") as ctx:
        assert [t.name for t in tokens.list_tokens(ctx, all_users=True, admin=True)] == ["b1", "deploy"]


def test_an_actor_who_is_no_user_is_told_so(qrm_ctx) -> None:
    """Locally the actor is the operating-system user, who need not be a qrm user."""
    with pytest.raises(NotFound, match="'tester' is not a qrm user"):
        tokens.list_tokens(qrm_ctx, admin=True)
    with pytest.raises(NotFound, match="'tester' is not a qrm user"):
        tokens.create_token(qrm_ctx, name="x", admin=True)


def test_removing_a_user_removes_their_tokens(qrm_settings, qrm_plugins) -> None:
    _add_user(qrm_settings, qrm_plugins, "alice", "viewer")
    with _as(qrm_settings, qrm_plugins, "alice") as ctx:
        created = tokens.create_token(ctx, name="ci")
    with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
        users.remove_user(ctx, "alice")
        assert tokens.list_tokens(ctx, all_users=True, admin=True) == []
        with pytest.raises(AuthError):
            tokens.authenticate(ctx, created.token)
    assert _token_rows(qrm_settings, qrm_plugins) == []


# ---------------------------------------------------------------------------
# REST API
# ---------------------------------------------------------------------------


def test_api_tokens_list_and_revoke_by_role(qrm_server) -> None:
    pw = _add_user(qrm_server.settings, qrm_server.plugins, "viewer1", "viewer")
    with qrm_server.client("viewer1", pw) as viewer, qrm_server.client() as admin:
        mine = viewer.post("/api/v1/auth/tokens", json={"name": "laptop"})
        assert mine.status_code == 201, mine.text
        assert set(mine.json()) == PUBLIC_FIELDS | {"token"} and mine.json()["user"] == "viewer1"
        admins = admin.post("/api/v1/auth/tokens", json={"name": "ci"}).json()

        listed = viewer.get("/api/v1/auth/tokens")
        assert listed.status_code == 200
        assert [(t["name"], t["user"]) for t in listed.json()] == [("laptop", "viewer1")]
        assert all(set(t) == PUBLIC_FIELDS for t in listed.json())
        everyone = admin.get("/api/v1/auth/tokens", params={"all": "true"}).json()
        assert [(t["user"], t["name"]) for t in everyone] == [("qrm", "ci"), ("viewer1", "laptop")]
        assert [t["name"] for t in admin.get("/api/v1/auth/tokens", params={"user": "viewer1"}).json()] == [
            "laptop"
        ]
        for params in ({"all": "true"}, {"user": "qrm"}):
            r = viewer.get("/api/v1/auth/tokens", params=params)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = viewer.post("/api/v1/auth/tokens", json={"name": "x", "user": "qrm"})
        assert r.status_code == 403
        r = viewer.post("/api/v1/auth/tokens", json={"name": "laptop"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "already_exists"
        r = viewer.post("/api/v1/auth/tokens", json={"name": "bad name"})
        assert r.status_code == 422 and "invalid token name" in r.json()["error"]["message"]

        # A viewer cannot revoke another user's token; it keeps working.
        r = viewer.delete(f"/api/v1/auth/tokens/{admins['id']}")
        assert r.status_code == 403 and "belongs to another user" in r.json()["error"]["message"]
        with qrm_server.client(token=admins["token"]) as bearer:
            assert bearer.get("/api/v1/auth/whoami").json()["via"] == "token"
        assert viewer.delete("/api/v1/auth/tokens/999999").status_code == 404
        assert viewer.delete("/api/v1/auth/tokens/0").status_code == 422

        # An admin can revoke anyone's, and a revoked token no longer authenticates.
        with qrm_server.client(token=mine.json()["token"]) as bearer:
            assert bearer.get("/api/v1/auth/whoami").json() == {
                "name": "viewer1",
                "role": "viewer",
                "via": "token",
            }
            used = [t for t in viewer.get("/api/v1/auth/tokens").json() if t["name"] == "laptop"]
            assert used[0]["last_used"] is not None
            revoked = admin.delete(f"/api/v1/auth/tokens/{mine.json()['id']}")
            assert revoked.status_code == 200
            assert revoked.json()["name"] == "laptop" and revoked.json()["user"] == "viewer1"
            r = bearer.get("/api/v1/auth/whoami")
            assert r.status_code == 401 and r.json()["error"]["message"] == "unknown or revoked API token"
        assert viewer.get("/api/v1/auth/tokens").json() == []
        events = admin.get("/api/v1/events", params={"limit": 3}).json()
    assert (events[-1]["actor"], events[-1]["object_name"]) == ("qrm", "viewer1")
    assert "revoked" in events[-1]["message"]


# ---------------------------------------------------------------------------
# Command line, locally and through a server
# ---------------------------------------------------------------------------


def test_cli_tokens_locally(qrm_cli) -> None:
    assert qrm_cli("init").exit_code == 0
    created = qrm_cli("token", "create", "-n", "ci", "--user", "qrm")
    assert created.exit_code == 0, created.stderr
    first, secret = created.stdout.splitlines()
    assert first.startswith("created API token ci (id ") and first.endswith("for qrm; it is shown only now:")
    assert secret.startswith("qrm_")
    as_json = qrm_cli("token", "create", "-n", "deploy", "--user", "qrm", "-o", "json").json()
    assert set(as_json) == PUBLIC_FIELDS | {"token"} and as_json["token"].startswith("qrm_")
    listed = qrm_cli("token", "list", "--user", "qrm", "-o", "json").json()
    assert [t["name"] for t in listed] == ["ci", "deploy"] and all(set(t) == PUBLIC_FIELDS for t in listed)
    assert qrm_cli("token", "list", "--all", "-o", "json").json() == listed
    table = qrm_cli("token", "list", "--all")
    assert "deploy" in table.stdout and "LAST USED" in table.stdout and "qrm_" not in table.stdout
    revoked = qrm_cli("token", "revoke", str(as_json["id"]))
    assert revoked.exit_code == 0 and revoked.stdout.strip() == (
        f"revoked API token deploy (id {as_json['id']}) of qrm"
    )
    assert [t["name"] for t in qrm_cli("token", "list", "--all", "-o", "json").json()] == ["ci"]
    events = qrm_cli("events", "--limit", "1", "-o", "json").json()
    assert events[0]["actor"] == "tester" and events[0]["object_name"] == "qrm"


# SQLite only: messages; uniqueness per database: test_names_are_unique_per_user_and_validated
@pytest.mark.qrm_backends("sqlite")
@pytest.mark.parametrize(
    "args, message",
    [
        (["token", "list"], "'tester' is not a qrm user; say whose API tokens are meant (--user)"),
        (["token", "create", "-n", "ci"], "'tester' is not a qrm user"),
        (["token", "create", "-n", "ci", "--user", "qrm"], "qrm already has an API token named 'ci'"),
        (["token", "create", "-n", "two words", "--user", "qrm"], "invalid token name 'two words'"),
        (["token", "create", "-n", "x", "--user", "nobody"], "user 'nobody' does not exist"),
        (["token", "list", "--all", "--user", "qrm"], "not both"),
        (["token", "revoke", "abc"], "invalid API token id 'abc'"),
        (["token", "revoke", "0"], "invalid API token id '0'"),
        (["token", "revoke", "99999"], "API token 99999 does not exist"),
    ],
)
def test_cli_token_mistakes_are_one_line_and_change_nothing(qrm_cli, args, message) -> None:
    assert qrm_cli("init").exit_code == 0
    assert qrm_cli("token", "create", "-n", "ci", "--user", "qrm").exit_code == 0
    before_tokens = qrm_cli("token", "list", "--all", "-o", "json").json()
    before = qrm_cli("events", "--limit", "100", "-o", "json").json()
    result = qrm_cli(*args)
    assert result.exit_code == 1, result.stdout
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert qrm_cli("events", "--limit", "100", "-o", "json").json() == before
    assert qrm_cli("token", "list", "--all", "-o", "json").json() == before_tokens


def test_cli_tokens_through_a_server(qrm_server, qrm_cli) -> None:
    remote = ["--server", qrm_server.url, "-u", "qrm", "-p", "qrm"]
    created = qrm_cli(*remote, "token", "create", "-n", "ci", "-o", "json")
    assert created.exit_code == 0, created.stderr
    token = created.json()
    assert token["user"] == "qrm" and token["token"].startswith("qrm_")
    table = qrm_cli(*remote, "token", "create", "-n", "laptop")
    assert table.exit_code == 0 and table.stdout.splitlines()[1].startswith("qrm_")
    for command in (["token", "list", "--all"], ["token", "list", "--user", "qrm"]):
        local = qrm_cli(*command, "-o", "json")
        over_api = qrm_cli(*remote, *command, "-o", "json")
        assert local.exit_code == over_api.exit_code == 0
        assert local.json() == over_api.json() and len(local.json()) == 2
    assert qrm_cli(*remote, "token", "list", "-o", "json").json() == over_api.json()

    # The token itself works as the CLI's credentials, until it is revoked.
    with_token = ["--server", qrm_server.url, "--token", token["token"]]
    assert [t["name"] for t in qrm_cli(*with_token, "token", "list", "-o", "json").json()] == ["ci", "laptop"]
    revoked = qrm_cli(*remote, "token", "revoke", str(token["id"]), "-o", "json")
    assert revoked.exit_code == 0 and revoked.json()["name"] == "ci"
    denied = qrm_cli(*with_token, "token", "list")
    assert denied.exit_code == 1 and denied.stderr == "error: unknown or revoked API token\n"

    # A viewer is refused another user's token and every user's list, in one line.
    pw = _add_user(qrm_server.settings, qrm_server.plugins, "viewer1", "viewer")
    viewer = ["--server", qrm_server.url, "-u", "viewer1", "-p", pw]
    laptop = qrm_cli("token", "list", "--user", "qrm", "-o", "json").json()[0]
    for args, message in (
        (["token", "revoke", str(laptop["id"])], f"API token {laptop['id']} belongs to another user"),
        (["token", "list", "--all"], "only an admin may list every user's API tokens"),
        (["token", "create", "-n", "x", "--user", "qrm"], "only an admin may manage another user's"),
        (["token", "revoke", "abc"], "invalid API token id 'abc'"),
        (["token", "revoke", "99999"], "API token 99999 does not exist"),
    ):
        result = qrm_cli(*viewer, *args)
        assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
    assert qrm_cli(*viewer, "token", "list", "-o", "json").json() == []
    assert [t["name"] for t in qrm_cli("token", "list", "--all", "-o", "json").json()] == ["laptop"]
