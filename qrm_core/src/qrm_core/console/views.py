"""The console's pages and forms: thin shells over the services.

Every page reads through a service and every form posts to one; what a user
may do is decided by the same role check as the API's (and the service's own
rules), and a refusal is the service's one-line message, shown next to the
field or at the top of the page. No domain rule lives here.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from qrm_core.console import auth, live
from qrm_core.console.auth import ConsoleUser, form_user, page_user
from qrm_core.console.forms import Field, Form
from qrm_core.console.render import render
from qrm_core.errors import AuthError, InvalidInput, NotFound, QrmError
from qrm_core.models import (
    Deployment,
    EventLevel,
    ResourceKind,
    ResourceListPublic,
    ResourceState,
    Role,
    VEState,
)
from qrm_core.services import (
    ServiceContext,
    agent,
    boot_build,
    boot_images,
    events,
    images,
    overview,
    partitions,
    plugin_state,
    resources,
    service_context,
    sessions,
    storage,
    tokens,
    users,
)
from qrm_core.services import virtual_environments as ves

router = APIRouter(include_in_schema=False)

PageUser = Annotated[ConsoleUser, Depends(page_user)]
FormUser = Annotated[ConsoleUser, Depends(form_user)]
T = TypeVar("T")

FLASH_COOKIE = "qrm_flash"
RESOURCES_PER_PAGE = 100


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def call(request: Request, actor: str, fn: Callable[[ServiceContext], T]) -> T:
    """Run ``fn`` with a service context acting as ``actor`` (in a worker thread)."""
    state = request.app.state
    with service_context(state.settings, actor=actor, plugins=state.plugins, check_schema=False) as ctx:
        return fn(ctx)


async def acall(request: Request, actor: str, fn: Callable[[ServiceContext], T]) -> T:
    return await run_in_threadpool(call, request, actor, fn)


def _wake(request: Request) -> None:
    runner = getattr(request.app.state, "engine", None)
    if runner is not None:
        runner.wake()


def flash(response: Response, text: str, level: str = "info") -> Response:
    value = quote(json.dumps({"level": level, "text": text[:500]}))
    response.set_cookie(FLASH_COOKIE, value, max_age=60, path="/", httponly=True, samesite="lax")
    return response


def _take_flash(request: Request) -> dict[str, str] | None:
    from urllib.parse import unquote

    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    try:
        data = json.loads(unquote(raw))
        return {"level": str(data.get("level", "info")), "text": str(data.get("text", ""))}
    except (ValueError, AttributeError):
        return None


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def done(url: str, text: str, level: str = "info") -> Response:
    return flash(redirect(url), text, level)


async def act(
    request: Request,
    user: ConsoleUser,
    fn: Callable[[ServiceContext], T],
    *,
    back: str,
    text: str | Callable[[T], str],
    then: str | None = None,
    role: Role = Role.OPERATOR,
    wake: bool = False,
) -> Response:
    """An action button: the service's refusal flashes on ``back``; success
    flashes ``text`` on ``then`` (default ``back``)."""
    user.require(role)
    try:
        result = await acall(request, user.name, fn)
    except QrmError as exc:
        return done(back, exc.message, "error")
    if wake:
        _wake(request)
    return done(then or back, text(result) if callable(text) else text)


async def submit(
    request: Request,
    user: ConsoleUser,
    form: Form,
    service: Callable[[ServiceContext, dict[str, Any]], T],
    check: Callable[[Form, dict[str, Any]], None] | None = None,
) -> T | None:
    """Post a form to a service: None (and the form's errors set) when the
    form or the service refuses it."""
    typed = form.read(await request.form())
    if form.ok and check is not None:
        check(form, typed)
    if not form.ok:
        return None
    try:
        return await acall(request, user.name, lambda ctx: service(ctx, typed))
    except QrmError as exc:
        form.fail(exc)
        return None


def form_page(
    request: Request,
    user: ConsoleUser,
    form: Form,
    *,
    title: str,
    section: str,
    back: str,
    status_code: int = 200,
) -> HTMLResponse:
    return page(
        request,
        user,
        "form.html",
        title=title,
        section=section,
        form=form,
        back=back,
        status_code=status_code,
    )


def new_object_form(
    path: str,
    *,
    title: str,
    section: str,
    back: str,
    build: Callable[[Request, ConsoleUser], Form],
    service: Callable[[ServiceContext, dict[str, Any]], Any],
    success: Callable[[Any], tuple[str, str]],
    check: Callable[[Form, dict[str, Any]], None] | None = None,
) -> None:
    """The two routes of an "add a new ..." form: GET shows it, POST sends it
    to ``service``; on success ``success(created)`` gives (where to, message),
    on a refusal the form comes back with the message next to its field."""

    def show(request: Request, user: PageUser) -> HTMLResponse:
        user.require(Role.OPERATOR)
        form = build(request, user)
        return form_page(request, user, form, title=title, section=section, back=back)

    async def post(request: Request, user: FormUser) -> Response:
        user.require(Role.OPERATOR)
        form = await run_in_threadpool(build, request, user)
        created = await submit(request, user, form, service, check)
        if form.ok:
            return done(*success(created))
        return form_page(request, user, form, title=title, section=section, back=back, status_code=422)

    router.add_api_route(path, show, methods=["GET"], name=f"{section}-new-form")
    router.add_api_route(path, post, methods=["POST"], name=f"{section}-new")


def page(
    request: Request,
    user: ConsoleUser | None,
    template: str,
    *,
    title: str,
    section: str = "",
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    flash_message = _take_flash(request)
    banner = None
    stream = ""
    if user is not None:
        banner = _default_password_banner(request, user)
        # The live stream starts after the newest event this page has seen.
        stream = f"/live?after={call(request, user.name, events.newest_id)}"
    body = render(
        template,
        request=request,
        user=user,
        title=title,
        section=section,
        flash=flash_message,
        banner=banner,
        stream=stream,
        **context,
    )
    response = HTMLResponse(body, status_code=status_code)
    if flash_message is not None:
        response.delete_cookie(FLASH_COOKIE, path="/")
    return response


def _default_password_banner(request: Request, user: ConsoleUser) -> str | None:
    """The fresh-install warning, while the admin 'qrm' still has the password 'qrm'."""
    cache = request.app.state.console_cache
    unchanged = cache.get("default_password")
    if unchanged is None:
        unchanged = call(request, "console", users.default_password_unchanged)
        cache.put("default_password", unchanged)
    if not unchanged:
        return None
    if user.admin:
        return (
            f"The admin user '{users.DEFAULT_ADMIN}' still has the default password. "
            "Change it now, or anyone who can reach this server can take it over."
        )
    return (
        f"The admin user '{users.DEFAULT_ADMIN}' still has the default password: ask an admin to change it."
    )


def contributions(request: Request, object_type: str, object_name: str) -> tuple[list[Any], list[Any]]:
    """Links and panels plugins add to a page. A failing plugin does not break
    the page: a panel says which plugin failed and why."""
    from qrm_core.console.render import safe_links, safe_panels
    from qrm_core.context import HookContext

    state = request.app.state
    hooks = state.plugins.hooks
    user = getattr(request.state, "console_user", None)
    hook_ctx = HookContext(settings=state.settings, actor=user.name if user is not None else "console")
    links, panels = hooks.console_contributions(object_type, object_name, hook_ctx)
    links, panels = safe_links(links), safe_panels(panels)
    return links, panels


def object_page(
    request: Request,
    user: ConsoleUser,
    template: str,
    *,
    object_type: str,
    object_name: str,
    forms: dict[str, Form] | None = None,
    failed: Form | None = None,
    **context: Any,
) -> HTMLResponse:
    """The page of one object: what plugins add to it, and its forms (the one
    that was refused, ``failed``, in place of its blank one)."""
    if forms is not None and failed is not None:
        forms = {key: failed if f.action == failed.action else f for key, f in forms.items()}
    links, panels = contributions(request, object_type, object_name)
    return page(request, user, template, links=links, panels=panels, forms=forms, **context)


# ---------------------------------------------------------------------------
# Login, logout, account
# ---------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@router.get("/login")
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    token = auth.new_login_token()
    response = page(
        request, None, "login.html", title="Log in", next=_safe_next(next), login_token=token, error=None
    )
    auth.set_cookie(request, response, auth.LOGIN_COOKIE, token, max_age=3600)
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    name = str(form.get("user") or "")
    password = str(form.get("password") or "")
    target = _safe_next(str(form.get("next") or "/"))
    token = auth.new_login_token()

    def again(error: str, status_code: int) -> Response:
        response = page(
            request,
            None,
            "login.html",
            title="Log in",
            next=target,
            login_token=token,
            error=error,
            user_name=name,
            status_code=status_code,
        )
        auth.set_cookie(request, response, auth.LOGIN_COOKIE, token, max_age=3600)
        return response

    if not auth.check_login_token(request, str(form.get("csrf_token") or "")):
        return again(
            "The login form came without its security token (CSRF) or from another site; "
            "nothing was done: try again.",
            403,
        )
    if not name or not password:
        return again("Give a user name and a password.", 422)
    client = request.client.host if request.client else None
    try:
        opened = await acall(
            request, "console", lambda ctx: sessions.login(ctx, name=name, password=password, client=client)
        )
    except AuthError as exc:
        return again(exc.message, 401)
    except QrmError as exc:
        refused = again(exc.message, exc.http_status)
        if "retry_after" in exc.details:
            refused.headers["Retry-After"] = str(exc.details["retry_after"])
        return refused
    response = redirect(target)
    auth.set_cookie(request, response, auth.SESSION_COOKIE, opened.secret, max_age=opened.expires_in)
    response.delete_cookie(auth.LOGIN_COOKIE, path="/")
    return response


@router.post("/logout")
async def logout(request: Request, user: FormUser) -> Response:
    await acall(request, user.name, lambda ctx: sessions.logout(ctx, user.secret))
    response = redirect("/login")
    response.delete_cookie(auth.SESSION_COOKIE, path="/")
    return flash(response, "You are logged out.")


def _password_form(user: ConsoleUser, target: str) -> Form:
    # Your own password needs the current one (a session alone is not enough);
    # an admin resets another user's without it.
    current = (
        [Field("current", "Current password", "password", required=True, subjects=("current password",))]
        if target == user.name
        else []
    )
    return Form(
        f"/users/{quote(target)}/password",
        [
            *current,
            Field("password", "New password", "password", required=True, subjects=("password",)),
            Field("confirm", "New password again", "password", required=True),
        ],
        submit="Change password",
    )


def _account_page(
    request: Request,
    user: ConsoleUser,
    *,
    form: Form | None = None,
    token_form: Form | None = None,
    created: Any = None,
    status_code: int = 200,
) -> HTMLResponse:
    """My account: the password form and my API tokens (a new one's secret, once)."""
    my_tokens = call(request, user.name, lambda ctx: tokens.list_tokens(ctx, admin=user.admin))
    return page(
        request,
        user,
        "account.html",
        title="My account",
        section="account",
        form=form or _password_form(user, user.name),
        tokens=my_tokens,
        token_form=token_form or _token_form(user),
        created=created,
        status_code=status_code,
    )


@router.get("/account")
def account(request: Request, user: PageUser) -> HTMLResponse:
    return _account_page(request, user)


# ---------------------------------------------------------------------------
# Dashboard and live updates
# ---------------------------------------------------------------------------


@router.get("/")
def dashboard(request: Request, user: PageUser) -> HTMLResponse:
    summary = call(request, user.name, overview.overview)
    links, panels = contributions(request, "dashboard", "")
    return page(
        request,
        user,
        "dashboard.html",
        title="Dashboard",
        section="dashboard",
        summary=summary,
        links=links,
        panels=panels,
    )


@router.get("/live")
async def live_stream(request: Request) -> Response:
    user = await auth.current_user(request)
    if user is None:
        return Response("not logged in\n", status_code=401, media_type="text/plain")
    after: int | None = None
    raw = request.headers.get("last-event-id") or request.query_params.get("after")
    if raw and raw.isdigit() and len(raw) < 11:
        after = int(raw)
    feed: live.LiveFeed = request.app.state.console_live
    return StreamingResponse(feed.stream(after), media_type="text/event-stream", headers=live.sse_headers())


# ---------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------


def _choice(value: str | None, allowed: list[str]) -> str | None:
    return value if value in allowed else None


@router.get("/resources")
def resources_page(request: Request, user: PageUser) -> HTMLResponse:
    params = request.query_params
    state = _choice(params.get("state") or None, ResourceState.values())
    kind = _choice(params.get("kind") or None, ResourceKind.values())
    host = (params.get("host") or "").strip() or None
    try:
        number = max(1, min(int(params.get("page", "1")), 10**6))
    except ValueError:
        number = 1
    offset = (number - 1) * RESOURCES_PER_PAGE
    error = None
    try:
        listing = call(
            request,
            user.name,
            lambda ctx: resources.list_resources(
                ctx, state=state, kind=kind, host=host, offset=offset, limit=RESOURCES_PER_PAGE
            ),
        )
    except QrmError as exc:
        error = exc.message
        listing = ResourceListPublic(items=[], total=0, offset=0, limit=RESOURCES_PER_PAGE)
    pages = max(1, -(-listing.total // RESOURCES_PER_PAGE))
    filters = {k: v for k, v in (("state", state), ("kind", kind), ("host", host)) if v}

    def page_url(n: int) -> str:
        return "/resources?" + urlencode({**filters, "page": n})

    return page(
        request,
        user,
        "resources.html",
        title="Resources",
        section="resources",
        listing=listing,
        error=error,
        state=state or "",
        kind=kind or "",
        host=host or "",
        states=ResourceState.values(),
        kinds=ResourceKind.values(),
        number=number,
        pages=pages,
        page_url=page_url,
    )


def _resource_view(
    request: Request,
    user: ConsoleUser,
    ref: str,
    *,
    tab: str = "overview",
    add_form: Form | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    def read(ctx: ServiceContext) -> dict[str, Any]:
        resource = resources.resource_detail(ctx, ref)
        label = resource.hostname or resource.mac
        history = events.list_events(ctx, limit=50, object_type="resource", object_name=label)
        guests = resources.list_resources(ctx, host=str(resource.id), limit=200).items
        return {"resource": resource, "history": list(reversed(history)), "guests": guests}

    data = call(request, user.name, read)
    resource = data["resource"]
    is_host = resource.capacity is not None
    if add_form is None and is_host and user.operator:
        add_form = _add_partitions_form(resource)
    return object_page(
        request,
        user,
        "resource.html",
        object_type="resource",
        object_name=resource.mac,
        title=f"Resource {resource.hostname or resource.mac}",
        section="resources",
        tab="partitions" if tab == "partitions" and is_host else "overview",
        is_host=is_host,
        add_form=add_form,
        status_code=status_code,
        **data,
    )


@router.get("/resources/{ref}")
def resource_page(request: Request, user: PageUser, ref: str) -> HTMLResponse:
    return _resource_view(request, user, ref, tab=request.query_params.get("tab", "overview"))


# ---------------------------------------------------------------------------
# Partitions (a hypervisor host's Partitions tab, and a page per partition)
# ---------------------------------------------------------------------------

_MODES = [
    ("both", "now and from its next start"),
    ("live", "now only (until it stops)"),
    ("config", "from its next start only"),
]


def _partitions_url(host: str, name: str | None = None) -> str:
    if name is None:
        return f"/resources/{quote(host)}?tab=partitions"
    return f"/resources/{quote(host)}/partitions/{quote(name, safe='')}"


def _add_partitions_form(host: Any) -> Form:
    hypervisors = host.capacity.hypervisors if host.capacity is not None else []
    return Form(
        f"/resources/{host.id}/partitions",
        [
            Field("count", "How many", "number", required=True, minimum=1, subjects=("count",)),
            Field("cpus", "CPUs each", "number", required=True, minimum=1, subjects=("cpus",)),
            Field(
                "memory_mb",
                "Memory each (MB)",
                "number",
                required=True,
                minimum=1,
                subjects=(" mb", "memory"),
            ),
            Field(
                "hypervisor",
                "Hypervisor",
                "select",
                options=[(h, h) for h in hypervisors],
                subjects=("hypervisor",),
            ),
            Field(
                "name",
                "Name prefix",
                placeholder=host.hostname or "partition",
                help="they are named PREFIX-1, PREFIX-2, ...",
                subjects=("prefix",),
            ),
        ],
        submit="Add partitions",
        values={"count": "1"},
        prefix="add-",
    )


def _size_form(host: str, detail: Any) -> Form:
    return Form(
        _partitions_url(host, detail.name) + "/resize",
        [
            Field("cpus", "Virtual CPUs", "number", minimum=1, subjects=("cpus",)),
            Field("memory_mb", "Memory (MB)", "number", minimum=1, subjects=(" mb", "memory")),
            Field("mode", "Applies", "select", options=_MODES, subjects=("mode", "--live", "--config")),
        ],
        submit="Resize",
        values={"cpus": str(detail.cpus), "memory_mb": str(detail.memory_mb), "mode": "both"},
        prefix="size-",
    )


def _pin_form(host: str, detail: Any) -> Form:
    return Form(
        _partitions_url(host, detail.name) + "/pin",
        [
            Field(
                "pinning",
                "CPU assignment",
                required=True,
                placeholder="0:2,3;1:4",
                help="VCPU:HOST-CPUS separated by ';' (0:2,3 puts virtual CPU 0 on host CPUs 2 and 3)",
                subjects=("pinning",),
            ),
            Field("mode", "Applies", "select", options=_MODES, subjects=("mode", "--live", "--config")),
        ],
        submit="Pin",
        values={"pinning": detail.cpu_pinning, "mode": "both"},
        prefix="pin-",
    )


def _migrate_form(host: str, detail: Any, targets: list[str]) -> Form:
    return Form(
        _partitions_url(host, detail.name) + "/migrate",
        [
            Field(
                "to",
                "To host",
                "select",
                required=True,
                options=[(t, t) for t in targets],
                subjects=("to ", "host", "does not run"),
            ),
            Field("offline", "Offline: stop it, move it, start it again", "checkbox"),
        ],
        submit="Migrate",
        prefix="move-",
    )


def _partition_view(
    request: Request,
    user: ConsoleUser,
    host: str,
    name: str,
    *,
    failed: Form | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    def read(ctx: ServiceContext) -> dict[str, Any]:
        detail = partitions.show_partition(ctx, name, host)
        history = events.list_events(ctx, limit=30, object_type="partition", object_name=name)
        offered = partitions.offered_actions(detail)
        targets = partitions.migration_targets(ctx, name, host) if "migrate" in offered else []
        return {"p": detail, "offered": offered, "targets": targets, "history": list(reversed(history))}

    data = call(request, user.name, read)
    detail = data["p"]
    forms = {
        "resize": _size_form(host, detail),
        "pin": _pin_form(host, detail),
        "migrate": _migrate_form(host, detail, data["targets"]),
    }
    return object_page(
        request,
        user,
        "partition.html",
        object_type="partition",
        object_name=name,
        forms=forms,
        failed=failed,
        title=f"Partition {name} on {detail.host}",
        section="resources",
        host_ref=host,
        status_code=status_code,
        **data,
    )


@router.post("/resources/{ref}/partitions")
async def partitions_add(request: Request, user: FormUser, ref: str) -> Response:
    user.require(Role.OPERATOR)
    host = await acall(request, user.name, lambda ctx: resources.resource_detail(ctx, ref))
    form = _add_partitions_form(host)
    made = await submit(
        request,
        user,
        form,
        lambda ctx, typed: partitions.add_partitions(
            ctx,
            host=ref,
            count=typed["count"] or 0,
            cpus=typed["cpus"] or 0,
            memory_mb=typed["memory_mb"] or 0,
            hypervisor=typed["hypervisor"],
            prefix=typed["name"],
        ),
    )
    if made is not None:
        _wake(request)
        names = ", ".join(p.name for p in made)
        return done(
            _partitions_url(ref), f"{len(made)} partition{'s' if len(made) > 1 else ''} added: {names}"
        )
    return await run_in_threadpool(
        lambda: _resource_view(request, user, ref, tab="partitions", add_form=form, status_code=422)
    )


@router.get("/resources/{ref}/partitions/{name}")
def partition_page(request: Request, user: PageUser, ref: str, name: str) -> HTMLResponse:
    return _partition_view(request, user, ref, name)


def _partition_form_call(
    action: str, host: str, name: str
) -> tuple[Callable[[ServiceContext, dict[str, Any]], Any], Callable[[Any], str]]:
    if action == "resize":
        return (
            lambda ctx, t: partitions.set_partition(
                ctx, name, host, cpus=t["cpus"], memory_mb=t["memory_mb"], mode=t["mode"] or "both"
            ),
            lambda p: f"partition {name} resized: {p.cpus} CPUs, {p.memory_mb} MB",
        )
    if action == "pin":
        return (
            lambda ctx, t: partitions.pin_partition(
                ctx, name, t["pinning"] or "", host, mode=t["mode"] or "both"
            ),
            lambda p: f"partition {name} pinned: {p.cpu_pinning or 'as its next start says'}",
        )
    return (
        lambda ctx, t: partitions.migrate_partition(ctx, name, t["to"] or "", host, offline=t["offline"]),
        lambda p: f"partition {name} migrated to {p.host}",
    )


@router.post("/resources/{ref}/partitions/{name}/{action}")
async def partition_action(request: Request, user: FormUser, ref: str, name: str, action: str) -> Response:
    user.require(Role.OPERATOR)
    back = _partitions_url(ref, name)
    if action in partitions.ACTIONS:
        force = (await request.form()).get("force") is not None
        return await act(
            request,
            user,
            lambda ctx: partitions.partition_action(ctx, name, action, ref, force=force),
            back=back,
            text=lambda p: f"partition {name} is {p.state}",
            wake=True,
        )
    if action == "remove":
        return await act(
            request,
            user,
            lambda ctx: partitions.remove_partition(ctx, name, ref),
            back=back,
            then=_partitions_url(ref),
            text=f"partition {name} removed",
        )
    if action not in ("resize", "pin", "migrate"):
        raise NotFound(f"no partition action {action!r}")

    def build() -> Form:
        detail = call(request, user.name, lambda ctx: partitions.show_partition(ctx, name, ref))
        if action == "migrate":
            targets = call(request, user.name, lambda ctx: partitions.migration_targets(ctx, name, ref))
            return _migrate_form(ref, detail, targets)
        return (_size_form if action == "resize" else _pin_form)(ref, detail)

    form = await run_in_threadpool(build)
    service, said = _partition_form_call(action, ref, name)
    changed = await submit(request, user, form, service)
    if changed is not None:
        _wake(request)
        # A migrated partition is on its new host now.
        return done(_partitions_url(changed.host, name) if action == "migrate" else back, said(changed))
    return await run_in_threadpool(
        lambda: _partition_view(request, user, ref, name, failed=form, status_code=422)
    )


_RESOURCE_ACTIONS: dict[str, tuple[Callable[[ServiceContext, str], Any], str]] = {
    "reboot": (agent.order_reboot, "reboot ordered for {}"),
    "halt": (agent.order_halt, "halt ordered for {}"),
    "remove": (resources.remove_resource, "resource {} removed"),
}


@router.post("/resources/{ref}/{action}")
async def resource_action(request: Request, user: FormUser, ref: str, action: str) -> Response:
    if action not in _RESOURCE_ACTIONS:
        raise NotFound(f"no resource action {action!r}")
    fn, message = _RESOURCE_ACTIONS[action]
    return await act(
        request,
        user,
        lambda ctx: fn(ctx, ref),
        back=f"/resources/{quote(ref)}",
        then="/resources" if action == "remove" else None,
        text=message.format(ref),
        wake=True,
    )


# ---------------------------------------------------------------------------
# Virtual environments
# ---------------------------------------------------------------------------


def _ve_form(request: Request, user: ConsoleUser, values: dict[str, Any] | None = None) -> Form:
    def options(ctx: ServiceContext) -> tuple[list[str], list[str], list[str]]:
        boot = [b.name for b in boot_images.list_boot_images(ctx)]
        fs = [f.name for f in storage.list_filesystem_images(ctx)]
        return boot, fs, ctx.plugins.driver_names("qrm.hypervisors")

    boot, fs, hypervisors = call(request, user.name, options)
    return Form(
        "/ves/new",
        [
            Field(
                "name", "Name", required=True, subjects=("virtual environment name", "virtual environment '")
            ),
            Field(
                "boot_image",
                "Boot image",
                "select",
                required=True,
                options=[(b, b) for b in boot],
                subjects=("boot image",),
                help="kernel + initrd with the qrm agent",
            ),
            Field(
                "fs_image",
                "Filesystem image",
                "select",
                required=True,
                options=[(f, f) for f in fs],
                subjects=("filesystem image", "storage type"),
                help="the root filesystem it boots",
            ),
            Field(
                "deployment",
                "Deployment type",
                "select",
                options=[(d, d) for d in Deployment.values()],
                subjects=("deployment",),
                help="single: one machine; shared: a pool booting the same image; partitioned: a VM on a host",
            ),
            Field(
                "pool_size",
                "Pool size",
                "number",
                subjects=("pool size", "pool-size"),
                minimum=1,
                help="shared deployments: how many machines",
            ),
            Field(
                "kind",
                "Resource kind",
                "select",
                options=[("", "any"), *((k, k) for k in ResourceKind.values())],
                subjects=("resource kind", "physical ones"),
            ),
            Field(
                "hypervisor",
                "Hypervisor",
                "select",
                options=[("", "none"), *((h, h) for h in hypervisors)],
                subjects=("hypervisor",),
            ),
            Field("cpus", "CPUs (at least)", "number", subjects=("cpus",), minimum=0),
            Field("memory_mb", "Memory in MB (at least)", "number", subjects=("memory",), minimum=0),
            Field("failover", "Failover: replace a machine that fails", "checkbox"),
            Field(
                "pristine",
                "Pristine: keep what it starts with, to reset it to later",
                "checkbox",
                subjects=("pristine", "snapshot"),
            ),
            Field("kernel_args", "Kernel arguments", subjects=("kernel arguments",)),
            Field("comment", "Comment", subjects=("comment",)),
        ],
        submit="Create",
        values=values or {"deployment": Deployment.SINGLE.value},
    )


@router.get("/ves")
def ve_list(request: Request, user: PageUser) -> HTMLResponse:
    state = _choice(request.query_params.get("state") or None, VEState.values())
    items = call(request, user.name, lambda ctx: ves.list_ves(ctx, state=state))
    return page(
        request,
        user,
        "ves.html",
        title="Virtual Environments",
        section="ves",
        items=items,
        state=state or "",
        states=VEState.values(),
    )


new_object_form(
    "/ves/new",
    title="New Virtual Environment",
    section="ves",
    back="/ves",
    build=lambda request, user: _ve_form(request, user),
    service=lambda ctx, typed: ves.create_ve(ctx, **typed),
    success=lambda ve: (f"/ves/{quote(ve.name)}", f"virtual environment {ve.name} created"),
)


@router.get("/ves/{name}")
def ve_page(request: Request, user: PageUser, name: str) -> HTMLResponse:
    def read(ctx: ServiceContext) -> dict[str, Any]:
        ve = ves.show_ve(ctx, name)
        members = resources.list_resources(ctx, ve=name, limit=1000).items
        history = events.list_events(ctx, limit=30, object_type="ve", object_name=name)
        return {"ve": ve, "members": members, "history": list(reversed(history))}

    data = call(request, user.name, read)
    return object_page(
        request,
        user,
        "ve.html",
        object_type="ve",
        object_name=name,
        title=f"Virtual Environment {name}",
        section="ves",
        **data,
    )


def _pool_size(raw: str) -> int:
    if not raw.isdigit():
        raise InvalidInput(f"pool size: {raw!r} is not a whole number")
    return int(raw[:9])


@router.post("/ves/{name}/{action}")
async def ve_action(request: Request, user: FormUser, name: str, action: str) -> Response:
    raw = str((await request.form()).get("pool_size") or "").strip()
    back = f"/ves/{quote(name)}"
    actions: dict[str, tuple[Callable[[ServiceContext], Any], str]] = {
        "start": (lambda ctx: ves.start_ve(ctx, name), f"start of {name} requested"),
        "stop": (lambda ctx: ves.stop_ve(ctx, name), f"stop of {name} requested"),
        "resize": (
            lambda ctx: ves.resize_ve(ctx, name, _pool_size(raw)),
            f"pool of {name} resized to {raw}",
        ),
        "remove": (lambda ctx: ves.remove_ve(ctx, name), f"virtual environment {name} removed"),
        # A pristine VE back to its first start: it stops, its image is reverted, it starts again.
        "reset": (
            lambda ctx: images.reset_ve(ctx, name, progress=lambda _: _wake(request)),
            f"virtual environment {name} reset to what it started with",
        ),
    }
    if action not in actions:
        raise NotFound(f"no virtual environment action {action!r}")
    fn, text = actions[action]
    then = "/ves" if action == "remove" else None
    return await act(request, user, fn, back=back, then=then, text=text, wake=True)


# ---------------------------------------------------------------------------
# Storage servers, filesystem images, boot images
# ---------------------------------------------------------------------------


def _storage_form(request: Request, user: ConsoleUser) -> Form:
    types = call(request, user.name, lambda ctx: ctx.plugins.driver_names("qrm.storage"))
    return Form(
        "/storage/new",
        [
            Field("name", "Name", required=True, subjects=("storage server name", "storage server '")),
            Field(
                "type",
                "Type",
                "select",
                required=True,
                options=[(t, t) for t in types],
                subjects=("storage type",),
                help="the storage plugins installed",
            ),
            Field(
                "address",
                "Address",
                required=True,
                placeholder="10.0.11.35",
                subjects=("storage server address", "address"),
            ),
            Field("comment", "Comment", subjects=("comment",)),
        ],
        submit="Add storage server",
    )


@router.get("/storage")
def storage_list(request: Request, user: PageUser) -> HTMLResponse:
    items = call(request, user.name, storage.list_storage)
    return page(request, user, "storage.html", title="Storage/Server", section="storage", items=items)


new_object_form(
    "/storage/new",
    title="Add New Storage Server",
    section="storage",
    back="/storage",
    build=_storage_form,
    service=lambda ctx, typed: storage.add_storage(ctx, **typed),
    success=lambda created: (
        "/storage",
        f"storage server {created.name} added ({created.type} at {created.address})",
    ),
)


@router.get("/storage/{name}")
def storage_page(request: Request, user: PageUser, name: str) -> HTMLResponse:
    item = call(request, user.name, lambda ctx: storage.show_storage(ctx, name))
    images = call(request, user.name, lambda ctx: storage.list_filesystem_images(ctx, storage=name))
    return object_page(
        request,
        user,
        "storage_one.html",
        object_type="storage",
        object_name=name,
        title=f"Storage server {name}",
        section="storage",
        item=item,
        images=images,
    )


@router.post("/storage/{name}/remove")
async def storage_remove(request: Request, user: FormUser, name: str) -> Response:
    return await act(
        request,
        user,
        lambda ctx: storage.remove_storage(ctx, name),
        back="/storage",
        text=f"storage server {name} removed",
    )


def _new_image_fields(request: Request, user: ConsoleUser) -> list[Field]:
    """Name and storage server: what every new filesystem image is asked first."""
    names = call(request, user.name, lambda ctx: [s.name for s in storage.list_storage(ctx)])
    return [
        Field("name", "Name", required=True, subjects=("filesystem image name", "filesystem image '")),
        Field(
            "storage",
            "Storage server",
            "select",
            required=True,
            options=[(n, n) for n in names],
            subjects=("storage server", "storage type"),
        ),
    ]


def _fs_form(request: Request, user: ConsoleUser) -> Form:
    return Form(
        "/filesystem-images/new",
        [
            *_new_image_fields(request, user),
            Field(
                "location",
                "Location",
                placeholder="/exports/centos",
                help="an existing volume (export path, target) ...",
                subjects=("location", "give either"),
            ),
            Field(
                "size_mb",
                "... or size of a new, empty volume (MB)",
                "number",
                minimum=1,
                subjects=("size",),
            ),
            Field("comment", "Comment", subjects=("comment",)),
        ],
        submit="Add filesystem image",
    )


@router.get("/filesystem-images")
def fs_list(request: Request, user: PageUser) -> HTMLResponse:
    items = call(request, user.name, storage.list_filesystem_images)
    return page(request, user, "fs_images.html", title="Filesystem Images", section="fs", items=items)


new_object_form(
    "/filesystem-images/new",
    title="New Filesystem Image",
    section="fs",
    back="/filesystem-images",
    build=_fs_form,
    service=lambda ctx, typed: storage.add_filesystem_image(ctx, **typed),
    success=lambda created: ("/filesystem-images", f"filesystem image {created.name} added"),
)


def _capture_form(request: Request, user: ConsoleUser) -> Form:
    return Form(
        "/filesystem-images/capture",
        [
            *_new_image_fields(request, user),
            Field(
                "source",
                "Machine to capture",
                required=True,
                placeholder="root@10.0.11.172:/",
                help="USER@ADDRESS:/ of a running machine qrm reaches over SSH",
                subjects=("host:/path", "source", "ssh", "login", "machine", "host key", "address"),
            ),
            Field(
                "identity",
                "SSH private key",
                "secret",
                help="the key that logs in there; kept for the copy only, never shown or logged",
                subjects=("key", "identity"),
            ),
            Field(
                "password",
                "... or the password that logs in there",
                "password",
                help="instead of a key; kept in memory for the copy only, never stored, shown or logged",
                subjects=("password",),
            ),
            Field("port", "SSH port", "number", minimum=1, subjects=("port",)),
            Field("excludes", "Leave out", placeholder="/var/cache /home", subjects=("exclude",)),
            Field("size_mb", "Volume size (MB)", "number", minimum=1, subjects=("size",)),
            Field("comment", "Comment", subjects=("comment",)),
        ],
        submit="Capture",
    )


def _start_capture(ctx: ServiceContext, typed: dict[str, Any]) -> Any:
    """The key or the password (an empty field is none) goes to the copying thread's
    memory only, as the API's does."""
    login = {"identity": typed["identity"] or None, "password": typed["password"] or None}
    started = images.start_capture(ctx, **{**typed, **login, "excludes": (typed["excludes"] or "").split()})
    images.capture_in_background(ctx.settings, ctx.plugins, ctx.actor, started.name, **login)
    return started


new_object_form(
    "/filesystem-images/capture",
    title="Capture a running machine",
    section="fs",
    back="/filesystem-images",
    build=_capture_form,
    service=_start_capture,
    success=lambda created: (
        f"/filesystem-images/{quote(created.name)}",
        f"capture of {created.source or created.name} into {created.name} started",
    ),
)


def _fs_page_forms(name: str, here: str = "", servers: list[str] | None = None) -> dict[str, Form]:
    """The image page's forms; ``here`` is the image's storage server, ``servers`` every one."""
    base = f"/filesystem-images/{quote(name)}"
    others = [s for s in servers or [] if s != here]
    return {
        "clone": Form(
            f"{base}/clone",
            [
                Field(
                    "name",
                    "Name of the copy",
                    required=True,
                    subjects=("filesystem image name", "filesystem image '"),
                ),
                Field(
                    "storage",
                    "Storage server",
                    "select",
                    options=[("", f"the same ({here})" if here else "the same"), *((s, s) for s in others)],
                    subjects=("storage server",),
                    help="on another one the files are copied through the qrm server",
                ),
                Field("comment", "Comment", subjects=("comment",)),
            ],
            submit="Clone",
            prefix="clone-",
        ),
        "snapshot": Form(
            f"{base}/snapshot",
            [
                Field(
                    "label",
                    "Label",
                    placeholder="before-upgrade",
                    help="empty: the time",
                    subjects=("label", "snapshot"),
                )
            ],
            submit="Take snapshot",
            prefix="snap-",
        ),
    }


def _fs_view(
    request: Request, user: ConsoleUser, name: str, failed: Form | None = None, status_code: int = 200
) -> HTMLResponse:
    def read(ctx: ServiceContext) -> dict[str, Any]:
        image = storage.show_filesystem_image(ctx, name)
        try:
            snapshots = images.list_image_snapshots(ctx, name)
            snapshot_error = ""
        except QrmError as exc:  # a storage server that keeps none, or cannot be reached
            snapshots, snapshot_error = [], exc.message
        history = events.list_events(ctx, limit=30, object_type="filesystem-image", object_name=name)
        return {
            "fs": image,
            "snapshots": snapshots,
            "snapshot_error": snapshot_error,
            "history": list(reversed(history)),
            "servers": [s.name for s in storage.list_storage(ctx)],
        }

    data = call(request, user.name, read)
    forms = _fs_page_forms(name, data["fs"].storage, data.pop("servers"))
    return object_page(
        request,
        user,
        "fs_image.html",
        object_type="filesystem_image",
        object_name=name,
        forms=forms,
        failed=failed,
        title=f"Filesystem image {name}",
        section="fs",
        status_code=status_code,
        **data,
    )


@router.get("/filesystem-images/{name}")
def fs_page(request: Request, user: PageUser, name: str) -> HTMLResponse:
    return _fs_view(request, user, name)


@router.post("/filesystem-images/{name}/{action}")
async def fs_action(request: Request, user: FormUser, name: str, action: str) -> Response:
    back = f"/filesystem-images/{quote(name)}"
    if action in ("remove", "revert", "forget-snapshot"):
        data = await request.form()
        label = str(data.get("label") or "")
        calls: dict[str, tuple[Callable[[ServiceContext], Any], str, str]] = {
            "remove": (
                lambda ctx: storage.remove_filesystem_image(ctx, name, purge=data.get("purge") is not None),
                f"filesystem image {name} removed",
                "/filesystem-images",
            ),
            "revert": (
                lambda ctx: images.revert_filesystem_image(ctx, name, label=label),
                f"filesystem image {name} reverted to snapshot {label}",
                back,
            ),
            "forget-snapshot": (
                lambda ctx: images.remove_image_snapshot(ctx, name, label),
                f"snapshot {label} of {name} removed",
                back,
            ),
        }
        fn, text, then = calls[action]
        return await act(request, user, fn, back=back, then=then, text=text)
    if action not in ("clone", "snapshot"):
        raise NotFound(f"no filesystem image action {action!r}")
    user.require(Role.OPERATOR)

    def where(ctx: ServiceContext) -> tuple[str, list[str]]:
        return storage.show_filesystem_image(ctx, name).storage, [s.name for s in storage.list_storage(ctx)]

    form = _fs_page_forms(name, *(await acall(request, user.name, where)))[action]
    if action == "clone":
        made = await submit(request, user, form, lambda ctx, t: images.clone_filesystem_image(ctx, name, **t))
        if made is not None:
            return done(
                f"/filesystem-images/{quote(made.name)}", f"filesystem image {made.name} cloned from {name}"
            )
    else:
        taken = await submit(
            request, user, form, lambda ctx, t: images.snapshot_filesystem_image(ctx, name, label=t["label"])
        )
        if taken is not None:
            how = f" ({taken.how})" if taken.how else ""
            return done(back, f"snapshot {taken.label} of {name} taken{how}")
    return await run_in_threadpool(_fs_view, request, user, name, form, 422)


def _boot_form() -> Form:
    return Form(
        "/boot-images/new",
        [
            Field("name", "Name", required=True, subjects=("boot image name", "boot image '")),
            Field(
                "kernel_version",
                "Kernel version",
                required=True,
                placeholder="6.1.0-18-amd64",
                subjects=("kernel version",),
            ),
            Field("kernel", "Kernel file", "file", subjects=("kernel file", "kernel and initrd")),
            Field("initrd", "Initrd file", "file", subjects=("initrd",)),
            Field("cmdline", "Kernel command line", subjects=("kernel arguments", "command line")),
            Field("make_default", "Make it the default boot image (idle machines boot it)", "checkbox"),
            Field("comment", "Comment", subjects=("comment",)),
        ],
        submit="Add boot image",
    )


@router.get("/boot-images")
def boot_list(request: Request, user: PageUser) -> HTMLResponse:
    items = call(request, user.name, boot_images.list_boot_images)
    return page(
        request,
        user,
        "boot_images.html",
        title="Boot Images",
        section="boot",
        items=items,
        builds=boot_build.builds(),
    )


def _both_files(form: Form, typed: dict[str, Any]) -> None:
    if (typed["kernel"] is None) != (typed["initrd"] is None):
        form.errors["initrd" if typed["initrd"] is None else "kernel"] = (
            "give both kernel and initrd files, or neither"
        )


def _add_boot_image(ctx: ServiceContext, typed: dict[str, Any]) -> Any:
    with tempfile.TemporaryDirectory(prefix="qrm-upload-") as tmp:
        paths: dict[str, Path] = {}
        for label in ("kernel", "initrd"):
            upload = typed[label]
            if upload is not None:
                path = Path(tmp) / label
                with open(path, "wb") as out:
                    shutil.copyfileobj(upload.file, out, 1 << 20)
                paths[label] = path
        return boot_images.add_boot_image(
            ctx,
            name=typed["name"] or "",
            kernel_version=typed["kernel_version"] or "",
            kernel=paths.get("kernel"),
            initrd=paths.get("initrd"),
            cmdline=typed["cmdline"],
            make_default=typed["make_default"],
            comment=typed["comment"],
        )


new_object_form(
    "/boot-images/new",
    title="New Boot Image",
    section="boot",
    back="/boot-images",
    build=lambda request, user: _boot_form(),
    service=_add_boot_image,
    check=_both_files,
    success=lambda created: ("/boot-images", f"boot image {created.name} added"),
)


def _build_form(request: Request, user: ConsoleUser) -> Form:
    offered = boot_build.available_kernels(request.app.state.settings)
    return Form(
        "/boot-images/build",
        [
            Field("name", "Name", required=True, subjects=("boot image name", "boot image '", "boot image ")),
            Field(
                "kernel_version",
                "Kernel",
                "select",
                required=True,
                options=[(version, f"{version} ({where})") for version, where in offered],
                subjects=("kernel",),
                help="a kernel package qrm has downloaded, or a kernel in /boot",
            ),
            Field("make_default", "Make it the default boot image (idle machines boot it)", "checkbox"),
        ],
        submit="Build",
    )


new_object_form(
    "/boot-images/build",
    title="Build a boot image",
    section="boot",
    back="/boot-images",
    build=_build_form,
    service=lambda ctx, typed: boot_build.build_in_background(ctx.settings, ctx.plugins, ctx.actor, **typed),
    success=lambda started: ("/boot-images", f"build of boot image {started.name} started"),
)


@router.get("/boot-images/{name}")
def boot_page(request: Request, user: PageUser, name: str) -> HTMLResponse:
    def read(ctx: ServiceContext) -> dict[str, Any]:
        image = boot_images.show_boot_image(ctx, name)
        history = events.list_events(ctx, limit=30, object_type="boot-image", object_name=name)
        return {"b": image, "history": list(reversed(history))}

    data = call(request, user.name, read)
    return object_page(
        request,
        user,
        "boot_image.html",
        object_type="boot_image",
        object_name=name,
        title=f"Boot image {name}",
        section="boot",
        **data,
    )


@router.post("/boot-images/{name}/{action}")
async def boot_action(request: Request, user: FormUser, name: str, action: str) -> Response:
    actions: dict[str, tuple[Callable[[ServiceContext], Any], str]] = {
        "default": (
            lambda ctx: boot_images.set_default_boot_image(ctx, name),
            f"{name} is the default boot image",
        ),
        "remove": (lambda ctx: boot_images.remove_boot_image(ctx, name), f"boot image {name} removed"),
    }
    if action not in actions:
        raise NotFound(f"no boot image action {action!r}")
    fn, text = actions[action]
    return await act(request, user, fn, back="/boot-images", text=text)


# ---------------------------------------------------------------------------
# Events, plugins
# ---------------------------------------------------------------------------


@router.get("/events")
def event_list(request: Request, user: PageUser) -> HTMLResponse:
    params = request.query_params
    level = _choice(params.get("level") or None, EventLevel.values())
    object_type = (params.get("object_type") or "").strip()[:32] or None
    object_name = (params.get("object_name") or "").strip()[:128] or None
    found = call(
        request,
        user.name,
        lambda ctx: events.list_events(
            ctx, limit=200, level=level, object_type=object_type, object_name=object_name
        ),
    )
    return page(
        request,
        user,
        "events.html",
        title="Events",
        section="events",
        items=list(reversed(found)),
        level=level or "",
        object_type=object_type or "",
        object_name=object_name or "",
        levels=EventLevel.values(),
        object_types=[
            "resource",
            "ve",
            "storage",
            "filesystem-image",
            "boot-image",
            "partition",
            "user",
            "plugin",
            "server",
            "site",
        ],
    )


@router.get("/plugins")
def plugin_list(request: Request, user: PageUser) -> HTMLResponse:
    items = plugin_state.list_plugins(request.app.state.plugins)
    return page(request, user, "plugins.html", title="Plugins", section="plugins", items=items)


@router.post("/plugins/{name}/{action}")
async def plugin_action(request: Request, user: FormUser, name: str, action: str) -> Response:
    user.require(Role.ADMIN)
    if action not in ("enable", "disable"):
        raise NotFound(f"no plugin action {action!r}")
    enabled = action == "enable"

    def said(changed: bool) -> str:
        if not changed:
            return f"{name} was already {action}d"
        return f"{name} {action}d; this takes effect when the server restarts"

    return await act(
        request,
        user,
        lambda ctx: plugin_state.set_enabled(ctx, name, enabled),
        back="/plugins",
        text=said,
        role=Role.ADMIN,
    )


# ---------------------------------------------------------------------------
# Users and API tokens
# ---------------------------------------------------------------------------


def _user_form() -> Form:
    return Form(
        "/users/new",
        [
            Field("name", "Name", required=True, subjects=("user name", "user '")),
            Field("password", "Password", "password", required=True, subjects=("password",)),
            Field(
                "role",
                "Role",
                "select",
                options=[(r, r) for r in (Role.VIEWER.value, Role.OPERATOR.value, Role.ADMIN.value)],
                subjects=("role",),
                help="viewer: sees everything; operator: also changes things; admin: also users and plugins",
            ),
        ],
        submit="Add user",
        values={"role": Role.VIEWER.value},
    )


def _token_form(user: ConsoleUser) -> Form:
    return Form(
        "/tokens/new",
        [
            Field(
                "name",
                "Token name",
                required=True,
                placeholder="ci",
                subjects=("token name", "api token named"),
            )
        ],
        submit="Create API token",
    )


def _users_page(
    request: Request, user: ConsoleUser, form: Form | None = None, status_code: int = 200
) -> HTMLResponse:
    def read(ctx: ServiceContext) -> tuple[Any, Any]:
        return users.list_users(ctx), tokens.list_tokens(ctx, all_users=True, admin=True)

    people, all_tokens = call(request, user.name, read)
    return page(
        request,
        user,
        "users.html",
        title="Users",
        section="users",
        items=people,
        tokens=all_tokens,
        form=form or _user_form(),
        status_code=status_code,
    )


@router.get("/users")
def user_list(request: Request, user: PageUser) -> HTMLResponse:
    user.require(Role.ADMIN)
    return _users_page(request, user)


@router.post("/users/new")
async def user_add(request: Request, user: FormUser) -> Response:
    user.require(Role.ADMIN)
    form = _user_form()
    typed = form.read(await request.form())
    if form.ok:
        try:
            created = await acall(
                request,
                user.name,
                lambda ctx: users.create_user(
                    ctx, name=typed["name"] or "", password=typed["password"] or "", role=typed["role"] or ""
                ),
            )
        except QrmError as exc:
            form.fail(exc)
        else:
            return done("/users", f"user {created.name} added ({created.role})")
    return await run_in_threadpool(_users_page, request, user, form, 422)


@router.get("/users/{name}/password")
def user_password_form(request: Request, user: PageUser, name: str) -> Response:
    if name == user.name:
        return redirect("/account")
    user.require(Role.ADMIN)
    call(request, user.name, lambda ctx: users.get_user_row(ctx, name))  # 404 for no such user
    return form_page(
        request, user, _password_form(user, name), title=f"Password of {name}", section="users", back="/users"
    )


@router.post("/users/{name}/password")
async def user_password(request: Request, user: FormUser, name: str) -> Response:
    if name != user.name:
        user.require(Role.ADMIN)
    form = _password_form(user, name)
    typed = form.read(await request.form())
    if form.ok and typed["password"] != typed["confirm"]:
        form.errors["confirm"] = "the two passwords differ"
    if form.ok:
        client = request.client.host if request.client else None
        try:
            await acall(
                request,
                user.name,
                lambda ctx: users.set_password(
                    ctx,
                    name=name,
                    password=typed["password"],
                    by=user.name,
                    current_password=typed.get("current"),
                    address=client,
                ),
            )
        except QrmError as exc:
            form.fail(exc)
        else:
            request.app.state.console_cache.clear()
            if name == user.name:
                # Every session of the user ended with the old password, this one too.
                response = done("/login", "Your password was changed; log in with the new one.")
                response.delete_cookie(auth.SESSION_COOKIE, path="/")
                return response
            return done("/users", f"password of {name} changed")
    if name != user.name:
        return form_page(
            request, user, form, title=f"Password of {name}", section="users", back="/users", status_code=422
        )
    return await run_in_threadpool(lambda: _account_page(request, user, form=form, status_code=422))


@router.post("/users/{name}/remove")
async def user_remove(request: Request, user: FormUser, name: str) -> Response:
    return await act(
        request,
        user,
        lambda ctx: users.remove_user(ctx, name),
        back="/users",
        text=f"user {name} removed",
        role=Role.ADMIN,
    )


@router.get("/tokens")
def token_page(request: Request, user: PageUser) -> Response:
    return redirect("/account")


@router.post("/tokens/new")
async def token_create(request: Request, user: FormUser) -> Response:
    form = _token_form(user)
    typed = form.read(await request.form())
    created = None
    if form.ok:
        try:
            created = await acall(
                request,
                user.name,
                lambda ctx: tokens.create_token(ctx, name=typed["name"] or "", admin=user.admin),
            )
        except QrmError as exc:
            form.fail(exc)
    response = await run_in_threadpool(
        lambda: _account_page(
            request,
            user,
            token_form=form if created is None else None,
            created=created,
            status_code=201 if created is not None else 422,
        )
    )
    response.headers["Cache-Control"] = "no-store"  # the secret is on this page, once
    return response


@router.post("/tokens/{token_id}/revoke")
async def token_revoke(request: Request, user: FormUser, token_id: str) -> Response:
    back = "/users" if user.admin and request.query_params.get("back") == "users" else "/account"
    if not token_id.isdigit() or len(token_id) > 10:
        return done(back, f"API token {token_id!r} does not exist", "error")
    number = int(token_id)
    return await act(
        request,
        user,
        lambda ctx: tokens.revoke_token(ctx, number, admin=user.admin),
        back=back,
        text=f"API token {number} revoked",
        role=Role.VIEWER,
    )
