"""Small operating-system helpers: atomic files, running checks, network namespaces.

A DHCP server reads its configuration when it starts, so a half-written file
left by a crash would keep the next start from working. Every file here is
written next to its destination, flushed to disk, checked, and renamed over
the old one: readers see the old file or the new one, never a mix.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from qrm_core.plugin_api import PluginError

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")


def write_temp(path: Path, data: str | bytes, *, mode: int = 0o600) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` (flushed to disk); return its path.

    The new file takes the mode and owner of the file it will replace (a
    server run by someone else, e.g. Debian's Kea as ``_kea``, must still be
    able to read it); a first file gets ``mode``. Configuration files hold
    secrets (the OMAPI key, a database password), hence 0600 by default.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            old = path.stat()
        except FileNotFoundError:
            os.chmod(name, mode)
        else:
            os.chmod(name, old.st_mode & 0o7777)
            if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                try:
                    os.chown(name, old.st_uid, old.st_gid)
                except PermissionError:
                    pass
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def swap(temp: Path, path: Path) -> None:
    """Rename ``temp`` over ``path`` (atomic on one filesystem) and flush the directory entry."""
    os.replace(temp, path)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: Path, data: str | bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically."""
    swap(write_temp(path, data, mode=mode), path)


def netns_prefix(netns: str | None) -> list[str]:
    """The command prefix that runs a program in the namespace (nothing without one)."""
    return ["ip", "netns", "exec", netns] if netns else []


def run_check(argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a configuration check; return its exit status and its output (stdout + stderr)."""
    try:
        proc = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            env=env,
            check=False,
        )
    except FileNotFoundError:
        raise PluginError(f"{argv[0]} is not installed (needed to check the DHCP configuration)") from None
    except subprocess.TimeoutExpired:
        raise PluginError(f"{argv[0]} did not finish checking the configuration in {timeout:.0f} s") from None
    return proc.returncode, proc.stdout.decode(errors="replace")


def check_netns(netns: str | None) -> None:
    """Fail with one line if the configured namespace does not exist."""
    if netns and not (NETNS_DIR / netns).exists():
        raise PluginError(f"network namespace {netns!r} does not exist (QRM_DHCPD_NETNS)")


def run_in_netns(netns: str | None, func: Callable[[], T]) -> T:
    """Call ``func`` with the calling thread's network namespace set to ``netns``.

    Used to open TCP connections (OMAPI) to a DHCP server that lives in its
    own namespace. A socket belongs to the namespace it was created in, so the
    connection keeps working from any thread afterwards. ``setns`` changes
    only the calling thread; a short-lived thread does the work so this
    process's own threads never change namespace.
    """
    if not netns:
        return func()
    check_netns(netns)
    result: list[T] = []
    failure: list[BaseException] = []

    def worker() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise PluginError(f"cannot enter network namespace {netns!r}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(func())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=worker, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log file, on one line, for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.strip().splitlines()[-lines:] if line.strip()]
    return " | ".join(kept)
