"""Running commands on a storage server: this machine, or another one over SSH.

A storage server qrm manages remotely (``qrm storage set NAME --ssh-key FILE
--ssh-user USER``) is reached with OpenSSH's client and a key qrm keeps in its
data directory; one without SSH settings is this machine. Drivers do not care
which: they hand a :class:`Runner` a POSIX shell script and read its output.

* The script goes to ``sh -s`` on **standard input**, locally as over SSH: no
  value of it (a CHAP secret, a path) appears on this machine's process list,
  and one script is one round trip however many commands it holds (a batch of
  exports is one SSH connection, not one per export).
* Every value a driver puts into a script goes through :func:`shell_quote`
  (``shlex.quote``) after the driver validated it; nothing a user typed is
  ever spliced in raw.
* The host key of a remote server is pinned on first use (OpenSSH's
  ``accept-new``) in a known-hosts file of its own, or given beforehand
  (``--ssh-host-key``); a changed key is refused.
* Errors are one line (:class:`~qrm_core.errors.DriverError`) naming the
  server: unreachable, key refused, host key changed, a command missing.
  Secrets a caller names are cut out of every message.

Storage server settings read here (strings, ``StorageTarget.settings``):
``ssh_user`` (its presence makes the server remote), ``ssh_port`` (22).
Files, named after the storage server: ``<data_dir>/keys/storage-<name>.key``
(the private key, mode 0600) and ``storage-<name>.known_hosts``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from qrm_core.errors import DriverError, InvalidInput

if TYPE_CHECKING:
    from qrm_core.config import Settings
    from qrm_core.drivers.base import StorageTarget

SSH_SETTINGS = ("ssh_user", "ssh_port")
_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: How long a connection may take to come up, and a script to finish, by default.
CONNECT_TIMEOUT = 10
TIMEOUT = 120.0


def shell_quote(value: str | int) -> str:
    """A value as one shell word (validate it first; this is the second line of defence)."""
    return shlex.quote(str(value))


@dataclass(frozen=True)
class RunResult:
    """What a script did: its exit status and output (text)."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def last_error(self) -> str:
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else f"exit status {self.returncode}"


class Runner(Protocol):
    """Where a storage driver's commands run."""

    #: For messages: ``this machine`` or ``root@10.0.11.35``.
    where: str

    def script(
        self, text: str, *, timeout: float = TIMEOUT, secrets: Iterable[str] = ()
    ) -> RunResult:  # pragma: no cover - protocol
        """Run ``text`` with ``sh -s``; a connection failure raises DriverError."""
        ...

    def session(self, *, timeout: float = TIMEOUT) -> Session:  # pragma: no cover - protocol
        """One ``sh -s`` fed in parts (:class:`Session`): what one part sets up (a
        lock, a variable) holds for the next, and Python decides in between."""
        ...

    def upload(self, local: Path, path: str, *, timeout: float = 6 * 3600) -> None:  # pragma: no cover
        """Copy the file ``local`` to ``path`` on the server (mode 0600; ``path`` is
        validated by the caller and quoted here)."""
        ...

    def stream(self, command: str, *, stdin: Any = None, stdout: Any = None, stderr: Any = None) -> Any:
        """Start ``command`` (one shell command line, its values quoted by the caller)
        there with the given standard streams (``subprocess.PIPE``, a file) and return
        the running :class:`subprocess.Popen` (bytes): for data that flows through
        this machine, such as a tree copied from one storage server to another."""
        ...


