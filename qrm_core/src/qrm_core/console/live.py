"""Live updates: the event stream, pushed to open pages as server-sent events.

The same stream ``qrm events --follow`` reads (the audit events, read back
with :func:`qrm_core.services.events.list_events` after the last id seen).
One poller per server reads it for every open page (one query per tick,
however many browsers listen) and hands new events to each subscriber; a
page that reconnects says where it stopped (``Last-Event-ID``) and gets what
it missed first.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from qrm_core.models import EventPublic
from qrm_core.services import events, service_context

if TYPE_CHECKING:
    from qrm_core.config import Settings
    from qrm_core.plugins import PluginSystem

log = logging.getLogger("qrm.console")

#: Seconds between reads of the event table while pages listen.
POLL_INTERVAL = 0.2
#: Seconds between keep-alive comments on an idle stream.
KEEPALIVE = 15.0
#: Events replayed to a page that reconnects, at most.
REPLAY_LIMIT = 500


def event_json(event: EventPublic) -> str:
    return json.dumps(
        {
            "id": event.id,
            "time": event.time.strftime("%Y-%m-%d %H:%M:%S"),
            "actor": event.actor,
            "object_type": event.object_type,
            "object_name": event.object_name,
            "level": event.level,
            "message": event.message,
        }
    )


class LiveFeed:
    """Fans the event stream out to the pages listening on this server."""

    def __init__(self, settings: Settings, plugins: PluginSystem, interval: float = POLL_INTERVAL) -> None:
        self.settings = settings
        self.plugins = plugins
        self.interval = interval
        self._queues: set[asyncio.Queue[list[EventPublic] | None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_id = 0
        self._closed = False

    # -- reading the stream ----------------------------------------------

    def _read(self, after_id: int | None, limit: int) -> list[EventPublic]:
        with service_context(
            self.settings, actor="console", plugins=self.plugins, check_schema=False, readonly=True
        ) as ctx:
            found = events.list_events(ctx, limit=limit, after_id=after_id)
            ctx.rollback()
            return found

    def _newest_id(self) -> int:
        newest = self._read(None, 1)
        return newest[-1].id if newest else 0

    async def _poll(self) -> None:
        try:
            self._last_id = await run_in_threadpool(self._newest_id)
            while self._queues and not self._closed:
                await asyncio.sleep(self.interval)
                try:
                    new = await run_in_threadpool(self._read, self._last_id, REPLAY_LIMIT)
                except Exception:  # a database hiccup: the pages wait, the next tick retries
                    log.exception("console: cannot read the event stream")
                    continue
                if new:
                    self._last_id = new[-1].id
                    for queue in list(self._queues):
                        queue.put_nowait(new)
        finally:
            self._task = None

    # -- subscribers -------------------------------------------------------

    async def stream(self, after_id: int | None) -> AsyncIterator[str]:
        """Server-sent events for one page: missed events first, then new ones."""
        queue: asyncio.Queue[list[EventPublic] | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._queues.add(queue)
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._poll())
        try:
            yield "retry: 1000\n\n"
            seen = after_id or 0
            if after_id is not None:
                for event in await run_in_threadpool(self._read, after_id, REPLAY_LIMIT):
                    seen = max(seen, event.id)
                    yield f"id: {event.id}\ndata: {event_json(event)}\n\n"
            while not self._closed:
                try:
                    batch = await asyncio.wait_for(queue.get(), KEEPALIVE)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if batch is None:
                    break
                for event in batch:
                    if event.id > seen:
                        seen = event.id
                        yield f"id: {event.id}\ndata: {event_json(event)}\n\n"
        finally:
            self._queues.discard(queue)

    def close(self) -> None:
        """End every stream (the server is stopping); callable from any thread."""
        self._closed = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def wake() -> None:
            for queue in list(self._queues):
                queue.put_nowait(None)

        try:
            loop.call_soon_threadsafe(wake)
        except RuntimeError:  # the loop has stopped already
            pass

    @property
    def listeners(self) -> int:
        return len(self._queues)


def sse_headers() -> dict[str, Any]:
    return {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
