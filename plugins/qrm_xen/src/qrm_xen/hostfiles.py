"""Files on a Xen host: written locally (``xen:///system``, the host is this
machine) or over ssh (``xen+ssh://root@HOST/system``: the same account and key
libvirt's ssh transport uses).

Paths are checked by the caller; every word of a remote command is quoted
(``shlex.quote``) anyway, and file contents travel on stdin, never on the
command line.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, urlsplit

from qrm_core.plugin_api import DriverError


class HostFiles(Protocol):
    #: How errors name the host.
    where: str

    def write(self, path: str, text: str) -> None:
        """Replace ``path`` with ``text`` atomically (mode 0644), creating its directory."""

    def remove(self, path: str) -> None:
        """Remove ``path``; a missing file is fine."""

    def symlink(self, target: str, link: str) -> None:
        """Make ``link`` a symbolic link to ``target`` (replacing what was there)."""

    def read(self, path: str) -> str | None:
        """The file's text, None if it does not exist."""


@dataclass
class LocalFiles:
    where: str = "this machine"

    def write(self, path: str, text: str) -> None:
        target = Path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(text)
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise DriverError(f"cannot write {path} on {self.where}: {exc.strerror}") from None

    def remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise DriverError(f"cannot remove {path} on {self.where}: {exc.strerror}") from None

    def symlink(self, target: str, link: str) -> None:
        try:
            Path(link).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{link}.qrm-new"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.symlink(target, tmp)
            os.replace(tmp, link)
        except OSError as exc:
            raise DriverError(f"cannot link {link} on {self.where}: {exc.strerror}") from None

    def read(self, path: str) -> str | None:
        try:
            return Path(path).read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DriverError(f"cannot read {path} on {self.where}: {exc.strerror}") from None


@dataclass
class SshFiles:
    """Files on ``user@host`` through the ``ssh`` command (batch mode: no prompts)."""

    user: str
    host: str
    port: int | None = None
    keyfile: str | None = None
    known_hosts: str | None = None
    timeout: int = 15
    where: str = ""

    def __post_init__(self) -> None:
        if not self.where:
            self.where = f"host {self.host}"

    def argv(self, script: str) -> list[str]:
        argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.timeout}"]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.keyfile:
            argv += ["-i", self.keyfile]
        if self.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
        return [*argv, "--", f"{self.user}@{self.host}", script]

    def _run(self, script: str, what: str, stdin: str = "") -> str:
        try:
            done = subprocess.run(
                self.argv(script),
                input=stdin,
                capture_output=True,
                text=True,
                timeout=self.timeout + 30,
                check=False,
            )
        except FileNotFoundError:
            raise DriverError(f"cannot {what} on {self.where}: the ssh command is missing") from None
        except subprocess.TimeoutExpired:
            raise DriverError(f"cannot {what} on {self.where}: ssh did not finish") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit status {done.returncode}"
            raise DriverError(f"cannot {what} on {self.where}: {reason}")
        return done.stdout

    def write(self, path: str, text: str) -> None:
        directory = os.path.dirname(path) or "/"
        tmp = f"{directory.rstrip('/')}/.{os.path.basename(path)}.qrm-new"
        q = shlex.quote
        script = f"umask 022 && mkdir -p {q(directory)} && cat > {q(tmp)} && mv -f {q(tmp)} {q(path)}"
        self._run(script, f"write {path}", stdin=text)

    def remove(self, path: str) -> None:
        self._run(f"rm -f {shlex.quote(path)}", f"remove {path}")

    def symlink(self, target: str, link: str) -> None:
        q = shlex.quote
        directory = os.path.dirname(link) or "/"
        self._run(f"mkdir -p {q(directory)} && ln -sfn {q(target)} {q(link)}", f"link {link}")

    def read(self, path: str) -> str | None:
        q = shlex.quote(path)
        out = self._run(f"if [ -e {q} ]; then echo y; cat {q}; else echo n; fi", f"read {path}")
        if out.startswith("n"):
            return None
        return out[2:]


def files_for(uri: str, label: str) -> HostFiles:
    """Where a host's files are: this machine for a URI without a remote host, else ssh."""
    parts = urlsplit(uri)
    if not parts.hostname:
        return LocalFiles(where=f"host {label}")
    transport = parts.scheme.partition("+")[2]
    params = dict(parse_qsl(parts.query))
    return SshFiles(
        user=parts.username or "root",
        host=parts.hostname,
        port=parts.port if transport in ("ssh", "libssh", "libssh2") else None,
        keyfile=params.get("keyfile"),
        known_hosts=params.get("known_hosts"),
        where=f"host {label}",
    )
