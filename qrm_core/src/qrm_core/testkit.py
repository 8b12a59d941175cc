"""Helpers for tests that need network namespaces and the real ``qrm server``:
core's boot-image tests and plugins' boot tests use the same ones.

Everything runs inside network namespaces the tests create (``ip netns``):
addresses live only there, processes started there are tracked by PID and
stopped by PID (or by the process group the test created), and the
namespaces are deleted afterwards.

* :func:`free_port`, :func:`wait_until`: the one copy of each that tests use.
* :class:`Netns`: a namespace owned by a test; commands and sockets inside it.
* :class:`Udhcpd`: busybox udhcpd serving a pool on one of its interfaces.
* :class:`QrmServerProcess`: the real ``qrm server`` (a subprocess in a
  namespace, on a private SQLite database); tests read and change qrm's state
  through the services on the same database.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
#: iproute2's ip, found once: a test's own PATH may put busybox's ip (no "netns") first.
IP = shutil.which("ip") or "/sbin/ip"
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (bind to port 0, read it back)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    condition: Callable[[], object], what: str, timeout: float = 90.0, interval: float = 0.05
) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=60)


def stop_process(proc: subprocess.Popen[Any] | None, *, group: bool = False, timeout: float = 5) -> None:
    """SIGTERM, then SIGKILL after ``timeout``: by PID (or by the process group we created)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        proc.wait(timeout=timeout)


class Netns:
    """A network namespace owned by a test (unique name with the PID)."""

    def __init__(self, tag: str) -> None:
        self.name = f"qrm{tag}{os.getpid()}"[:15]
        run(IP, "netns", "add", self.name)
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str) -> str:
        return run(IP, "-n", self.name, *args).stdout

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen([IP, "netns", "exec", self.name, *args], **kwargs)

    def inside(self, work: Callable[[], T]) -> T:
        """Run ``work`` in a thread that entered the namespace; sockets it makes stay there."""
        result: dict[str, Any] = {}

        def enter_and_run() -> None:
            try:
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns failed")
                finally:
                    os.close(fd)
                result["value"] = work()
            except Exception as exc:  # noqa: BLE001 - raised again in the calling thread
                result["error"] = exc

        # The thread's network namespace dies with it; what it made stays where it was made.
        thread = threading.Thread(target=enter_and_run)
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        value: T = result["value"]
        return value

    def listen(self, address: str, port: int) -> socket.socket:
        """A TCP socket listening inside this namespace."""

        def create() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(64)
            return sock

        return self.inside(create)

    def can_connect(self, address: str, port: int) -> bool:
        """Whether a TCP connection to ``address:port`` inside the namespace succeeds."""

        def attempt() -> bool:
            try:
                with socket.create_connection((address, port), timeout=1):
                    return True
            except OSError:
                return False

        return self.inside(attempt)

    def delete(self) -> None:
        run(IP, "netns", "del", self.name, check=False)


class Udhcpd:
    """busybox udhcpd serving a pool (and fixed addresses by MAC) on one interface of a namespace."""

    def __init__(
        self,
        netns: Netns,
        interface: str,
        work: Path,
        start: str,
        end: str,
        options: tuple[str, ...] = (),
        static: dict[str, str] | None = None,
    ) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.leases = work / "udhcpd.leases"
        self.leases.touch()
        config = work / "udhcpd.conf"
        lines = [
            f"start {start}",
            f"end {end}",
            f"interface {interface}",
            "max_leases 50",
            f"lease_file {self.leases}",
            f"pidfile {work / 'udhcpd.pid'}",
            "option subnet 255.255.255.0",
            "option lease 600",
            *(f"option {o}" for o in options),
            *(f"static_lease {mac} {ip}" for mac, ip in (static or {}).items()),
        ]
        config.write_text("\n".join(lines) + "\n")
        self.log = open(work / "udhcpd.log", "wb")
        self.proc = netns.popen(
            ["/bin/busybox", "udhcpd", "-f", str(config)], stdout=self.log, stderr=self.log
        )
        time.sleep(0.2)
        if self.proc.poll() is not None:
            raise RuntimeError(f"udhcpd failed: {(work / 'udhcpd.log').read_text()}")

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def qemu_direct_boot(
    kernel: Path | str,
    initrd: Path | str,
    cmdline: str,
    mac: str,
    *,
    memory_mb: int = 256,
    cpus: int = 2,
    nic: str = "virtio-net-pci",
    tap: str = "tap0",
) -> list[str]:
    """A QEMU (TCG) command line booting ``kernel``/``initrd`` directly (what iPXE would
    be told), serial console on stdout, on a tap interface the test made; with
    ``-no-reboot`` every reboot ends the process, so the next boot can be given the
    then current boot configuration."""
    return [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-machine",
        "pc",
        "-m",
        str(memory_mb),
        "-smp",
        str(cpus),
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        cmdline,
        "-netdev",
        f"tap,id=n0,ifname={tap},script=no,downscript=no",
        "-device",
        f"{nic},netdev=n0,mac={mac}",
    ]


