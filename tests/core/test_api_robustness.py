"""Bad references and out-of-range integers are refused at the boundary (API and
CLI) in one line, never a 500; a driver's side effect is undone when the
transaction recording it fails."""

import pytest

from qrm_core.drivers.fake import FakeStorage
from qrm_core.errors import Conflict
from qrm_core.services import service_context, storage

#: Python calls these digits; none of them is a resource id.
NOT_ASCII_DIGITS = ["%C2%B2", "%D9%A3", "%EF%BC%91"]  # '²', Arabic-Indic 3, full-width 1


def _fake_volumes(settings, plugins, name="s1"):
    with service_context(settings, plugins=plugins) as ctx:
        row = storage.get_storage_row(ctx, name)
        return [vol.location for vol in FakeStorage(settings).list_volumes(storage.target(row))]


@pytest.mark.qrm_backends("sqlite")
def test_non_ascii_digits_and_huge_numbers_are_no_resource(qrm_server) -> None:
    with qrm_server.client() as admin:
        created = admin.post("/api/v1/resources", json={"mac": "52:54:00:00:00:03"})
        assert created.status_code == 201
        for ref in [*NOT_ASCII_DIGITS, "99999999999999999999999", "0"]:
            for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/reboot"), ("POST", "/halt")):
                r = admin.request(method, f"/api/v1/resources/{ref}{suffix}")
                assert r.status_code in (404, 422), (method, ref, suffix, r.status_code, r.text)
                assert r.json()["error"]["code"] in ("not_found", "invalid_input")
        # Nothing changed: the one resource is still there.
        assert admin.get("/api/v1/resources").json()["total"] == 1


@pytest.mark.qrm_backends("sqlite")
def test_cli_refuses_non_ascii_digits_in_one_line(qrm_cli) -> None:
    assert qrm_cli("init").exit_code == 0
    assert qrm_cli("resource", "add", "-m", "52:54:00:00:00:02").exit_code == 0
    for ref in ("²", "٢", "２", "99999999999999999999999"):
        result = qrm_cli("resource", "show", ref)
        assert result.exit_code != 0 and result.exit_code != 70, (ref, result)
        assert "internal error" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.qrm_backends("sqlite")
def test_integer_beyond_the_database_is_422_and_creates_no_volume(qrm_server) -> None:
    with qrm_server.client() as admin:
        assert (
            admin.post(
                "/api/v1/storage", json={"name": "s1", "type": "fake", "address": "10.0.0.1"}
            ).status_code
            == 201
        )
        for size in (2**63, 2**31, 2**64 + 1, 0, -1):
            r = admin.post(
                "/api/v1/filesystem-images", json={"name": "big", "storage": "s1", "size_mb": size}
            )
            assert r.status_code == 422, (size, r.text)
            assert r.json()["error"]["code"] == "invalid_input"
        assert admin.get("/api/v1/filesystem-images").json() == []
    assert _fake_volumes(qrm_server.settings, qrm_server.plugins) == []


@pytest.mark.qrm_backends("sqlite")
def test_cli_refuses_an_integer_beyond_the_database(qrm_cli, qrm_settings, qrm_plugins) -> None:
    assert qrm_cli("init").exit_code == 0
    assert qrm_cli("storage", "add", "-n", "s1", "-t", "fake", "-i", "10.0.0.1").exit_code == 0
    result = qrm_cli("filesystem-image", "add", "-n", "big", "-s", "s1", "--size", str(2**63))
    assert result.exit_code not in (0, 70), result
    assert "internal error" not in result.stderr and "at most" in result.stderr
    assert _fake_volumes(qrm_settings, qrm_plugins) == []


def test_a_volume_whose_record_fails_is_removed_again(
    qrm_ctx, qrm_settings, qrm_plugins, monkeypatch
) -> None:
    """Another server records an image of the same name while the driver makes
    the volume: the commit fails, and the volume is removed, not orphaned."""
    storage.add_storage(qrm_ctx, name="s1", type="fake", address="10.0.0.1")
    create = FakeStorage.create_volume

    def create_then_lose_the_race(self, target, name, size_mb):
        volume = create(self, target, name, size_mb)
        with service_context(qrm_settings, plugins=qrm_plugins) as other:
            storage.add_filesystem_image(other, name=name, storage="s1", location="/imported/elsewhere")
        return volume

    monkeypatch.setattr(FakeStorage, "create_volume", create_then_lose_the_race)
    with pytest.raises(Conflict):
        storage.add_filesystem_image(qrm_ctx, name="img", storage="s1", size_mb=10)
    assert _fake_volumes(qrm_settings, qrm_plugins) == []
    monkeypatch.setattr(FakeStorage, "create_volume", create)
    shown = storage.show_filesystem_image(qrm_ctx, "img")
    assert shown.location == "/imported/elsewhere"


@pytest.mark.qrm_backends("sqlite")
def test_every_integer_in_the_api_has_a_range(qrm_server) -> None:
    """The class of bug, not the instance: no integer the API takes is
    unbounded (the database holds 32 bits)."""
    document = qrm_server.client(user=None).get("/openapi.json").json()
    unbounded: list[str] = []

    def walk(node, where):
        if isinstance(node, dict):
            if node.get("type") == "integer" and ("minimum" not in node or "maximum" not in node):
                unbounded.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            walk(operation.get("parameters", []), f"{method.upper()} {path} parameters")
            walk(operation.get("requestBody", {}), f"{method.upper()} {path} body")
    request_schemas = {
        ref.rsplit("/", 1)[-1]
        for operations in document["paths"].values()
        for operation in operations.values()
        for ref in _refs(operation.get("requestBody", {}))
    }
    for name in request_schemas:
        walk(document["components"]["schemas"][name], f"schema {name}")
    assert unbounded == []


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


