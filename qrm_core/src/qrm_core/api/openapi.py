"""The OpenAPI document of ``qrm server``, made to say what the server does.

FastAPI describes the success of each operation; this adds what it cannot see:

* how a client authenticates (``securitySchemes``: a user's password or API
  token for ``/api/v1``, the site's enrollment token or a machine's own token
  for ``/agent/v1``), taken from the dependencies each route has;
* the errors each operation answers, all with the same JSON body
  (:class:`ErrorResponse`): 401 and 429 where credentials are checked, 403
  where a role is needed, 404 where a path names an object, 409 for changes,
  413 where a body is read, 422 for invalid input, and what a route declares
  itself with :func:`errors`;
* rules that only the services check, where a client needs them: the storage
  types, hypervisors and power drivers installed on this server (``enum``);
* an ``operationId`` of its own for every operation, also where a route (a
  plugin's, say) answers several methods: FastAPI gives them all the same.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from fastapi import FastAPI

    from qrm_core.plugins import PluginSystem


class ErrorDetail(BaseModel):
    code: str = Field(description="stable error code, e.g. not_found, invalid_input, in_use")
    message: str = Field(description="one line saying what is wrong and, where it helps, what to do")
    details: dict[str, Any] | None = Field(default=None, description="machine-readable particulars")


class ErrorResponse(BaseModel):
    """The body of every error qrm answers."""

    error: ErrorDetail


DESCRIPTIONS = {
    400: "the request body cannot be parsed (not JSON, not a form)",
    401: "no credentials, or wrong ones",
    403: "the user's role may not do this",
    404: "an object named in the request does not exist",
    409: "the request contradicts the current state (exists already, still in use, a concurrent change)",
    413: "the request body is larger than this operation takes",
    422: "invalid input (the message says which field and why)",
    429: "too many failed logins: try again after Retry-After seconds",
    502: "a driver failed on its backend (storage server, hypervisor, power controller)",
    503: "the database or a backend is unavailable",
}

#: The machines' security schemes (a user's, basicAuth and apiToken, come from
#: the dependency api.deps.require, with the role an operation needs as scope).
SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "enrollmentToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "the site's enrollment token, handed to booting machines (qrm site enrollment-token)",
    },
    "machineToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "the token a machine's registration returned (one per resource)",
    },
}
ENROLLMENT_SECURITY: list[dict[str, list[str]]] = [{"enrollmentToken": []}]
MACHINE_SECURITY: list[dict[str, list[str]]] = [{"machineToken": []}]


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the errors it answers besides those added for all."""
    return {code: {"model": ErrorResponse, "description": DESCRIPTIONS[code]} for code in codes}


def _error_response(ref: str, code: int) -> dict[str, Any]:
    return {"description": DESCRIPTIONS[code], "content": {"application/json": {"schema": {"$ref": ref}}}}


#: Request fields naming a driver: the names installed here, as an enum.
_DRIVER_FIELDS = {
    ("StorageCreate", "type"): "storage",
    ("VECreate", "hypervisor"): "hypervisor",
    ("ResourceCreate", "hypervisor"): "hypervisor",
    ("PartitionCreate", "hypervisor"): "hypervisor",
}


def _driver_names(plugins: PluginSystem, kind: str) -> list[str]:
    from qrm_core.plugins.discovery import HYPERVISOR_GROUP, POWER_GROUP, STORAGE_GROUP

    group = {"storage": STORAGE_GROUP, "hypervisor": HYPERVISOR_GROUP, "power": POWER_GROUP}[kind]
    try:
        return plugins.driver_names(group)
    except Exception:  # noqa: BLE001 - a broken plugin leaves the field open
        return []


def _no_null_in_forms(body: dict[str, Any], schemas: dict[str, Any]) -> None:
    """A form has no null: an optional field is one left out, not one that is
    ``null`` (which a client would send as the text 'null')."""
    for media, content in body.get("content", {}).items():
        if not media.startswith(("multipart/", "application/x-www-form-urlencoded")):
            continue
        ref = content.get("schema", {}).get("$ref", "")
        schema = schemas.get(ref.rsplit("/", 1)[-1], content.get("schema", {}))
        for prop in schema.get("properties", {}).values():
            options = prop.get("anyOf")
            if options and {"type": "null"} in options:
                rest = [o for o in options if o != {"type": "null"}]
                del prop["anyOf"]
                if len(rest) == 1:
                    prop.update(rest[0])
                else:
                    prop["anyOf"] = rest


def _unique_operation_ids(paths: dict[str, Any]) -> None:
    """One route with several methods (``api_route(methods=["GET", "HEAD"])``) gets
    one operationId from FastAPI for all of them; the document needs one each."""
    seen: set[str] = set()
    for operations in paths.values():
        for method, operation in operations.items():
            given = operation.get("operationId")
            if not isinstance(given, str):
                continue
            name, count = given, 1
            if name in seen:
                stem, _, last = given.rpartition("_")
                name = f"{stem}_{method}" if stem and last in _HTTP_METHODS else f"{given}_{method}"
                while name in seen:
                    count += 1
                    name = f"{given}_{method}_{count}"
            operation["operationId"] = name
            seen.add(name)


_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def build(app: FastAPI, plugins: PluginSystem | None = None) -> dict[str, Any]:
    with warnings.catch_warnings():
        # FastAPI warns of the shared operationId; _unique_operation_ids gives each its own.
        warnings.filterwarnings("ignore", message="Duplicate Operation ID", category=UserWarning)
        document = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, schema in schemas["ErrorResponse"].pop("$defs", {}).items():
        schemas[name] = schema
    error_ref = "#/components/schemas/ErrorResponse"
    _unique_operation_ids(document["paths"])
    components["securitySchemes"] = {**components.get("securitySchemes", {}), **SECURITY_SCHEMES}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            security = operation.get("security", [])
            roles = {role for requirement in security for scopes in requirement.values() for role in scopes}
            if security:
                responses.setdefault("401", _error_response(error_ref, 401))
            if roles - {"viewer"}:
                responses.setdefault("403", _error_response(error_ref, 403))
            if any("basicAuth" in requirement for requirement in security):
                responses.setdefault("429", _error_response(error_ref, 429))
            if "{" in path:
                responses.setdefault("404", _error_response(error_ref, 404))
            if method in ("post", "patch", "put", "delete") and path.startswith("/api/"):
                responses.setdefault("409", _error_response(error_ref, 409))
            if "requestBody" in operation:
                responses.setdefault("400", _error_response(error_ref, 400))
                responses.setdefault("413", _error_response(error_ref, 413))
                _no_null_in_forms(operation["requestBody"], schemas)
            if operation.get("parameters") or operation.get("requestBody") or "422" in responses:
                responses["422"] = _error_response(error_ref, 422)
            for code, response in responses.items():
                if code[0] in "45" and code != "422":
                    response["content"] = {"application/json": {"schema": {"$ref": error_ref}}}
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    if plugins is not None:
        for (model, field), kind in _DRIVER_FIELDS.items():
            prop = schemas.get(model, {}).get("properties", {}).get(field)
            names = _driver_names(plugins, kind)
            if prop is None or not names:
                continue
            if "anyOf" in prop:  # optional: one of the names, or null
                prop["anyOf"] = [{"type": "string", "enum": names}, {"type": "null"}]
            else:
                prop.pop("type", None)
                prop["enum"] = names
    return document
