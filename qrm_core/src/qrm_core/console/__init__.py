"""The web console ``qrm server`` serves at ``/``: server-rendered pages over
the same services as the CLI and the API, a session login, live updates from
the event stream, and what plugins add (``qrm_console_links``,
``qrm_console_panels``). Everything it needs ships in the qrm-core wheel.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request

from qrm_core.console import auth
from qrm_core.console.auth import NotLoggedIn
from qrm_core.console.live import LiveFeed
from qrm_core.console.render import SmallCache, render

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["NotLoggedIn", "error_page", "install", "not_logged_in", "stop", "wants_html"]

STATIC = Path(__file__).parent / "static"
#: Paths that are never console pages (their errors stay JSON).
NOT_CONSOLE = ("/api/", "/agent/", "/boot/", "/metrics", "/openapi.json")


def install(app: FastAPI) -> None:
    """Add the console, its static files and the offline API docs to ``app``."""
    from qrm_core.console.views import router

    state = app.state
    state.console_live = LiveFeed(state.settings, state.plugins)
    state.console_cache = SmallCache()
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="qrm API",
            swagger_js_url="/static/vendor/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/vendor/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/vendor/swagger-ui/favicon-32x32.png",
        )

    app.include_router(router)


def wants_html(request: Request) -> bool:
    """An error for a person in a browser (not for the API, agents or scripts)."""
    path = request.url.path
    if path.startswith(NOT_CONSOLE):
        return False
    return "text/html" in request.headers.get("accept", "") or request.method == "POST"


def error_page(request: Request, status: int, message: str) -> Response:
    """The console's answer to an error: one line, never a traceback."""
    if isinstance(message, auth.NotLoggedIn):  # pragma: no cover - handled by not_logged_in
        return not_logged_in(request)
    user = getattr(request.state, "console_user", None)
    titles = {403: "Not allowed", 404: "Not found", 401: "Not logged in", 500: "Something went wrong"}
    body = render(
        "error.html",
        request=request,
        user=user,
        title=titles.get(status, "Error"),
        section="",
        flash=None,
        banner=None,
        stream="",
        status=status,
        message=message,
    )
    return HTMLResponse(body, status_code=status)


def not_logged_in(request: Request) -> Response:
    target = request.url.path
    if request.url.query:
        target += "?" + request.url.query
    if request.method != "GET":
        target = "/"
    from urllib.parse import urlencode

    return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)


def stop(app: Any) -> None:
    """End the live streams (the server is stopping)."""
    feed = getattr(app.state, "console_live", None)
    if feed is not None:
        feed.close()
