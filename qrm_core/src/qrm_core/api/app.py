"""The FastAPI application of ``qrm server``: REST API, agent endpoints, metrics."""

from __future__ import annotations

import hmac
import logging
import re
import threading
import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from sqlmodel import Session, func, select
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qrm_core import __version__, console
from qrm_core.api import agent_routes, routes
from qrm_core.api import openapi as openapi_document
from qrm_core.api.deps import require
from qrm_core.api.limits import BodyLimit
from qrm_core.db import get_engine
from qrm_core.errors import QrmError
from qrm_core.models import Resource, ResourceState, Role, VEState, VirtualEnvironment

if TYPE_CHECKING:
    from qrm_core.config import Settings
    from qrm_core.engine.runner import EngineRunner
    from qrm_core.plugins import PluginSystem
    from qrm_core.services import ServiceContext

log = logging.getLogger("qrm.api")


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return {"error": body}


class EnrollmentCache:
    """The site's enrollment token, re-read from the database every few seconds
    (so a rotation on one server reaches the others) instead of per request."""

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self._value: str | None = None
        self._read_at = 0.0
        self._lock = threading.Lock()

    def peek(self, token: str) -> bool | None:
        """Whether ``token`` is the enrollment token, from the cache alone: None
        when the cached value is stale (the caller checks with :meth:`check`)."""
        with self._lock:
            if self._value is None or time.monotonic() - self._read_at > self.ttl:
                return None
            value = self._value
        return hmac.compare_digest(value.encode(), token.encode())

    def check(self, ctx: ServiceContext, token: str) -> bool:
        from qrm_core.services import site

        with self._lock:
            if self._value is None or time.monotonic() - self._read_at > self.ttl:
                self._value = site.get_enrollment_token(ctx)
                self._read_at = time.monotonic()
            value = self._value
        return hmac.compare_digest(value.encode(), token.encode())


class AccessLog:
    """One log line per API request (method, path, status, milliseconds);
    node-agent requests are not logged (thousands of machines heartbeat).

    A plain ASGI middleware: Starlette's ``@app.middleware("http")`` runs every
    request, agent requests included, through extra tasks and streams, which
    cost about 0.5 ms of CPU per request (measured in bench/server).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/agent/"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, send_status)
        log.info(
            "%s %s %s %.1fms", scope["method"], scope["path"], status, (time.perf_counter() - started) * 1000
        )


class Metrics:
    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.agent_requests = Counter(
            "qrm_agent_requests", "Node-agent requests", ["endpoint", "outcome"], registry=self.registry
        )
        self.reconcile_seconds = Histogram(
            "qrm_reconcile_duration_seconds",
            "Duration of reconcile steps",
            ["step"],
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.leader = Gauge(
            "qrm_engine_leader", "1 if this server runs the reconciler", registry=self.registry
        )
        self.registry.register(_StateCollector(settings))


class _StateCollector:
    """Resources and VEs by state, counted at scrape time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Any:
        resources = GaugeMetricFamily("qrm_resources", "Resources by state", labels=["state"])
        ves = GaugeMetricFamily("qrm_ves", "Virtual environments by state", labels=["state"])
        try:
            with Session(get_engine(self.settings)) as session:
                by_state = dict(
                    session.exec(select(Resource.state, func.count()).group_by(Resource.state)).all()
                )
                ve_state = dict(
                    session.exec(
                        select(VirtualEnvironment.state, func.count()).group_by(VirtualEnvironment.state)
                    ).all()
                )
        except Exception:
            log.exception("metrics: cannot count states")
            return
        for name in ResourceState.values():
            resources.add_metric([name], by_state.get(name, 0))
        for name in VEState.values():
            ves.add_metric([name], ve_state.get(name, 0))
        yield resources
        yield ves


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _documented_methods(app: FastAPI, path: str) -> list[str] | None:
    """The methods the OpenAPI document gives the most specific template
    matching ``path`` (``/filesystem-images/capture`` rather than
    ``/filesystem-images/{name}``), or None when no template matches: the path
    is not one of the API's, the agents' or a plugin's (but the console's)."""
    templates = getattr(app.state, "documented_paths", None)
    if templates is None:
        templates = []
        for template, operations in app.openapi()["paths"].items():
            pattern = re.compile("^" + re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(template)) + "$")
            literal = len([part for part in template.split("/") if part and not part.startswith("{")])
            methods = sorted(m.upper() for m in operations if m.upper() in _METHODS)
            templates.append((pattern, literal, methods))
        app.state.documented_paths = templates
    best: tuple[int, list[str]] | None = None
    for pattern, literal, methods in templates:
        if pattern.match(path) and (best is None or literal > best[0]):
            best = (literal, methods)
    return None if best is None else best[1]


