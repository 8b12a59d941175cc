"""Capturing a running machine's root filesystem over SSH with rsync.

openQRM's "create filesystem image from a live system": qrm logs in to the
machine as root over SSH and rsyncs its root into a volume's directory. The
rsync runs where the volume's files are (:func:`qrm_core.remote.storage_runner`:
this machine, or the storage server over SSH), so the data goes from the
source machine to the storage server directly, never through the qrm server.

* The whole job is one ``sh -s`` script fed on standard input: the key that
  logs in to the source (and the pinned host keys) travel inside it, are
  written to a private temporary directory (mode 0700, removed at the end)
  and never appear on a command line, in a log or in an event.
* The source's host key is pinned on first use in qrm's
  ``<data_dir>/keys/capture.known_hosts`` (OpenSSH's ``accept-new``); a changed
  key is refused in one line, never accepted silently.
* Or a password (openQRM's article types root's password at ssh's prompt): it
  travels inside the same script, is written to a file in that private
  directory and handed to ssh by an askpass helper (``SSH_ASKPASS`` with
  ``SSH_ASKPASS_REQUIRE=force``) that prints it: never on a command line or in
  an environment (only the helper's path is), so never in ``/proc``. When the
  rsync runs on the storage server the password goes there the way the key
  does: inside the script, on the standard input of qrm's SSH session.
  ``NumberOfPasswordPrompts=1``: a wrong password is one refused attempt.
* Login is tried first (``ssh ... true``): an unreachable host, a refused key
  or a changed host key end the job before any volume is made.
* ``rsync -aHAX --numeric-ids --delete --partial`` keeps owners, modes, hard
  links, ACLs and extended attributes; pseudo filesystems and volatile
  directories are excluded (:data:`DEFAULT_EXCLUDES`, their directories kept
  empty), as are the machine's SSH host keys. A capture that was interrupted
  resumes where it stopped when run again (rsync's partial transfers).
* Progress (bytes, files, rate, ETA) comes from ``--info=progress2``.
* Afterwards the tree's machine identity is reset for booting elsewhere
  (:data:`IDENTITY_RESET`).
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import re
import select
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qrm_core.errors import InvalidInput
from qrm_core.remote import Runner, Session, shell_quote

#: What is never copied from a running system (anchored at its root; the
#: directories themselves are kept, empty, as mount points).
DEFAULT_EXCLUDES = (
    "/proc/*",
    "/sys/*",
    "/dev/*",
    "/run/*",
    "/tmp/*",
    "/mnt/*",
    "/media/*",
    "/var/run/*",
    "/var/lock/*",
    "/lost+found",
    "/swapfile",
    "/etc/ssh/ssh_host_*",
)

#: Shell run in the captured tree: the machine's identity is not carried to
#: the machines that boot the image (each makes its own).
IDENTITY_RESET = (
    # systemd makes a new machine-id when the file is empty.
    "if [ -f etc/machine-id ] && [ ! -L etc/machine-id ]; then : > etc/machine-id; fi",
    "if [ -f var/lib/dbus/machine-id ] && [ ! -L var/lib/dbus/machine-id ]; then rm -f var/lib/dbus/machine-id; fi",
    # NIC names bound to the old machine's MACs.
    "rm -f etc/udev/rules.d/70-persistent-net.rules",
    # Leases of the old machine's addresses.
    "rm -f var/lib/dhcp/*.leases var/lib/dhcp/dhclient* var/lib/NetworkManager/*.lease",
)

_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_PATH = re.compile(r"^/([A-Za-z0-9._+@-]+/?)*$")
_PROGRESS = re.compile(
    r"^\s*([\d,]+)\s+(\d+)%\s+(\S+/s)\s+(\d+:\d\d:\d\d)(?:\s+\(xfr#(\d+), (?:ir|to)-chk=(\d+)/(\d+)\))?"
)
MAX_EXCLUDES = 32
#: rsync's status for "some files vanished before they could be transferred": a live system.
RSYNC_VANISHED = 24


@dataclass(frozen=True)
class Source:
    """A machine to capture: ``user@host:path`` (port 22 unless given)."""

    host: str
    path: str = "/"
    user: str = "root"
    port: int = 22

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f" port {self.port}" if self.port != 22 else ""
        return f"{self.user}@{host}:{self.path}{port}"

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


def parse_source(text: str, port: int | None = None) -> Source:
    """``[user@]host:/path`` (the article's ``10.0.11.172:/``); the user is root unless given."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("give the machine to capture as [user@]host:/path (e.g. root@10.0.11.172:/)")
    text = text.strip()
    user = "root"
    if "@" in text:
        user, _, text = text.partition("@")
        if not _USER.match(user):
            raise InvalidInput(f"{user!r} is not a user name to log in as")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise InvalidInput(f"cannot read {text!r}: give [user@]host:/path")
        path = rest[1:]
    else:
        host, sep, path = text.rpartition(":") if text.count(":") == 1 else ("", "", "")
        if not sep:
            raise InvalidInput(f"cannot read {text!r}: give [user@]host:/path (e.g. root@10.0.11.172:/)")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not _HOST.match(host) or ".." in host:
            raise InvalidInput(f"{host!r} is not a host name or address") from None
    if not path.startswith("/") or not _PATH.match(path) or "/../" in path + "/" or "/./" in path + "/":
        raise InvalidInput(
            f"the path to capture {path!r} must be absolute, of letters, digits and '._+@-' (e.g. /)"
        )
    if not path.endswith("/"):
        path += "/"
    checked_port = 22
    if port is not None:
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise InvalidInput(f"SSH port {port!r} must be a number from 1 to 65535")
        checked_port = port
    return Source(host=host, path=path, user=user, port=checked_port)


def check_excludes(patterns: Sequence[str]) -> list[str]:
    """rsync exclude patterns a user added: printable, one line each."""
    checked = []
    if len(patterns) > MAX_EXCLUDES:
        raise InvalidInput(f"at most {MAX_EXCLUDES} --exclude patterns")
    for pattern in patterns:
        if (
            not isinstance(pattern, str)
            or not pattern.strip()
            or len(pattern) > 200
            or any(not (0x21 <= ord(c) <= 0x7E) for c in pattern)
        ):
            raise InvalidInput(
                f"exclude pattern {pattern!r} must be 1-200 printable characters without spaces"
            )
        checked.append(pattern)
    return checked


def check_key(text: str) -> str:
    """A private key (OpenSSH or PEM) to log in to the source with; never echoed."""
    key = (text or "").strip()
    if not key.startswith("-----BEGIN ") or "PRIVATE KEY-----" not in key.splitlines()[0]:
        raise InvalidInput("the identity must be a private key file (-----BEGIN ... PRIVATE KEY-----)")
    if "ENCRYPTED" in key.splitlines()[0] or "Proc-Type: 4,ENCRYPTED" in key:
        raise InvalidInput("the identity is protected by a passphrase; give qrm a key without one")
    if len(key) > 64 * 1024:
        raise InvalidInput("the identity file is too large to be a private key")
    return key + "\n"


MAX_PASSWORD = 1024


def check_password(text: str | None) -> str:
    """A password to log in to the source with: one line of at most 1024 characters."""
    if not isinstance(text, str) or not text:
        raise InvalidInput("the password is empty")
    if len(text) > MAX_PASSWORD:
        raise InvalidInput(f"the password is longer than {MAX_PASSWORD} characters")
    if any(c in text for c in "\n\r\0"):
        raise InvalidInput("the password must be one line (no line break or NUL character)")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise InvalidInput("the password is not valid Unicode text") from None
    return text


def check_host_key(line: str) -> str:
    """``TYPE BASE64`` (a host's .pub file or an ssh-keyscan line, host field dropped)."""
    parts = (line or "").split()
    if len(parts) >= 3 and not parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
        parts = parts[1:]
    if (
        len(parts) < 2
        or not re.match(r"^(ssh-[a-z0-9-]+|ecdsa-sha2-nistp\d+|sk-[a-z0-9@.-]+)$", parts[0])
        or not re.match(r"^[A-Za-z0-9+/]+=*$", parts[1])
    ):
        raise InvalidInput(
            "the source's host key must be 'TYPE BASE64' (its .pub file or an ssh-keyscan line)"
        )
    return f"{parts[0]} {parts[1]}"


def known_hosts_file(data_dir: Path) -> Path:
    """Host keys of the machines qrm captured (pinned on first use)."""
    return data_dir / "keys" / "capture.known_hosts"


def known_hosts_for(data_dir: Path, source: Source, host_key: str | None) -> str:
    """The known-hosts text the job starts from: qrm's pins, with ``host_key`` pinned anew."""
    path = known_hosts_file(data_dir)
    lines = path.read_text().splitlines() if path.exists() else []
    if host_key is not None:
        lines = [line for line in lines if line.split(" ", 1)[0] != source.known_hosts_name]
        lines.append(f"{source.known_hosts_name} {host_key}")
    return "".join(line + "\n" for line in lines if line.strip())


def save_known_hosts(data_dir: Path, text: str) -> None:
    """Keep the pins the job came back with (a host seen for the first time)."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not lines:
        return
    path = known_hosts_file(data_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


@dataclass
class Progress:
    """What a running capture has done (from rsync's ``--info=progress2``)."""

    bytes: int = 0
    percent: int = 0
    rate: str = ""
    eta: str = ""
    files: int = 0
    to_check: int = 0
    total_files: int = 0
    #: The rsync process on the machine it runs on (to interrupt it).
    pid: int | None = None
    phase: str = "logging in"
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        """One line for people: ``1.2 GB, 3,456 files, 45%, 80.1MB/s, ETA 0:00:12``."""
        if self.phase != "copying":
            return self.phase
        done = f"{human_bytes(self.bytes)}, {self.files:,} files"
        if self.total_files:
            done += f", {self.percent}%"
        if self.rate:
            done += f", {self.rate}"
        if self.eta and self.total_files:
            done += f", ETA {self.eta}"
        return done


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def parse_progress(line: str, progress: Progress) -> bool:
    """Read one ``--info=progress2`` line into ``progress``; False if it is not one."""
    match = _PROGRESS.match(line)
    if not match:
        return False
    progress.bytes = int(match.group(1).replace(",", ""))
    progress.percent = int(match.group(2))
    progress.rate = match.group(3)
    progress.eta = match.group(4)
    if match.group(5):
        progress.files = int(match.group(5))
        progress.to_check = int(match.group(6))
        progress.total_files = int(match.group(7))
    return True


@dataclass(frozen=True)
class Outcome:
    """How a capture ended."""

    ok: bool
    #: One line: what failed (empty when ok).
    error: str = ""
    #: The job may be run again to go on (an interruption, a lost connection),
    #: as opposed to a refusal (no room, the source refused us).
    resumable: bool = False
    #: Nothing was copied yet: the source could not be logged in to.
    login_failed: bool = False
    progress: Progress | None = None
    seconds: float = 0.0
    vanished: bool = False


#: OpenSSH's words, and what qrm says instead.
_SSH_PROBLEMS = (
    ("Permission denied", "{src} refused the login (is the key in {user}'s authorized_keys?)"),
    (
        "REMOTE HOST IDENTIFICATION HAS CHANGED",
        "the SSH host key of {host} is not the one qrm pinned (refused; "
        "if the machine was reinstalled, give its new key with --host-key)",
    ),
    (
        "Host key verification failed",
        "the SSH host key of {host} is not the one qrm pinned (refused; "
        "if the machine was reinstalled, give its new key with --host-key)",
    ),
    ("Connection refused", "nothing listens on {host} port {port} (SSH)"),
    ("Connection timed out", "{host} does not answer on port {port} (SSH)"),
    ("No route to host", "no route to {host}"),
    ("Network is unreachable", "{host}'s network is unreachable from the storage server"),
    ("Could not resolve hostname", "{host} cannot be resolved"),
    ("Load key", "the identity cannot be read by ssh"),
    ("rsync: command not found", "{host} has no rsync (install it there)"),
    ("rsync: not found", "{host} has no rsync (install it there)"),
)


def password_refused(source: Source) -> str:
    host = f"[{source.host}]" if ":" in source.host else source.host
    return f"the machine refused the password for {source.user}@{host}"


def explain(stderr: str, source: Source, *, password: bool = False) -> str:
    if password and "Permission denied" in stderr:
        return password_refused(source)
    if password and "ssh_askpass: exec" in stderr:
        return "ssh cannot run qrm's password helper in /tmp (is /tmp mounted noexec there?)"
    for needle, said in _SSH_PROBLEMS:
        if needle in stderr:
            return said.format(src=str(source), user=source.user, host=source.host, port=source.port)
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    text = lines[-1] if lines else "ssh failed"
    return text if len(text) <= 200 else text[:197] + "..."


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def job_script(
    source: Source,
    tree: str,
    key: str,
    known_hosts: str,
    excludes: Sequence[str],
    *,
    login_only: bool = False,
    bwlimit: int | None = None,
    password: str | None = None,
) -> str:
    """The ``sh -s`` script of a capture (or of its login check); logs in with ``key``,
    or with ``password`` when one is given."""
    if password is None:
        auth = "-o BatchMode=yes -o IdentitiesOnly=yes -i $w/id"
        secret = f'printf %s {_b64(key)} | base64 -d > "$w/id"'
    else:
        auth = (
            "-o BatchMode=no -o PubkeyAuthentication=no -o PreferredAuthentications=password,keyboard-interactive "
            "-o NumberOfPasswordPrompts=1"
        )
        # The helper prints the file's password; only its path is in the environment.
        secret = (
            f'printf %s {_b64(password)} | base64 -d > "$w/pw"; '
            """printf '#!/bin/sh\\nexec cat %s/pw\\n' "$w" > "$w/ap"; chmod 700 "$w/ap"; """
            'SSH_ASKPASS="$w/ap"; SSH_ASKPASS_REQUIRE=force; export SSH_ASKPASS SSH_ASKPASS_REQUIRE'
        )
    ssh = (
        f"ssh -F none {auth} -o UserKnownHostsFile=$w/kh "
        "-o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=accept-new -o ConnectTimeout=10 "
        f"-o ServerAliveInterval=15 -o LogLevel=ERROR -p {source.port}"
    )
    lines = [
        "set -u",
        "umask 077",
        "pid=",
        "w=$(mktemp -d /tmp/qrm-capture.XXXXXXXX) || exit 3",
        "trap 'rm -rf \"$w\"' EXIT",
        "trap 'kill $pid 2>/dev/null' HUP TERM",
        secret,
        f'printf %s {_b64(known_hosts)} | base64 -d > "$w/kh"',
        'for c in ssh rsync base64 mktemp; do command -v $c >/dev/null || { echo "qrm-missing $c"; exit 0; }; done',
        f'{ssh} -l {shell_quote(source.user)} -- {shell_quote(source.host)} "command -v rsync >/dev/null '
        '|| echo qrm-no-rsync" < /dev/null > "$w/out" 2> "$w/err"',
        "rc=$?",
        'grep -q qrm-no-rsync "$w/out" && { echo "rsync: not found" >> "$w/err"; rc=1; }',
        'echo "qrm-login $rc"',
        'if [ "$rc" != 0 ]; then base64 -w0 < "$w/err"; echo; echo qrm-err; exit 0; fi',
    ]
    if not login_only:
        options = [
            "-aHAX",
            "--numeric-ids",
            "--delete",
            "--partial",
            "--info=progress2",
            "--no-inc-recursive",
        ]
        if bwlimit:
            options.append(f"--bwlimit={int(bwlimit)}")
        options += [f"--exclude={pattern}" for pattern in (*DEFAULT_EXCLUDES, *excludes)]
        remote = f"{source.user}@{source.host}:{source.path}"
        lines += [
            f"test -d {shell_quote(tree)} || {{ echo qrm-no-tree; exit 0; }}",
            f'rsync {" ".join(shell_quote(o) for o in options)} -e "{ssh}" -- '
            f'{shell_quote(remote)} {shell_quote(tree.rstrip("/") + "/")} 2> "$w/err" &',
            "pid=$!",
            'echo "qrm-pid $pid"',
            'wait "$pid"',
            "rc=$?",
            'echo; echo "qrm-rsync $rc"',
            'base64 -w0 < "$w/err"; echo; echo qrm-err',
        ]
    lines += ['base64 -w0 < "$w/kh"; echo; echo qrm-kh']
    return "\n".join(lines) + "\n"


def _sections(text: str) -> dict[str, str]:
    """The base64 blocks the script prints before its ``qrm-err`` / ``qrm-kh`` markers."""
    found: dict[str, str] = {}
    previous = ""
    for line in text.splitlines():
        line = line.strip()
        if line in ("qrm-err", "qrm-kh"):
            with contextlib.suppress(ValueError):
                found[line] = base64.b64decode(previous).decode(errors="replace")
        previous = line
    return found


def check_login(
    runner: Runner,
    source: Source,
    key: str,
    known_hosts: str,
    *,
    secrets: Sequence[str] = (),
    password: str | None = None,
) -> tuple[str | None, str]:
    """Log in to the source from where the rsync would run. Returns (the problem in one
    line or None, the known-hosts text after)."""
    done = runner.script(
        job_script(source, "/", key, known_hosts, (), login_only=True, password=password),
        timeout=60,
        secrets=[*secrets, *([password] if password else [])],
    )
    blocks = _sections(done.stdout)
    missing = re.search(r"^qrm-missing (\S+)", done.stdout, re.M)
    if missing:
        return f"{runner.where} has no {missing.group(1)} (install it there)", known_hosts
    status = re.search(r"^qrm-login (\d+)", done.stdout, re.M)
    if status is None:
        return f"cannot run the capture on {runner.where}: {done.last_error()}", known_hosts
    if status.group(1) != "0":
        why = explain(blocks.get("qrm-err", ""), source, password=password is not None)
        if why == password_refused(source):
            return why, known_hosts
        return f"cannot log in to {source}: {why}", known_hosts
    return None, blocks.get("qrm-kh", known_hosts)


def run_capture(
    runner: Runner,
    source: Source,
    tree: str,
    key: str,
    known_hosts: str,
    excludes: Sequence[str],
    *,
    report: Callable[[Progress], None] | None = None,
    every: float = 1.0,
    timeout: float = 7 * 24 * 3600,
    bwlimit: int | None = None,
    password: str | None = None,
) -> tuple[Outcome, str]:
    """rsync ``source`` into ``tree`` on the runner's machine, reporting progress at most
    every ``every`` seconds. Returns the outcome and the known-hosts text after.

    A KeyboardInterrupt (or any exception from ``report``) stops the rsync and
    is raised again; the tree keeps what was copied, for a resume."""
    progress = Progress()
    started = time.monotonic()
    script = job_script(source, tree, key, known_hosts, excludes, bwlimit=bwlimit, password=password)
    output = b""
    last = 0.0
    session: Session = runner.session(timeout=timeout)
    with session:
        session.send(script)
        assert session.proc.stdin is not None and session.proc.stdout is not None
        session.proc.stdin.close()  # the script is all there is: sh reads it to the end
        fd = session.proc.stdout.fileno()
        pending = b""
        try:
            while True:
                ready, _, _ = select.select([fd], [], [], 1.0)
                if not ready:
                    if session.proc.poll() is not None:
                        chunk = os.read(fd, 65536)
                        if not chunk:
                            break
                    else:
                        continue
                else:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                output += chunk
                pending += chunk
                *complete, pending = re.split(rb"[\r\n]", pending)
                for raw in complete:
                    line = raw.decode(errors="replace")
                    if line.startswith("qrm-login 0"):
                        progress.phase = "copying"
                        progress.bytes = 0
                    elif line.startswith("qrm-pid "):
                        progress.pid = int(line.split()[1])
                    elif parse_progress(line, progress):
                        pass
                    else:
                        continue
                    now = time.monotonic()
                    if report is not None and now - last >= every:
                        last = now
                        report(progress)
        except BaseException:
            _stop(session, progress)
            raise
        session.proc.wait()
    text = output.decode(errors="replace")
    blocks = _sections(text)
    after = blocks.get("qrm-kh", known_hosts)
    seconds = time.monotonic() - started
    missing = re.search(r"^qrm-missing (\S+)", text, re.M)
    if missing:
        return Outcome(False, f"{runner.where} has no {missing.group(1)} (install it there)"), known_hosts
    login = re.search(r"^qrm-login (\d+)", text, re.M)
    if login is None:
        return Outcome(
            False, f"the capture on {runner.where} ended early", resumable=True, progress=progress
        ), after
    if login.group(1) != "0":
        why = explain(blocks.get("qrm-err", ""), source, password=password is not None)
        said = why if why == password_refused(source) else f"cannot log in to {source}: {why}"
        return Outcome(False, said, login_failed=True, progress=progress), after
    if "qrm-no-tree" in text:
        return Outcome(False, f"the volume's directory {tree} is missing on {runner.where}"), after
    status = re.search(r"^qrm-rsync (\d+)", text, re.M)
    if status is None:
        return Outcome(
            False, f"the capture on {runner.where} ended early", resumable=True, progress=progress
        ), after
    code = int(status.group(1))
    if code in (0, RSYNC_VANISHED):
        return Outcome(True, progress=progress, seconds=seconds, vanished=code == RSYNC_VANISHED), after
    err = blocks.get("qrm-err", "")
    if "No space left on device" in err or "Disk quota exceeded" in err:
        return Outcome(False, "the volume is full: the system does not fit into it", progress=progress), after
    if code >= 128 or code in (12, 20, 30, 35, 255):
        why = (
            "rsync was stopped"
            if code >= 128 or code == 20
            else explain(err, source, password=password is not None)
        )
        return Outcome(
            False, f"the capture was interrupted ({why})", resumable=True, progress=progress
        ), after
    return Outcome(
        False,
        f"rsync failed: {explain(err, source, password=password is not None)}",
        resumable=True,
        progress=progress,
    ), after


def _stop(session: Session, progress: Progress) -> None:
    """Stop a running job: its rsync (on a local runner, by its PID), then the shell."""
    proc = session.proc
    if progress.pid is not None and session.where == "this machine":
        with contextlib.suppress(OSError):
            os.kill(progress.pid, signal.SIGTERM)
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGTERM)  # a local shell, or the ssh client to the server
    try:
        proc.wait(10)
    except Exception:  # noqa: BLE001 - it must go
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def reset_identity_script(tree: str) -> str:
    """Shell that resets the machine identity inside a captured ``tree``."""
    return f"set -u\ncd {shell_quote(tree)} || exit 3\n" + "\n".join(IDENTITY_RESET) + "\necho qrm-reset\n"
