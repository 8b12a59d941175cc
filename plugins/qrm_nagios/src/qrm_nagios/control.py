"""Nagios's external command pipe: reloads, forced checks and qrm's passive results.

The pipe (``command_file``) is a FIFO Nagios reads. It is opened without
blocking: when no Nagios reads it (stopped, crashed, never started) the open
fails at once and the caller learns that Nagios is not running, instead of
hanging. Lines are written in pieces of at most ``PIPE_BUF`` bytes, each
ending a line, so that lines of other writers are never interleaved with ours.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from collections.abc import Iterable
from pathlib import Path

from qrm_core.plugin_api import PluginError

PIPE_BUF = 4096
#: What may not appear in a command field (field separator, line end, perfdata bar).
_FIELD = re.compile(r"[\x00-\x1f\x7f;|]")


def field(text: str) -> str:
    """One field of an external command: its separators and line ends become spaces."""
    return _FIELD.sub(" ", text).strip()


def command(name: str, *args: object, now: float | None = None) -> str:
    stamp = int(now if now is not None else time.time())
    return f"[{stamp}] " + ";".join([name, *(field(str(a)) for a in args)])


def reader_present(path: Path) -> bool:
    """Whether a Nagios reads the pipe now."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return False
    os.close(fd)
    return True


def send(path: Path | None, lines: Iterable[str], *, timeout: float = 30.0) -> bool:
    """Write command lines to the pipe; False (nothing written) when no Nagios reads it."""
    if path is None:
        return False
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise PluginError(f"cannot use Nagios's command pipe {path}: {exc.strerror}") from None
    if not stat.S_ISFIFO(mode):
        raise PluginError(f"{path} is not a pipe (Nagios's command_file)")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT):
            return False
        raise PluginError(f"cannot open Nagios's command pipe {path}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + timeout
        for chunk in _chunks(lines):
            view = memoryview(chunk)
            while view:
                try:
                    written = os.write(fd, view)
                except BlockingIOError:
                    # Nagios's buffer is full: it reads on; wait a moment.
                    if time.monotonic() > deadline:
                        raise PluginError(
                            f"Nagios did not read its command pipe {path} for {timeout:.0f} s"
                        ) from None
                    time.sleep(0.01)
                    continue
                except BrokenPipeError:
                    return False
                view = view[written:]
    finally:
        os.close(fd)
    return True


def _chunks(lines: Iterable[str]) -> Iterable[bytes]:
    buffer = bytearray()
    for line in lines:
        raw = (line.rstrip("\n") + "\n").encode()
        if len(raw) > PIPE_BUF:
            raw = raw[: PIPE_BUF - 1] + b"\n"
        if len(buffer) + len(raw) > PIPE_BUF:
            yield bytes(buffer)
            buffer.clear()
        buffer += raw
    if buffer:
        yield bytes(buffer)