class QrmServerProcess:
    """The real ``qrm server`` inside a namespace, on a private SQLite database;
    the plugins installed are found through their entry points, as in production."""

    def __init__(self, netns: Netns, host: str, port: int, work: Path) -> None:
        from qrm_core.config import Settings
        from qrm_core.plugins import PluginSystem
        from qrm_core.services import setup

        self.netns, self.host, self.port = netns, host, port
        self.url = f"http://{host}:{port}"
        data = work / "qrm-data"
        data.mkdir(parents=True, exist_ok=True)
        values = {
            "QRM_DATA_DIR": str(data),
            "QRM_DATABASE_URL": f"sqlite:///{data / 'qrm.db'}",
            "QRM_HEARTBEAT_INTERVAL": "1",
            "QRM_HEARTBEAT_TIMEOUT": "40",
            "QRM_SERVER_URL": self.url,
        }
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith("QRM_") or k.startswith("QRM_TEST_")
        }
        self.env.update(values)
        self.settings = Settings(
            data_dir=data,
            database_url=values["QRM_DATABASE_URL"],
            heartbeat_interval=1.0,
            heartbeat_timeout=40.0,
            server_url=self.url,
            actor="tester",
        )
        self.plugins = PluginSystem(self.settings, discover_plugins=False).load()
        # A server listening beyond loopback refuses the default admin password.
        setup.init(self.settings, admin_password="qrm-test-password", plugins=self.plugins)
        self.log_path = work / "qrm-server.log"
        self._log = open(self.log_path, "wb")
        self.proc = netns.popen(
            [
                sys.executable,
                "-c",
                "from qrm_core.cli.main import run; run()",
                "server",
                "--host",
                host,
                "--port",
                str(port),
            ],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not netns.can_connect(host, port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"qrm server did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.2)

    @contextlib.contextmanager
    def ctx(self) -> Iterator[Any]:
        from qrm_core.services import service_context

        with service_context(self.settings, actor="tester", plugins=self.plugins) as ctx:
            yield ctx

    def enrollment_token(self) -> str:
        from qrm_core.services import site

        with self.ctx() as ctx:
            return site.get_enrollment_token(ctx)

    def resource(self, mac: str) -> Any:
        from sqlmodel import select

        from qrm_core.models import Resource

        with self.ctx() as ctx:
            return ctx.session.exec(select(Resource).where(Resource.mac == mac)).first()

    def wait(self, predicate: Callable[[Any], Any], timeout: float, what: str) -> Any:
        """Poll ``predicate(service context)`` until it is true; its value."""
        deadline = time.monotonic() + timeout
        while True:
            with self.ctx() as ctx:
                value = predicate(ctx)
            if value:
                return value
            self._alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.2)

    def wait_resource(self, mac: str, timeout: float, what: str, predicate: Callable[[Any], bool]) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            row = self.resource(mac)
            if row is not None and predicate(row):
                return row
            self._alive()
            if time.monotonic() > deadline:
                state = None if row is None else (row.state, row.boot_generation)
                raise AssertionError(f"timed out after {timeout} s waiting for {what} (resource: {state})")
            time.sleep(0.2)

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"qrm server died: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        from qrm_core import db

        stop_process(self.proc, group=True, timeout=10)
        self._log.close()
        db.dispose_engines()


# ---------------------------------------------------------------------------
# A storage server machine: NFS (ganesha), iSCSI (tgt) and SSH in a namespace
# ---------------------------------------------------------------------------

#: What a storage host can run, and the Debian package of each program.
STORAGE_TOOLS = {
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "rpcbind": "rpcbind",
    "rpcinfo": "rpcbind",
    "ganesha.nfsd": "nfs-ganesha nfs-ganesha-vfs",
    "tgtd": "tgt",
    "tgtadm": "tgt",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
}


def missing_storage_tools(*programs: str) -> list[str]:
    """The Debian packages of ``programs`` (names of :data:`STORAGE_TOOLS`) that are not installed."""
    search = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return sorted({STORAGE_TOOLS[p] for p in programs if shutil.which(p, path=search) is None})


class StorageHost:
    """A storage server for tests: its own network namespace and its own ``/run``.

    The namespace is joined to a bridge in another namespace by a veth pair
    (created inside the namespaces; the root namespace never holds it), or
    stands alone. A sleeper process holds a private mount namespace in which
    ``/run`` is a tmpfs, and every daemon (rpcbind, ganesha.nfsd, tgtd, sshd)
    is started in it with ``nsenter``: their sockets, locks and sshd's
    privilege-separation directory never touch the machine's ``/run``, and
    two tests (or two helpers) can run the same daemons at once. The
    filesystem is otherwise the machine's own: exported directories and LUN
    files are the test's temporary files. Processes are Popen objects,
    stopped by PID (tgtd first emptied: it ignores SIGTERM while it has targets).
    """

    _count = 0

    def __init__(
        self,
        tag: str,
        work: Path,
        address: str,
        *,
        prefix: int = 24,
        bridge_netns: str | None = None,
        bridge: str | None = None,
    ) -> None:
        self.netns = Netns(tag)
        self.address = address
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self._logs: list[Any] = []
        self.tgt_control: int | None = None
        self.ssh_port = 22
        try:
            if bridge_netns is not None:
                StorageHost._count += 1
                peer = f"st{os.getpid() % 100000}x{StorageHost._count}"[:15]
                run(IP, "link", "add", "eth0", "netns", self.netns.name, "type", "veth",
                    "peer", "name", peer, "netns", bridge_netns)  # fmt: skip
                run(IP, "-n", bridge_netns, "link", "set", peer, "master", bridge or "br0")
                run(IP, "-n", bridge_netns, "link", "set", peer, "up")
                self.netns.ip("addr", "add", f"{address}/{prefix}", "dev", "eth0")
                self.netns.ip("link", "set", "eth0", "up")
            else:
                # Alone: the address on its loopback (clients run inside the namespace too).
                self.netns.ip("addr", "add", f"{address}/32", "dev", "lo")
            self.holder = self.netns.popen(
                [
                    "unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                    "mount -t tmpfs -o mode=0755 qrm-test-run /run && mkdir -m 0755 /run/sshd "
                    "&& echo ready && exec sleep 100000",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            assert self.holder.stdout is not None
            line = self.holder.stdout.readline().decode(errors="replace").strip()
            if line != "ready":
                raise RuntimeError(f"cannot make the storage host's private /run: {line}")
        except BaseException:
            self.stop()
            raise

    # -- running things on the host -----------------------------------------

    def argv(self, args: list[str]) -> list[str]:
        """``args`` run on the storage host (its network and its /run)."""
        return ["nsenter", "--target", str(self.holder.pid), "--mount", "--net", "--", *args]

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(list(args)), capture_output=True, text=True, check=check, timeout=timeout
        )

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[Any]:
        log = open(self.work / f"{name}.log", "ab")
        self._logs.append(log)
        proc = subprocess.Popen(
            self.argv(args),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait(self, name: str, ready: Callable[[], bool], what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited at start: {self.log(name)[-1500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start within {timeout} s: {self.log(name)[-1500:]}")
            time.sleep(0.05)

    # -- NFS: rpcbind + ganesha.nfsd ------------------------------------------

    def start_ganesha(self, exports_file: Path, *, log_file: Path | None = None) -> Path:
        """rpcbind and ganesha.nfsd (NFSv3+v4, TCP) reading ``exports_file`` (``%include``d;
        it must exist). Returns ganesha's PID file (what a driver signals to reload)."""
        state = self.work / "ganesha"
        (state / "recovery").mkdir(parents=True, exist_ok=True)
        self.ganesha_pid_file = state / "ganesha.pid"
        self.ganesha_log = log_file or state / "ganesha.log"
        conf = state / "ganesha.conf"
        conf.write_text(
            "NFS_CORE_PARAM { Protocols = 3, 4; Enable_NLM = false; Enable_RQUOTA = false; }\n"
            f'NFSv4 {{ Graceless = true; RecoveryBackend = fs; RecoveryRoot = "{state}/recovery"; }}\n'
            "NFS_KRB5 { Active_krb5 = false; }\n"
            "LOG { Default_Log_Level = EVENT; COMPONENTS { CONFIG = INFO; } }\n"
            f'%include "{exports_file}"\n'
        )
        self.spawn("rpcbind", ["rpcbind", "-f", "-w"])
        self._wait(
            "rpcbind", lambda: self.run("rpcinfo", "-p", "127.0.0.1", check=False).returncode == 0, "rpcbind"
        )
        self.spawn(
            "ganesha",
            [
                "ganesha.nfsd",
                "-F",
                "-f",
                str(conf),
                "-L",
                str(self.ganesha_log),
                "-p",
                str(self.ganesha_pid_file),
            ],
        )

        def started() -> bool:
            return self.ganesha_log.exists() and "NFS SERVER INITIALIZED" in self.ganesha_log.read_text(
                errors="replace"
            )

        self._wait("ganesha", started, "ganesha.nfsd", timeout=30)
        return self.ganesha_pid_file

    # -- iSCSI: tgtd ---------------------------------------------------------

    def start_tgtd(self, port: int = 3260) -> int:
        """tgtd with its iSCSI portal on this host's address; returns its control port
        (``tgtadm -C N``, a socket in the host's private /run)."""
        self.tgt_control = 17
        self.tgt_port = port
        self.spawn(
            "tgtd", ["tgtd", "-f", "-C", str(self.tgt_control), "--iscsi", f"portal={self.address}:{port}"]
        )

        def answers() -> bool:
            return self.tgtadm("--op", "show", "--mode", "target", check=False).returncode == 0

        self._wait("tgtd", answers, "tgtd")
        return self.tgt_control

    def tgtadm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.tgt_control is not None
        return self.run("tgtadm", "-C", str(self.tgt_control), "--lld", "iscsi", *args, check=check)

    def _stop_tgtd(self) -> None:
        proc = self.procs.get("tgtd")
        if proc is None or proc.poll() is not None:
            return
        shown = self.tgtadm("--op", "show", "--mode", "target", check=False).stdout
        for line in shown.splitlines():
            if line.startswith("Target ") and ":" in line:
                tid = line.split()[1].rstrip(":")
                self.tgtadm("--op", "delete", "--mode", "target", "--tid", tid, "--force", check=False)
        self.tgtadm("--op", "delete", "--mode", "system", check=False)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            stop_process(proc, group=True)

    # -- SSH: sshd with a throwaway host key and user key -----------------------

    def start_sshd(self, port: int = 22, *, extra_config: str = "") -> tuple[Path, str]:
        """sshd for root with a new host key and a new user key; returns the user's
        private key file and the ``known_hosts`` line of the host key. ``extra_config``
        (sshd_config lines) is appended, e.g. ``SetEnv PATH=...`` for the sessions."""
        keys = self.work / "ssh"
        keys.mkdir(mode=0o700, exist_ok=True)
        for name in ("host", "user"):
            if not (keys / name).exists():
                run(
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    f"qrm-test-{name}",
                    "-f",
                    str(keys / name),
                )
        (keys / "authorized_keys").write_text((keys / "user.pub").read_text())
        config = keys / "sshd_config"
        config.write_text(
            f"ListenAddress {self.address}:{port}\n"
            f"HostKey {keys / 'host'}\n"
            f"PidFile {keys / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {keys / 'authorized_keys'}\n"
            "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nPermitRootLogin prohibit-password\nMaxStartups 100:30:200\nMaxSessions 100\n"
            + extra_config
        )
        self.run("/usr/sbin/sshd", "-t", "-f", str(config))
        self.ssh_port = port
        self.spawn("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)])
        host = self.address if port == 22 else f"[{self.address}]:{port}"
        known = f"{host} {' '.join((keys / 'host.pub').read_text().split()[:2])}"

        def listening() -> bool:
            return self.netns.can_connect(self.address, port)

        self._wait("sshd", listening, "sshd")
        return keys / "user", known

    def start_password_sshd(self, password: str, port: int = 2222) -> str:
        """A second sshd on ``port`` where root logs in with ``password`` only. Root's
        password is set in a temporary copy of ``/etc/shadow`` bind-mounted over it in
        the host's private mount namespace: the machine's own accounts are not touched
        (its ``/etc/shadow`` is unchanged outside). Returns the host key's line."""
        keys = self.work / "ssh-password"
        keys.mkdir(mode=0o700, exist_ok=True)
        if not (keys / "host").exists():
            run(
                "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "qrm-test-host", "-f", str(keys / "host")
            )
        hashed = subprocess.run(
            ["openssl", "passwd", "-6", "-stdin"], input=password + "\n", capture_output=True, text=True,
            check=True,
        ).stdout.strip()  # fmt: skip
        lines = Path("/etc/shadow").read_text().splitlines()
        fields = next((line.split(":") for line in lines if line.startswith("root:")), None)
        fields = fields or ["root", "", "19000", "0", "99999", "7", "", "", ""]
        fields[1] = hashed
        shadow = keys / "shadow"
        fd = os.open(shadow, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("".join(line + "\n" for line in lines if not line.startswith("root:")))
            handle.write(":".join(fields) + "\n")
        self.run("mount", "--bind", str(shadow), "/etc/shadow")
        config = keys / "sshd_config"
        config.write_text(
            f"ListenAddress {self.address}:{port}\n"
            f"HostKey {keys / 'host'}\n"
            f"PidFile {keys / 'sshd.pid'}\n"
            "AuthorizedKeysFile none\nPubkeyAuthentication no\n"
            "StrictModes no\nPasswordAuthentication yes\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nPermitRootLogin yes\nMaxStartups 100:30:200\nMaxSessions 100\n"
        )
        self.run("/usr/sbin/sshd", "-t", "-f", str(config))
        self.spawn("sshd-password", ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)])
        self._wait("sshd-password", lambda: self.netns.can_connect(self.address, port), "sshd (password)")
        return f"[{self.address}]:{port} {' '.join((keys / 'host.pub').read_text().split()[:2])}"

    def stop(self) -> None:
        """Stop every daemon by PID, then the holder; delete the namespace."""
        self._stop_tgtd()
        for name in reversed(list(self.procs)):
            stop_process(self.procs[name], group=True)
        holder = getattr(self, "holder", None)
        if holder is not None:
            stop_process(holder)
            if holder.stdout is not None:
                holder.stdout.close()
        for log in self._logs:
            log.close()
        self.netns.delete()


# ---------------------------------------------------------------------------
# A filesystem with copy-on-write (XFS with reflink on a loop device)
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def reflink_filesystem(work: Path, size_mb: int = 512) -> Iterator[Path]:
    """An XFS filesystem with reflink (``cp --reflink`` works) mounted from a sparse
    file in ``work``; unmounted and removed afterwards. Needs root, ``mkfs.xfs``
    (xfsprogs) and a kernel with XFS and loop devices: where one is missing,
    :func:`qrm_core.testing.missing` says which (skip, or fail under CI=true)."""
    from qrm_core.testing import missing

    if os.geteuid() != 0:
        missing("root", "mounting an XFS test filesystem needs root")
    if shutil.which("mkfs.xfs") is None:
        missing("mkfs.xfs", "apt-get install xfsprogs")
    filesystems = Path("/proc/filesystems").read_text()
    if "xfs" not in filesystems.split():
        missing("XFS in the kernel", "this kernel cannot mount XFS (copy-on-write tests need it)")
    image = work / "reflink.xfs"
    mount = work / "reflink"
    mount.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as handle:
        handle.truncate(size_mb * 1024 * 1024)
    run("mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image))
    done = subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        image.unlink(missing_ok=True)
        missing("a loop-mounted XFS", f"mount -o loop failed: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, check=False)
        image.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# A running machine to capture (filesystem images from a live system)
# ---------------------------------------------------------------------------


def make_root_tree(root: Path, *, data_mb: int = 4) -> Path:
    """A small root filesystem as a running machine has it: a hostname, a machine-id,
    SSH host keys, a hard link, a symbolic link, owners, a private file, an
    extended attribute, pseudo filesystems with content, and ``data_mb`` MB of
    random files (in 1 MB files) under /srv/data."""
    for directory in ("etc/ssh", "usr/bin", "var/log", "home/alice", "proc/1", "sys/kernel", "dev",
                      "run", "tmp", "srv/data", "var/lib/dbus"):  # fmt: skip
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "etc" / "hostname").write_text("node1\n")
    (root / "etc" / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var" / "lib" / "dbus" / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "etc" / "ssh" / "ssh_host_ed25519_key").write_text("PRIVATE HOST KEY\n")
    (root / "etc" / "ssh" / "ssh_host_ed25519_key").chmod(0o600)
    (root / "etc" / "ssh" / "sshd_config").write_text("PermitRootLogin prohibit-password\n")
    tool = root / "usr" / "bin" / "tool"
    tool.write_bytes(os.urandom(256 * 1024))
    tool.chmod(0o755)
    os.link(tool, root / "usr" / "bin" / "tool-link")
    (root / "etc" / "tool").symlink_to("../usr/bin/tool")
    (root / "etc" / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc" / "shadow").chmod(0o600)
    (root / "home" / "alice" / "notes").write_text("alice's notes\n")
    if os.geteuid() == 0:
        os.chown(root / "home" / "alice", 1234, 2345)
        os.chown(root / "home" / "alice" / "notes", 1234, 2345)
    with contextlib.suppress(OSError):
        os.setxattr(root / "etc" / "hostname", "user.qrm", b"yes")
    (root / "proc" / "1" / "status").write_text("junk that must not be copied\n")
    (root / "sys" / "kernel" / "x").write_text("junk\n")
    (root / "tmp" / "scratch").write_text("junk\n")
    (root / "var" / "log" / "syslog").write_text("a log line\n")
    for index in range(data_mb):
        (root / "srv" / "data" / f"blob{index:03d}").write_bytes(os.urandom(1024 * 1024))
    return root


class RunnerInNetns:
    """A :class:`qrm_core.remote.Runner` whose processes start inside a network
    namespace (the test's machines are there; the test's database is not)."""

    def __init__(self, netns: Netns, inner: Any) -> None:
        self.netns = netns
        self.inner = inner
        self.where = inner.where

    def script(self, text: str, **kwargs: Any) -> Any:
        return self.netns.inside(lambda: self.inner.script(text, **kwargs))

    def session(self, **kwargs: Any) -> Any:
        return self.netns.inside(lambda: self.inner.session(**kwargs))

    def upload(self, local: Path, path: str, **kwargs: Any) -> None:
        self.netns.inside(lambda: self.inner.upload(local, path, **kwargs))

    def stream(self, command: str, **kwargs: Any) -> Any:
        return self.netns.inside(lambda: self.inner.stream(command, **kwargs))


class CaptureLab:
    """Machines on one bridge, each its own network namespace with sshd for root:
    ``source`` (a running machine to capture) and ``storage`` (a storage server
    qrm reaches over SSH); the test's runners run in the bridge's namespace
    (``lab``), which has an address on the bridge too."""

    SUBNET = "10.231.20"

    def __init__(self, work: Path) -> None:
        self.work = work
        self.lab = Netns("cap")
        self.hosts: list[StorageHost] = []
        try:
            self.lab.ip("link", "add", "br0", "type", "bridge")
            self.lab.ip("addr", "add", f"{self.SUBNET}.1/24", "dev", "br0")
            self.lab.ip("link", "set", "br0", "up")
            self.source = self._host("csrc", f"{self.SUBNET}.2")
            self.storage = self._host("cstore", f"{self.SUBNET}.3")
            self.source_key, self.source_known = self.source.start_sshd()
            self.storage_key, self.storage_known = self.storage.start_sshd()
        except BaseException:
            self.stop()
            raise

    def _host(self, tag: str, address: str) -> StorageHost:
        host = StorageHost(tag, self.work / tag, address, bridge_netns=self.lab.name, bridge="br0")
        self.hosts.append(host)
        return host

    def runner(self, inner: Any) -> RunnerInNetns:
        return RunnerInNetns(self.lab, inner)

    def stop(self) -> None:
        for host in reversed(self.hosts):
            host.stop()
        self.lab.delete()
