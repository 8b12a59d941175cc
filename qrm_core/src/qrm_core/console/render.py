"""Templates (Jinja2, autoescaped) and what plugins contribute to pages."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2

from qrm_core import __version__
from qrm_core.context import ConsoleLink, ConsolePanel

HERE = Path(__file__).parent
STATUSES = ("ok", "warning", "critical", "unknown")

#: The menu, grouped as openQRM's: (section, label, URL, role needed).
MENU: list[tuple[str, list[tuple[str, str, str, str]]]] = [
    ("", [("dashboard", "Dashboard", "/", "viewer")]),
    (
        "Management Tools",
        [
            ("resources", "Resources", "/resources", "viewer"),
            ("ves", "Virtual Environments", "/ves", "viewer"),
            ("storage", "Storage/Server", "/storage", "viewer"),
            ("fs", "Filesystem Images", "/filesystem-images", "viewer"),
            ("boot", "Boot Images", "/boot-images", "viewer"),
        ],
    ),
    (
        "System",
        [
            ("events", "Events", "/events", "viewer"),
            ("plugins", "Plugins", "/plugins", "viewer"),
            ("users", "Users", "/users", "admin"),
            ("account", "My account and API tokens", "/account", "viewer"),
        ],
    ),
]


def _ago(value: datetime | None) -> str:
    if value is None:
        return "never"
    seconds = (datetime.now(UTC) - value).total_seconds()
    if seconds < 0:
        seconds = 0
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _mb(value: int | None) -> str:
    if not value:
        return "-"
    return f"{value / 1024:.1f} GB" if value >= 1024 else f"{value} MB"


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["ago"] = _ago
    env.filters["when"] = _when
    env.filters["mb"] = _mb
    env.filters["q"] = lambda value: quote(str(value), safe="")
    env.globals["menu"] = MENU
    env.globals["version"] = __version__
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


def _safe_url(url: str) -> bool:
    """Links plugins give must be http(s) or local paths: never javascript: or data:."""
    if url.startswith("/") and not url.startswith("//"):
        return True
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def safe_links(links: list[Any]) -> list[ConsoleLink]:
    return [link for link in links if isinstance(link, ConsoleLink) and _safe_url(link.url)]


def safe_panels(panels: list[Any]) -> list[ConsolePanel]:
    kept = []
    for panel in panels:
        if not isinstance(panel, ConsolePanel):
            continue
        links = tuple(link for link in panel.links if isinstance(link, ConsoleLink) and _safe_url(link.url))
        status = panel.status if panel.status in STATUSES else ""
        kept.append(ConsolePanel(title=panel.title, rows=tuple(panel.rows), status=status, links=links))
    return kept


class SmallCache:
    """A few values pages show on every request, kept for some seconds."""

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self._values: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            found = self._values.get(key)
        if found is None or time.monotonic() - found[0] > self.ttl:
            return None
        return found[1]

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._values[key] = (time.monotonic(), value)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
