"""Auto images: filled when a VE that uses one is first asked to run.

An image added with ``--auto`` (:func:`qrm_core.services.images.add_auto_image`)
is empty until then. Each pass, this step finds the auto images not filled yet
that a running-wanted VE uses and fills each in a thread of its own (a copy or
an archive can take minutes; the pass does not wait). The fill holds the
image's job lock, so two passes, two servers on one machine or two VEs on the
image fill it once. Placement meanwhile gives no machine to a VE whose image is
not ready, and says why ("creating its filesystem image NAME: 45%, ...").
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import TYPE_CHECKING

from qrm_core.engine.common import TickReport
from qrm_core.services import ServiceContext, service_context

if TYPE_CHECKING:
    from qrm_core.config import Settings
    from qrm_core.plugins import PluginSystem

log = logging.getLogger("qrm.engine")


class AutoImages:
    name = "auto-images"

    def __init__(self) -> None:
        self.threads: dict[str, threading.Thread] = {}

    def run(self, ctx: ServiceContext, now: datetime, report: TickReport) -> None:
        from qrm_core.services.images import auto_images_wanted

        wanted = auto_images_wanted(ctx)
        ctx.rollback()
        for name in wanted:
            running = self.threads.get(name)
            if running is not None and running.is_alive():
                continue
            thread = threading.Thread(
                target=self._fill, args=(ctx.settings, ctx.plugins, name), name=f"fill-{name}", daemon=True
            )
            self.threads[name] = thread
            thread.start()

    @staticmethod
    def _fill(settings: Settings, plugins: PluginSystem, name: str) -> None:
        from qrm_core.services.images import fill_auto_image

        try:
            with service_context(settings, actor="engine", plugins=plugins) as ctx:
                fill_auto_image(ctx, name)
        except Exception as exc:  # noqa: BLE001 - recorded on the image and as an event
            log.warning("filling filesystem image %s failed: %s", name, exc)

    def join(self, timeout: float = 60.0) -> None:
        """Wait for the fills started so far (tests)."""
        for thread in list(self.threads.values()):
            thread.join(timeout)
