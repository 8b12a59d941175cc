"""Log files: ``qrm.log`` (what qrm does) and ``audit.log`` (who did what), one
line per event, in the configured log directory."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qrm_core.config import Settings

_FORMAT = "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s"
_configured: Path | None = None


class _OneLine(logging.Formatter):
    """Keeps every record on one line: tracebacks are folded with ' | '."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.replace("\r", "").replace("\n", " | ")


def configure_logging(settings: Settings) -> Path | None:
    """Send qrm's log records to files in the log directory. Idempotent.

    Returns the log directory, or None if it cannot be written (then logs go
    nowhere rather than failing the command).
    """
    global _configured
    log_dir = settings.effective_log_dir
    if _configured == log_dir:
        return log_dir
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        main = logging.handlers.WatchedFileHandler(log_dir / "qrm.log", encoding="utf-8")
        audit = logging.handlers.WatchedFileHandler(log_dir / "audit.log", encoding="utf-8")
    except OSError:
        return None
    main.setFormatter(_OneLine(_FORMAT))
    audit.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("qrm")
    for handler in list(root.handlers):
        if getattr(handler, "_qrm", False):
            root.removeHandler(handler)
            handler.close()
    audit_logger = logging.getLogger("qrm.audit")
    for handler in list(audit_logger.handlers):
        if getattr(handler, "_qrm", False):
            audit_logger.removeHandler(handler)
            handler.close()
    main._qrm = True  # type: ignore[attr-defined]
    audit._qrm = True  # type: ignore[attr-defined]
    root.addHandler(main)
    root.setLevel(getattr(logging, settings.log_level.upper(), logging.INFO))
    audit_logger.addHandler(audit)
    audit_logger.setLevel(logging.INFO)
    audit_logger.propagate = False
    _configured = log_dir
    return log_dir


def log_file(settings: Settings) -> Path:
    return settings.effective_log_dir / "qrm.log"
