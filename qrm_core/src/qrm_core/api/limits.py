"""Request-body limits per route, enforced before the body is read.

Every request body is limited: the node-agent protocol's to
:data:`AGENT_BODY_LIMIT` (its requests are a few hundred bytes), the API's and
the console's forms to :data:`API_BODY_LIMIT`, and the routes that take
uploads (a boot image's kernel and initrd) to ``QRM_MAX_UPLOAD_MB``. A
``Content-Length`` above the limit is answered ``413`` at once, the body
unread; a body without one (chunked) is counted as it arrives and cut off at
the limit. Where the protocol allows it, the caller is authenticated before a
byte of the body is read: a registration must carry the enrollment token in
its header, an upload the credentials of a user who may add boot images.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from qrm_core.errors import AuthError, QrmError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from qrm_core.config import Settings

#: The node-agent endpoints' bodies (a registration is about 300 bytes).
AGENT_BODY_LIMIT = 64 * 1024
#: The API's JSON and the console's forms.
API_BODY_LIMIT = 1024 * 1024
#: Routes that take file uploads (method, path): their limit is ``QRM_MAX_UPLOAD_MB``.
UPLOAD_ROUTES = frozenset({("POST", "/api/v1/boot-images"), ("POST", "/boot-images/new")})


def body_limit(settings: Settings, method: str, path: str) -> int:
    """The most bytes of body this route takes."""
    if path.startswith("/agent/"):
        return AGENT_BODY_LIMIT
    if (method, path) in UPLOAD_ROUTES:
        return settings.max_upload_mb * 1024 * 1024
    return API_BODY_LIMIT


def _shown(limit: int) -> str:
    return f"{limit // (1024 * 1024)} MB" if limit >= 1024 * 1024 else f"{limit // 1024} KB"


async def _answer(
    send: Send, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]]
) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: the limits and early authentication described above."""

    def __init__(self, app: ASGIApp, settings: Settings, fastapi_app: Any) -> None:
        self.app = app
        self.settings = settings
        self.fastapi_app = fastapi_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        limit = body_limit(self.settings, method, path)
        too_large = f"the request body is larger than this route takes ({_shown(limit)})"
        length: int | None = None
        authorization = b""
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await _answer(send, 400, "invalid_input", "malformed Content-Length", [])
                    return
            elif name == b"authorization":
                authorization = value
        if length is not None and length > limit:
            await _answer(send, 413, "too_large", too_large, [])
            return
        refused = await self._authenticate_first(scope, method, path, authorization)
        if refused is not None:
            status, code, message, headers = refused
            await _answer(send, status, code, message, headers)
            return
        if length is not None:
            await self.app(scope, receive, send)  # the server reads no more than it announced
            return

        received = 0
        cut = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, cut
            if cut:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    cut = True
                    if not started:
                        await _answer(send, 413, "too_large", too_large, [])
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if cut:
                return  # the 413 went out; what the route says after the cut-off is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not cut:
                raise

    async def _authenticate_first(
        self, scope: Scope, method: str, path: str, authorization: bytes
    ) -> tuple[int, str, str, list[tuple[bytes, bytes]]] | None:
        """Before the body: a registration needs the enrollment token in its header
        (checked against the cached token when that is fresh), an upload a user
        who may add boot images. None lets the request through."""
        from starlette.requests import Request

        if method == "POST" and path == "/agent/v1/register":
            scheme, _, value = authorization.decode("latin-1").partition(" ")
            token = value.strip() if scheme.lower() == "bearer" and value.strip() else None
            cache = getattr(self.fastapi_app.state, "enrollment", None)
            known = cache.peek(token) if cache is not None and token is not None else None
            if token is None or known is False:
                return 401, "unauthorized", "wrong or missing enrollment token", []
            return None
        if (method, path) == ("POST", "/api/v1/boot-images"):
            from qrm_core.api.deps import require
            from qrm_core.models import Role

            request = Request(scope)
            try:
                await run_in_threadpool(require(Role.OPERATOR), request)
            except QrmError as exc:
                headers: list[tuple[bytes, bytes]] = []
                if isinstance(exc, AuthError):
                    headers.append((b"www-authenticate", b'Basic realm="qrm"'))
                retry = exc.details.get("retry_after") if exc.details else None
                if retry is not None:
                    headers.append((b"retry-after", str(retry).encode()))
                return exc.http_status, exc.code, exc.message, headers
        return None