def _allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """The methods of this path (a 405 names them in ``Allow``, RFC 9110).

    For a path the OpenAPI document describes (the API's, the agents', a
    plugin's), those it gives the path; routes of one path are separate, and
    Starlette would name only the first one's. Elsewhere, the methods some
    route at this path answers."""
    documented = _documented_methods(app, scope["path"])
    if documented is not None:
        return documented
    allowed: set[str] = set()
    for method in _METHODS:
        for route in app.router.routes:
            match, _ = route.matches({**scope, "method": method})
            if match == Match.FULL:
                allowed.add(method)
                break
    return sorted(allowed)


def create_app(
    settings: Settings,
    plugins: PluginSystem,
    *,
    engine: EngineRunner | None = None,
    server_url: str | None = None,
) -> FastAPI:
    app = FastAPI(
        title="qrm",
        version=__version__,
        description="qrm REST API: storage servers, boot and filesystem images, virtual environments, resources.",
        # /docs is served by the console with Swagger UI's files from the wheel (no CDN).
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.plugins = plugins
    app.state.engine = engine
    app.state.server_url = server_url or settings.server_url
    app.state.enrollment = EnrollmentCache()
    app.state.metrics = Metrics(settings)

    def wants_html(request: Request) -> bool:
        """An error for a person in the console; never on a path the OpenAPI
        document describes (a plugin's routes included, wherever it mounts them)."""
        return console.wants_html(request) and _documented_methods(app, request.scope["path"]) is None

    @app.exception_handler(console.NotLoggedIn)
    async def not_logged_in(request: Request, _exc: console.NotLoggedIn) -> Response:
        return console.not_logged_in(request)

    @app.exception_handler(QrmError)
    async def qrm_error(request: Request, exc: QrmError) -> Response:
        if wants_html(request):
            return console.error_page(request, exc.http_status, exc.message)
        headers = {"WWW-Authenticate": 'Basic realm="qrm"'} if exc.http_status == 401 else None
        if exc.http_status == 429 and "retry_after" in exc.details:
            headers = {"Retry-After": str(exc.details["retry_after"])}
        return JSONResponse(
            error_body(exc.code, exc.message, exc.details or None),
            status_code=exc.http_status,
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = (
            f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid request"))
        )
        if wants_html(request):
            return console.error_page(request, 422, message)
        return JSONResponse(error_body("invalid_input", message), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(app, request.scope))
        if wants_html(request):
            shown = "there is no such page" if exc.status_code == 404 else str(exc.detail)
            return console.error_page(request, exc.status_code, shown)
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error")
        if wants_html(request):
            return console.error_page(
                request, 500, f"internal error ({type(exc).__name__}); the server's log has the details"
            )
        return JSONResponse(
            error_body("internal_error", f"internal error: {type(exc).__name__}"), status_code=500
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document.build(app, plugins)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    # Bodies limited per route before they are read (inside the access log, so a 413 is logged).
    app.add_middleware(BodyLimit, settings=settings, fastapi_app=app)
    app.add_middleware(AccessLog)
    # The agent endpoints first: they take most of the requests, and routes are
    # matched in order (the paths of the two routers do not overlap).
    app.include_router(agent_routes.router)
    app.include_router(routes.router)

    viewer = require(Role.VIEWER)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        viewer(request)
        state = app.state
        state.metrics.leader.set(1 if state.engine is not None and state.engine.is_leader else 0)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    for name, exc in plugins.hooks.register_routers(app):
        plugins.mark_broken(name, exc)
    # The console last: its pages are at the top level (/, /resources, ...).
    console.install(app)
    return app