@pytest.mark.qrm_backends("sqlite")
def test_the_openapi_document_says_how_to_authenticate_and_what_fails(qrm_server) -> None:
    with qrm_server.client(user=None) as anonymous:
        document = anonymous.get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["basicAuth"] == {
        "type": "http",
        "scheme": "basic",
        "description": "a qrm user's name and password",
    }
    assert {"apiToken", "enrollmentToken", "machineToken"} <= set(schemes)
    paths = document["paths"]
    add = paths["/api/v1/storage"]["post"]
    assert add["security"] == [{"basicAuth": ["operator"]}, {"apiToken": ["operator"]}]
    assert {"400", "401", "403", "409", "422", "429"} <= set(add["responses"])
    assert add["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    show = paths["/api/v1/resources/{ref}"]["get"]
    assert {"401", "404", "422"} <= set(show["responses"]) and "403" not in show["responses"]
    assert paths["/agent/v1/register"]["post"]["security"] == [{"enrollmentToken": []}]
    assert "security" not in paths["/api/v1/health"]["get"]
    assert "HTTPValidationError" not in document["components"]["schemas"]
    # Rules only the services check are in the schema too.
    create = document["components"]["schemas"]["StorageCreate"]["properties"]
    assert create["type"]["enum"] == ["fake"] or "fake" in create["type"]["enum"]
    assert create["name"]["maxLength"] == 64 and "pattern" in create["name"]


@pytest.mark.qrm_backends("sqlite")
def test_a_method_a_path_lacks_is_405_with_allow(qrm_server) -> None:
    with qrm_server.client() as admin:
        r = admin.put("/api/v1/storage")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        assert r.headers["allow"] == "GET, POST"
        r = admin.request("TRACE", "/api/v1/storage/s1")
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, PATCH"


@pytest.mark.qrm_backends("sqlite")
def test_state_not_input_is_409_and_a_request_the_schema_allows_is_not_422(qrm_server) -> None:
    with qrm_server.client() as admin:
        last = admin.delete("/api/v1/users/qrm")
        assert last.status_code == 409 and "last admin" in last.json()["error"]["message"]
        listed = admin.get("/api/v1/auth/tokens", params={"user": "qrm", "all": "true"})
        assert listed.status_code == 200
        # JSON types as the document says: 0 is not false, "1" is not 1.
        r = admin.post(
            "/api/v1/storage", json={"name": "s1", "type": "fake", "address": "10.0.0.1", "check": 0}
        )
        assert r.status_code == 422
        r = admin.post("/api/v1/resources", json={"mac": "52:54:00:00:00:09", "cpus": "1"})
        assert r.status_code == 422
        assert (
            admin.post("/api/v1/resources", json={"mac": "52:54:00:00:00:09", "cpus": 1.0}).status_code == 201
        )


def test_a_name_with_a_trailing_newline_is_refused() -> None:
    from qrm_core.errors import InvalidInput
    from qrm_core.services import validation as v

    for check, value in ((v.name, "web\n"), (v.hostname, "node1\n"), (v.kernel_version, "6.1\n")):
        with pytest.raises(InvalidInput):
            check(value)


@pytest.mark.qrm_backends("sqlite")
def test_a_plugins_routes_answer_in_json_like_the_apis(qrm_settings, qrm_plugins) -> None:
    """Wherever a plugin mounts its routes, the document describes them (one
    operationId per operation) and their errors are JSON, a missing method a
    405 with ``Allow``: never the console's HTML page, even for a browser."""
    from fastapi import APIRouter, HTTPException
    from fastapi.testclient import TestClient

    from qrm_core.api.app import create_app
    from qrm_core.plugin_api import hookimpl

    router = APIRouter(prefix="/plugins/probe/files")

    @router.api_route("/{name}", methods=["GET", "HEAD"], responses={403: {"description": "not yours"}})
    def probe(name: str) -> dict[str, str]:
        raise HTTPException(status_code=403 if name == "theirs" else 404, detail=f"no {name}")

    class Probe:
        @hookimpl
        def qrm_register_routers(self, app) -> None:
            app.include_router(router)

    assert qrm_plugins.register(Probe(), "probe")
    app = create_app(qrm_settings, qrm_plugins)
    operations = app.openapi()["paths"]["/plugins/probe/files/{name}"]
    assert sorted(operations) == ["get", "head"]
    assert operations["get"]["operationId"] != operations["head"]["operationId"]
    assert operations["get"]["responses"]["403"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    client = TestClient(app)
    for headers in ({}, {"Accept": "text/html"}):
        r = client.post("/plugins/probe/files/x", headers=headers)
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
        assert r.json()["error"]["code"] == "method_not_allowed"
        r = client.get("/plugins/probe/files/theirs", headers=headers)
        assert r.status_code == 403 and r.json()["error"]["message"] == "no theirs"
    # The console's own pages still answer a browser in HTML.
    r = client.get("/no-such-page", headers={"Accept": "text/html"})
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