class Session:
    """A shell on the server fed in parts: :meth:`send` a part that ends by printing a
    marker line, :meth:`until` reads its output up to the marker, and the next part
    is decided on that output. The shell lives as long as the session, so a lock one
    part takes (``flock``) holds until :meth:`close`. Used as a context manager, a
    session that ends by an error is cut off (its shell gets end of input)."""

    def __init__(self, argv: list[str], where: str, timeout: float, ssh_failure: Any = None) -> None:
        import tempfile

        self.where = where
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self._ssh_failure = ssh_failure
        self._stderr = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                bufsize=0,
                start_new_session=True,
            )
        except OSError as exc:
            self._stderr.close()
            raise DriverError(f"cannot run a shell on {where}: {exc.strerror}") from None
        self._buffer = b""

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text.encode())
        except BrokenPipeError:
            self._fail("the shell ended early")

    def until(self, marker: str) -> str:
        """The output up to the line ``marker`` (which is not returned)."""
        import select

        assert self.proc.stdout is not None
        wanted = marker.encode() + b"\n"
        while True:
            at = self._buffer.find(wanted)
            if at != -1 and (at == 0 or self._buffer[at - 1 : at] == b"\n"):
                found, self._buffer = self._buffer[:at], self._buffer[at + len(wanted) :]
                return found.decode(errors="replace")
            left = self.deadline - time.monotonic()
            if left <= 0:
                self._fail(f"no answer within {self.timeout:g} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    self._fail("the shell ended early")
                self._buffer += chunk

    def _fail(self, why: str) -> None:
        self.abort()
        stderr = self._read_stderr()
        if self._ssh_failure is not None and self.proc.returncode == 255:
            raise self._ssh_failure(stderr)
        lines = [line for line in stderr.splitlines() if line.strip()]
        raise DriverError(f"a command on {self.where} failed: {lines[-1] if lines else why}")

    def _read_stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def abort(self) -> None:
        """End the shell now (what it did so far stays done; its lock is released)."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> RunResult:
        """End of input: the shell finishes what it was given; its status and the rest of its output."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        rest = self.proc.stdout.read()
        try:
            self.proc.wait(max(self.deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        result = RunResult(
            self.proc.returncode, (self._buffer + rest).decode(errors="replace"), self._read_stderr()
        )
        self._stderr.close()
        return result

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.abort()
        for stream in (self.proc.stdout,):
            if stream is not None:
                stream.close()
        if not self._stderr.closed:
            self._stderr.close()


def cow_probe(directory: str) -> str:
    """Shell that finds how copies under ``directory`` are made on that machine: sets
    ``$how`` to ``copy-on-write`` where ``cp --reflink`` works there (XFS with
    reflink, btrfs), else ``full copy``, and ``$cpopt`` to the matching cp option
    (``--reflink=always``, or ``--sparse=always``). Storage drivers use it for
    snapshots, clones and reverts that cost what the filesystem allows."""
    d = shell_quote(directory)
    return (
        f'probe={d}/.qrm-cow-probe.$$; rm -f "$probe" "$probe.2"; echo x > "$probe" && '
        'if cp --reflink=always "$probe" "$probe.2" 2>/dev/null; then how=copy-on-write; cpopt=--reflink=always; '
        "else how='full copy'; cpopt=--sparse=always; fi; "
        'rm -f "$probe" "$probe.2"'
    )


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "********")
    return text


def _clip(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LocalRunner:
    """This machine (the storage server has no SSH settings)."""

    where = "this machine"

    def script(self, text: str, *, timeout: float = TIMEOUT, secrets: Iterable[str] = ()) -> RunResult:
        try:
            done = subprocess.run(
                ["sh", "-s"], input=text, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise DriverError(f"a command on {self.where} did not finish within {timeout:g} s") from None
        except OSError as exc:
            raise DriverError(f"cannot run sh on {self.where}: {exc.strerror}") from None
        return RunResult(done.returncode, _redact(done.stdout, secrets), _redact(done.stderr, secrets))

    def session(self, *, timeout: float = TIMEOUT) -> Session:
        return Session(["sh", "-s"], self.where, timeout)

    def stream(self, command: str, *, stdin: Any = None, stdout: Any = None, stderr: Any = None) -> Any:
        return subprocess.Popen(["sh", "-c", command], stdin=stdin, stdout=stdout, stderr=stderr)

    def upload(self, local: Path, path: str, *, timeout: float = 6 * 3600) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out, open(local, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        except OSError as exc:
            raise DriverError(f"cannot copy {local} to {path} on {self.where}: {exc.strerror}") from None


@dataclass(frozen=True)
class SshAccess:
    """How qrm reaches a storage server over SSH."""

    host: str
    user: str
    port: int
    key_file: Path
    known_hosts: Path


#: What OpenSSH says, and what qrm tells the user instead (first match wins).
_SSH_PROBLEMS = (
    ("Permission denied", "the server refused qrm's SSH key (is it in {user}'s authorized_keys?)"),
    (
        "REMOTE HOST IDENTIFICATION HAS CHANGED",
        "its SSH host key is not the one qrm pinned (refused; see {known})",
    ),
    ("Host key verification failed", "its SSH host key is not the one qrm pinned (refused; see {known})"),
    ("Connection refused", "nothing listens on its SSH port {port}"),
    ("Connection timed out", "it does not answer on its SSH port {port}"),
    ("No route to host", "no route to it"),
    ("Network is unreachable", "its network is unreachable from here"),
    ("Could not resolve hostname", "its address cannot be resolved"),
    ("Load key", "qrm's SSH key for it cannot be read ({key})"),
)


class SshRunner:
    """Another machine, through OpenSSH's client with qrm's key for it."""

    def __init__(self, access: SshAccess, storage_name: str) -> None:
        self.access = access
        self.storage_name = storage_name
        host = f"[{access.host}]" if ":" in access.host else access.host
        self.where = f"{access.user}@{host}" + (f":{access.port}" if access.port != 22 else "")

    def argv(self) -> list[str]:
        ssh = shutil.which("ssh")
        if ssh is None:
            raise DriverError("cannot reach remote storage servers: ssh is not installed (openssh-client)")
        a = self.access
        return [
            ssh,
            "-F",
            "none",
            "-T",
            "-i",
            str(a.key_file),
            "-p",
            str(a.port),
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={a.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            f"ConnectTimeout={CONNECT_TIMEOUT}",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "LogLevel=ERROR",
            "-l",
            a.user,
            "--",
            a.host,
            "sh -s",
        ]

    def script(self, text: str, *, timeout: float = TIMEOUT, secrets: Iterable[str] = ()) -> RunResult:
        a = self.access
        if not a.key_file.is_file():
            raise DriverError(
                f"storage server {self.storage_name} has no SSH key; "
                f"set one with 'qrm storage set {self.storage_name} --ssh-key FILE'"
            )
        try:
            done = subprocess.run(
                self.argv(), input=text, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise DriverError(
                f"storage server {self.storage_name} ({self.where}) did not finish within {timeout:g} s"
            ) from None
        stdout, stderr = _redact(done.stdout, secrets), _redact(done.stderr, secrets)
        if done.returncode == 255:
            # ssh's own failure (the remote command's status is passed through otherwise).
            raise DriverError(
                f"cannot reach storage server {self.storage_name} ({self.where}): {self._why(stderr)}"
            )
        return RunResult(done.returncode, stdout, stderr)

    def session(self, *, timeout: float = TIMEOUT) -> Session:
        if not self.access.key_file.is_file():
            raise DriverError(
                f"storage server {self.storage_name} has no SSH key; "
                f"set one with 'qrm storage set {self.storage_name} --ssh-key FILE'"
            )

        def failure(stderr: str) -> DriverError:
            return DriverError(
                f"cannot reach storage server {self.storage_name} ({self.where}): {self._why(stderr)}"
            )

        return Session(self.argv(), self.where, timeout, failure)

    def stream(self, command: str, *, stdin: Any = None, stdout: Any = None, stderr: Any = None) -> Any:
        if not self.access.key_file.is_file():
            raise DriverError(f"storage server {self.storage_name} has no SSH key")
        argv = self.argv()
        argv[-1] = command
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr)

    def upload(self, local: Path, path: str, *, timeout: float = 6 * 3600) -> None:
        """``cat > PATH`` on the server, the file on standard input."""
        if not self.access.key_file.is_file():
            raise DriverError(f"storage server {self.storage_name} has no SSH key")
        argv = self.argv()
        argv[-1] = f"umask 077 && cat > {shell_quote(path)}"
        with open(local, "rb") as src:
            try:
                done = subprocess.run(argv, stdin=src, capture_output=True, timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                raise DriverError(
                    f"copying {local.name} to {self.where} took longer than {timeout:g} s"
                ) from None
        if done.returncode == 255:
            raise DriverError(
                f"cannot reach storage server {self.storage_name} ({self.where}): "
                f"{self._why(done.stderr.decode(errors='replace'))}"
            )
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            raise DriverError(f"cannot write {path} on {self.where}: {lines[-1] if lines else 'cat failed'}")

    def _why(self, stderr: str) -> str:
        a = self.access
        for needle, said in _SSH_PROBLEMS:
            if needle in stderr:
                return said.format(user=a.user, port=a.port, known=a.known_hosts, key=a.key_file)
        lines = [line for line in stderr.splitlines() if line.strip()]
        return _clip(lines[-1]) if lines else "ssh failed"


# ---------------------------------------------------------------------------
# A storage server's SSH settings
# ---------------------------------------------------------------------------


def keys_dir(data_dir: Path) -> Path:
    return data_dir / "keys"


def key_file(data_dir: Path, storage_name: str) -> Path:
    """Where qrm keeps the private key it uses for a storage server."""
    return keys_dir(data_dir) / f"storage-{storage_name}.key"


def known_hosts_file(data_dir: Path, storage_name: str) -> Path:
    """The pinned host key of a storage server."""
    return keys_dir(data_dir) / f"storage-{storage_name}.known_hosts"


def is_remote_storage(settings: Mapping[str, str]) -> bool:
    return bool(settings.get("ssh_user"))


def check_user(user: str) -> str:
    if not isinstance(user, str) or not _USER.match(user):
        raise InvalidInput(
            f"SSH user {user!r} is not a user name (lower-case letters, digits, '_', '.', '-')"
        )
    return user


def check_port(port: str | int) -> int:
    text = str(port).strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise InvalidInput(f"SSH port {port!r} must be a number from 1 to 65535")
    return int(text)


def ssh_access(data_dir: Path, storage_name: str, address: str, settings: Mapping[str, str]) -> SshAccess:
    if not _NAME.match(storage_name):
        raise InvalidInput(f"invalid storage server name {storage_name!r}")
    return SshAccess(
        host=address,
        user=check_user(settings["ssh_user"]),
        port=check_port(settings.get("ssh_port", "22")),
        key_file=key_file(data_dir, storage_name),
        known_hosts=known_hosts_file(data_dir, storage_name),
    )


def runner_for(data_dir: Path, storage_name: str, address: str, settings: Mapping[str, str]) -> Runner:
    """This machine, or the storage server over SSH when it has SSH settings."""
    if is_remote_storage(settings):
        return SshRunner(ssh_access(data_dir, storage_name, address, settings), storage_name)
    return LocalRunner()


def storage_runner(settings: Settings, storage: StorageTarget) -> Runner:
    """Where a storage driver's commands for ``storage`` run (this machine, or over SSH)."""
    return runner_for(settings.data_dir, storage.name, storage.address, storage.settings)


def install_key(data_dir: Path, storage_name: str, key_text: str) -> Path:
    """Keep a private key for a storage server (mode 0600, replaced atomically).

    The text must be an OpenSSH or PEM private key; it is never echoed back."""
    if not _NAME.match(storage_name):
        raise InvalidInput(f"invalid storage server name {storage_name!r}")
    text = key_text.strip()
    if not (text.startswith("-----BEGIN ") and "PRIVATE KEY-----" in text.splitlines()[0]):
        raise InvalidInput("the SSH key must be a private key file (-----BEGIN ... PRIVATE KEY-----)")
    if len(text) > 64 * 1024:
        raise InvalidInput("the SSH key file is too large to be a private key")
    directory = keys_dir(data_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = key_file(data_dir, storage_name)
    tmp = directory / f".{target.name}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")
    os.replace(tmp, target)
    return target


def pin_host_key(data_dir: Path, storage_name: str, address: str, port: int, line: str) -> None:
    """Pin a storage server's host key (``TYPE BASE64``, as in a ``.pub`` file or ssh-keyscan)."""
    parts = line.split()
    if len(parts) >= 3 and not parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
        parts = parts[1:]  # a known_hosts line: drop its host field
    if len(parts) < 2 or not re.match(r"^(ssh-[a-z0-9-]+|ecdsa-sha2-nistp\d+|sk-[a-z0-9@.-]+)$", parts[0]):
        raise InvalidInput(
            "the SSH host key must be 'TYPE BASE64' (a host's .pub file or an ssh-keyscan line)"
        )
    if not re.match(r"^[A-Za-z0-9+/]+=*$", parts[1]):
        raise InvalidInput("the SSH host key's base64 part is malformed")
    host = address if port == 22 else f"[{address}]:{port}"
    directory = keys_dir(data_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    known_hosts_file(data_dir, storage_name).write_text(f"{host} {parts[0]} {parts[1]}\n")


def forget(data_dir: Path, storage_name: str) -> None:
    """Remove the key and pinned host key of a storage server (it was removed, or made local)."""
    for path in (key_file(data_dir, storage_name), known_hosts_file(data_dir, storage_name)):
        path.unlink(missing_ok=True)


#: tar as core runs it on storage servers: owners as numbers, modes, extended attributes.
TAR = "tar --numeric-owner --xattrs --xattrs-include='*'"


def copy_tree(
    source: Runner,
    src: str,
    dest: Runner,
    dst: str,
    *,
    report: Any = None,
    every: float = 1.0,
) -> int:
    """Copy the files of the directory ``src`` (on ``source``'s machine) into the
    directory ``dst`` (on ``dest``'s): a tar stream read there and unpacked here,
    through this machine, so the two servers need not reach each other. Owners
    (as numbers), modes, hard and symbolic links and extended attributes are kept.
    ``report(copied_bytes, seconds)`` is called about every ``every`` seconds.
    Returns the bytes that went through; a failure on either side is a one-line
    DriverError naming the server."""
    import tempfile

    started = time.monotonic()
    copied = 0
    with tempfile.TemporaryFile() as reader_err, tempfile.TemporaryFile() as writer_err:
        writer = dest.stream(
            f"{TAR} -xpf - -C {shell_quote(dst)}",
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=writer_err,
        )
        try:
            reader = source.stream(
                f"cd {shell_quote(src)} && {TAR} -cpf - .",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=reader_err,
            )
        except BaseException:
            writer.kill()
            writer.wait()
            raise
        last = started
        try:
            assert reader.stdout is not None and writer.stdin is not None
            while chunk := reader.stdout.read(1 << 20):
                writer.stdin.write(chunk)
                copied += len(chunk)
                now = time.monotonic()
                if report is not None and now - last >= every:
                    last = now
                    report(copied, now - started)
            writer.stdin.close()
        except BrokenPipeError:
            pass  # the writer ended early: its status says why
        except BaseException:
            for process in (reader, writer):
                process.kill()
                process.wait()
            raise
        finally:
            reader_status = reader.wait()
            with contextlib.suppress(BrokenPipeError):
                if writer.stdin is not None:
                    writer.stdin.close()
            writer_status = writer.wait()
        sides = [
            (reader_status, source, reader_err, f"reading {src}"),
            (writer_status, dest, writer_err, f"writing {dst}"),
        ]
        if reader_status in (-13, 141, 2) and writer_status != 0:
            sides.reverse()  # the reader died of the writer's end (SIGPIPE): the writer says why
        for status, runner, errors, doing in sides:
            if status != 0:
                errors.seek(0)
                lines = [line for line in errors.read().decode(errors="replace").splitlines() if line.strip()]
                why = lines[-1] if lines else f"exit status {status}"
                if status == 255 and not isinstance(runner, LocalRunner):
                    raise DriverError(f"cannot reach {runner.where} ({doing}): {_clip(why)}")
                raise DriverError(f"{doing} on {runner.where} failed: {_clip(why)}")
    if report is not None:
        report(copied, time.monotonic() - started)
    return copied
