"""``qrm lab up|down|status``: a data center in a box, on one machine.

One network namespace (``qrmlab-<pid>``) holds the whole data center:

* a bridge ``br0`` with ``10.77.0.1/24`` (the provisioning network; the only
  address the lab adds, and it lives inside the namespace), kept up by a veth
  pair so that it has carrier before the first machine (Kea opens its socket
  at once, the bridge's link-local address for router advertisements exists);
* the real ``qrm server`` (``ip netns exec``) on ``10.77.0.1:8080`` with its
  own data directory and SQLite database, running the plugins' services:
  ``qrm-dhcpd`` managing Kea or ISC dhcpd on ``br0`` and ``qrm-tftpd`` on
  UDP 69 - configured only through their ``QRM_DHCPD_*`` / ``QRM_TFTPD_*``
  settings (core never imports a plugin);
* N QEMU machines (:mod:`qrm_core.lab.qemu`, SeaBIOS or OVMF) on taps of the bridge that
  PXE-boot into qrm;
* with ``hosts``, M hypervisor hosts ``hv1``...: private libvirt daemons
  (:mod:`qrm_core.lab.libvirtd`, QEMU under TCG) in the namespace, registered as host
  resources of the ``qemu`` hypervisor (plugin ``qrm-qemu``) whose partitions join
  ``br0`` and PXE-boot into qrm like the machines (``qrm partition add --host hv1``);
* the helper (:mod:`qrm_core.lab.helper`), which answers IPv6 router
  solicitations (iPXE otherwise waits 16 s) and forwards ``127.0.0.1:PORT`` in
  this machine's namespace to the server inside: the way in for
  ``qrm --server``, without any address outside the namespace.

What the lab prepares in its database: the admin user ``qrm`` with a random
password, the boot image ``lab`` built from a Debian kernel package (cached
between labs), a ``ramdisk`` storage server ``ram`` with the filesystem image
``web-root`` (:mod:`qrm_core.lab.rootfs`), and the VE ``web`` (failover on)
ready to start.

Every process is recorded in ``<dir>/lab.json`` (PID and start time) as soon
as it exists, and the namespace's name before it exists, so ``qrm lab down``
removes everything even after ``up`` crashed or its terminal closed; ``down``
is idempotent.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qrm_core import __version__
from qrm_core.errors import Conflict, DriverError, InvalidInput, NotFound, PluginError, QrmError
from qrm_core.lab import procs, qemu, rootfs
from qrm_core.lab.procs import IP, Proc

SERVER_IP = "10.77.0.1"
SERVER_PORT = 8080
SUBNET = "10.77.0.0/24"
PREFIX_LEN = 24
POOL = ("10.77.0.100", "10.77.0.199")
BRIDGE = "br0"
#: A fixed, locally administered MAC: the bridge would otherwise take its ports' MACs as they come and go.
BRIDGE_MAC = "02:77:00:00:00:01"
DEFAULT_PORT = 8077
#: Seconds between the agents' heartbeats in the lab (qrm's default is 10: the lab wants quick failover).
HEARTBEAT_INTERVAL = 2.0
#: A running machine that misses heartbeats for this long has failed (7 missed beats).
DEFAULT_HEARTBEAT_TIMEOUT = 15.0
#: A machine rebooting at qrm's order is silent until it registers again: 12-15 s under TCG,
#: up to 25 s seen with two machines booting at once on a loaded 2-core machine; qrm gives
#: it QRM_BOOT_TIMEOUT for that, so a reboot is not taken for a failure.
BOOT_TIMEOUT = 120.0
STATE_FILE = "lab.json"
ADMIN = "qrm"
BOOT_IMAGE = "lab"
STORAGE = "ram"
FS_IMAGE = "web-root"
FS_SIZE_MB = 64
VE = "web"
#: Serial console only: it is what ``qrm lab console`` shows.
CMDLINE = "console=ttyS0,115200n8 panic=10"
DHCP_BACKENDS = ("kea", "isc")
#: What the lab needs from the machine: (program or file, Debian package).
TOOLS = (
    ("ip", "iproute2"),
    (qemu.QEMU, "qemu-system-x86"),
    (str(qemu.VIRTIO_ROM), "ipxe-qemu"),
    ("/bin/busybox", "busybox-static"),
    ("dpkg-deb", "dpkg"),
    ("depmod", "kmod"),
    ("/dev/net/tun", "the tun device (CONFIG_TUN)"),
)
DHCP_TOOLS = {"kea": ("kea-dhcp4", "kea-dhcp4-server"), "isc": ("dhcpd", "isc-dhcp-server")}
#: The plugins the lab runs (entry point in qrm.plugins -> distribution).
PLUGINS = {"tftpd": "qrm-tftpd", "dhcpd": "qrm-dhcpd", "ramdisk": "qrm-ramdisk"}
#: The plugin of the lab's hypervisor hosts (``hosts``).
HOST_PLUGIN = ("qemu", "qrm-qemu")
MAX_HOSTS = 4
#: Memory a lab host offers its partitions (MB), at most what this machine has.
HOST_MEMORY_MB = 2048

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------


@dataclass
class LabState:
    """What ``<dir>/lab.json`` holds: everything ``down`` needs, and how to reach the lab."""

    netns: str
    dhcp: str
    port: int
    password: str
    kernel_version: str = ""
    status: str = "starting"
    created: float = field(default_factory=time.time)
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    processes: dict[str, Proc] = field(default_factory=dict)
    vms: dict[str, qemu.VmSpec] = field(default_factory=dict)
    vm_procs: dict[str, Proc] = field(default_factory=dict)
    #: Wall-clock time of each machine's last power-on (for timings).
    powered_on: dict[str, float] = field(default_factory=dict)
    #: Directories outside the lab directory to remove on ``down`` (Kea's socket, if the path was long).
    extra_dirs: list[str] = field(default_factory=list)
    #: The hypervisor hosts' libvirt daemons (``LibvirtDaemon.to_dict()``), by host name.
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The server as seen from this machine (through the helper's forwarder)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def server_url(self) -> str:
        """The server as the lab's machines see it."""
        return f"http://{SERVER_IP}:{SERVER_PORT}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "netns": self.netns,
            "dhcp": self.dhcp,
            "port": self.port,
            "password": self.password,
            "kernel_version": self.kernel_version,
            "status": self.status,
            "created": self.created,
            "heartbeat_interval": self.heartbeat_interval,
            "heartbeat_timeout": self.heartbeat_timeout,
            "processes": {k: p.to_dict() for k, p in self.processes.items()},
            "vms": {k: v.to_dict() for k, v in self.vms.items()},
            "vm_procs": {k: p.to_dict() for k, p in self.vm_procs.items()},
            "powered_on": dict(self.powered_on),
            "extra_dirs": list(self.extra_dirs),
            "hosts": dict(self.hosts),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabState:
        return cls(
            netns=str(data["netns"]),
            dhcp=str(data.get("dhcp", "kea")),
            port=int(data.get("port", 0)),
            password=str(data.get("password", "")),
            kernel_version=str(data.get("kernel_version", "")),
            status=str(data.get("status", "starting")),
            created=float(data.get("created", 0)),
            heartbeat_interval=float(data.get("heartbeat_interval", 2.0)),
            heartbeat_timeout=float(data.get("heartbeat_timeout", 30.0)),
            processes={k: Proc.from_dict(v) for k, v in data.get("processes", {}).items()},
            vms={k: qemu.VmSpec.from_dict(v) for k, v in data.get("vms", {}).items()},
            vm_procs={k: Proc.from_dict(v) for k, v in data.get("vm_procs", {}).items()},
            powered_on={k: float(v) for k, v in data.get("powered_on", {}).items()},
            extra_dirs=[str(d) for d in data.get("extra_dirs", [])],
            hosts={str(k): dict(v) for k, v in data.get("hosts", {}).items()},
        )


# ---------------------------------------------------------------------------
# Checks before anything is created
# ---------------------------------------------------------------------------


def _have(tool: str) -> bool:
    if tool.startswith("/"):
        return Path(tool).exists()
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is not None


def check_root() -> None:
    if os.geteuid() != 0:
        raise InvalidInput(
            "qrm lab needs root (network namespaces, taps, DHCP and TFTP ports): run it with sudo"
        )


def check_tools(dhcp: str, *, uefi: bool = False) -> None:
    """One line naming every Debian package the lab misses (OVMF only when a machine boots UEFI)."""
    wanted = [*TOOLS, DHCP_TOOLS[dhcp]]
    absent = sorted({package for tool, package in wanted if not _have(tool)})
    if uefi:
        if qemu.find_ovmf() is None:
            absent.append(qemu.OVMF_PACKAGE)
        if not qemu.IPXE_EFI.is_file():
            absent.append("ipxe")
        absent.sort()
    if absent:
        raise InvalidInput(
            f"qrm lab needs {', '.join(absent)}: apt-get install "
            + " ".join(p for p in absent if " " not in p)
        )


def check_plugins_installed() -> None:
    """The network-boot plugins must be installed (core never imports them: they are found by entry point)."""
    names = {ep.name for ep in importlib.metadata.entry_points(group="qrm.plugins")}
    absent = [dist for name, dist in PLUGINS.items() if name not in names]
    if absent:
        paths = " ".join(f"-e plugins/qrm_{d.removeprefix('qrm-')}" for d in absent)
        raise PluginError(f"qrm lab needs the plugins {', '.join(absent)}: pip install {paths}")


def check_hosts(hosts: int) -> None:
    """What hypervisor hosts need: libvirtd with QEMU, and the qemu plugin with libvirt-python."""
    from qrm_core.lab import libvirtd

    if not 0 <= hosts <= MAX_HOSTS:
        raise InvalidInput(f"--hosts {hosts}: the lab runs 0 to {MAX_HOSTS} hypervisor hosts")
    if not hosts:
        return
    problem = libvirtd.missing()
    if problem:
        raise InvalidInput(f"qrm lab --hosts needs {problem}")
    names = {ep.name for ep in importlib.metadata.entry_points(group="qrm.hypervisors")}
    if HOST_PLUGIN[0] not in names:
        raise PluginError(
            f"qrm lab --hosts needs the plugin {HOST_PLUGIN[1]}: pip install -e plugins/qrm_qemu"
        )


def check_plugins_usable(plugins: Any) -> None:
    """Installed but disabled or broken (a missing dependency) is as bad as absent."""
    for name, dist in PLUGINS.items():
        record = plugins.records.get(("qrm.plugins", name))
        if record is None:
            raise PluginError(f"qrm lab needs the plugin {dist}, which is not installed")
        if record.status != "enabled":
            why = record.error or (", ".join(record.missing) if record.missing else record.status)
            raise PluginError(f"qrm lab needs the plugin {dist}, which is {record.status}: {why}")


def check_options(
    *, vms: int, dhcp: str, cpus: int, memory_mb: int, port: int, firmware: str = "bios"
) -> list[str]:
    """Checks the options; returns each machine's firmware."""
    if dhcp not in DHCP_BACKENDS:
        raise InvalidInput(f"--dhcp {dhcp!r}: use kea or isc")
    if not 0 <= vms <= qemu.MAX_VMS:
        raise InvalidInput(f"--vms {vms}: the lab runs 0 to {qemu.MAX_VMS} machines")
    qemu.check_sizes(cpus, memory_mb)
    if not 0 <= port <= 65535:
        raise InvalidInput(f"--port {port} is out of range")
    return qemu.firmware_list(firmware, vms)


# ---------------------------------------------------------------------------
# The kernel and the boot image
# ---------------------------------------------------------------------------


def cache_root() -> Path:
    """Kernel packages and built boot images, kept between labs."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qrm" / "lab"


def _kernel_dirs() -> list[Path]:
    """Where kernel packages may already be: ``qrm boot-image create --download``'s cache, then the lab's."""
    dirs = []
    with contextlib.suppress(Exception):
        from qrm_core.config import Settings
        from qrm_core.services.boot_build import kernel_cache_dir

        dirs.append(kernel_cache_dir(Settings()))
    dirs.append(cache_root() / "kernels")
    return dirs


def _apt_kernel_version() -> str | None:
    """The kernel release Debian's ``linux-image-<arch>`` depends on now."""
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=False)
    meta = f"linux-image-{arch.stdout.strip() or 'amd64'}"
    for attempt in range(2):
        done = subprocess.run(["apt-cache", "depends", meta], capture_output=True, text=True, check=False)
        match = re.search(r"Depends: linux-image-([0-9][^\s]*)", done.stdout)
        if match:
            return match.group(1).removesuffix("-unsigned")
        if attempt == 0 and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False, timeout=600)
    return None


def _release_key(release: str) -> list[tuple[int, int | str]]:
    """Orders kernel releases as people do: 6.1.0-9 before 6.1.0-56."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[.-]", release)]


def find_kernel(
    kernel_deb: Path | None, kernel_version: str | None, progress: Progress = _quiet
) -> tuple[str, Path]:
    """``(kernel release, package file)``: the one given, a cached one, or one ``apt-get download`` fetches."""
    from qrm_core.bootimage import kernel as kernels

    if kernel_deb is not None:
        package, _ = kernels.deb_fields(kernel_deb)
        version = package.removeprefix(kernels.PACKAGE_PREFIX).removesuffix("-unsigned")
        if kernel_version and kernel_version != version:
            raise InvalidInput(f"{kernel_deb.name} holds kernel {version}, not {kernel_version}")
        return version, kernel_deb
    cached = [item for d in _kernel_dirs() for item in kernels.cached_debs(d)]
    if kernel_version:
        for version, path in cached:
            if version == kernel_version:
                return version, path
    elif cached:
        return max(cached, key=lambda item: (_release_key(item[0]), item[1].name))
    wanted = kernel_version or _apt_kernel_version()
    if wanted is None:
        raise InvalidInput(
            "no kernel package cached and apt cannot name one (apt-cache depends linux-image-amd64): "
            "run apt-get update, or give --kernel-deb FILE"
        )
    target = _kernel_dirs()[0]
    progress(f"downloading linux-image-{wanted} into {target} (once)")
    return wanted, kernels.download_deb(wanted, target)


def boot_cache_key(deb: Path, cmdline: str, busybox: Path = Path("/bin/busybox")) -> str:
    """Everything a built boot image depends on: the kernel package, busybox, the builder's
    own code (agent script included) and the command line. A change to any of them builds anew."""
    from qrm_core import bootimage

    digest = hashlib.sha256()
    stat = deb.stat()
    digest.update(f"{deb.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0{cmdline}\0{__version__}\0".encode())
    digest.update(hashlib.sha256(busybox.read_bytes()).digest())
    package = Path(bootimage.__file__).parent
    for source in sorted(package.iterdir()):
        if source.is_file() and source.suffix in (".py", ".sh"):
            digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:24]


# ---------------------------------------------------------------------------
# The lab
# ---------------------------------------------------------------------------


def _run(argv: list[str], what: str, *, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise DriverError(f"{what}: no answer within {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).strip().splitlines() if line.strip()]
        raise DriverError(f"{what}: {lines[-1] if lines else f'exit status {done.returncode}'}")
    return done.stdout


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def qrm_argv(*args: str) -> list[str]:
    """Run this installation's ``qrm`` (the same interpreter, so the same plugins)."""
    return [sys.executable, "-c", "from qrm_core.cli.main import run; run()", *args]


class Lab:
    """A lab rooted in one directory; ``up``, ``down`` and the rest act on what its state file says."""

    def __init__(self, directory: Path | str, *, progress: Progress | None = None) -> None:
        self.dir = Path(directory).absolute()
        self.progress = progress or _quiet
        #: Processes this object started, reaped so that they never linger as zombies.
        self._children: list[subprocess.Popen[Any]] = []

    # -- paths -----------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    def vm_dir(self, name: str) -> Path:
        return self.dir / "vms" / name

    def console_path(self, name: str) -> Path:
        state = self.require_state()
        if name not in state.vms:
            raise NotFound(f"the lab has no machine {name!r}; it has {', '.join(state.vms) or 'none'}")
        return self.vm_dir(name) / "console.log"

    # -- state file ------------------------------------------------------

    def read_state(self) -> LabState | None:
        try:
            text = self.state_path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InvalidInput(f"cannot read {self.state_path}: {exc.strerror}") from None
        try:
            return LabState.from_dict(json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(
                f"{self.state_path} is damaged ({exc}); remove it and the lab's namespace by hand"
            ) from None

    def require_state(self) -> LabState:
        state = self.read_state()
        if state is None:
            raise NotFound(f"no lab in {self.dir}; start one with 'qrm lab up'")
        return state

    def _write_state(self, state: LabState) -> None:
        """Atomically, mode 0600 (it holds the admin password)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lab-", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(state.to_dict(), handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.state_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _locked(self, timeout: float = 30.0) -> Iterator[None]:
        """One ``up``/``down``/``vm`` at a time per lab directory."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as handle:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise Conflict(f"another qrm lab command is working on {self.dir}") from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _reap(self) -> None:
        for child in self._children:
            child.poll()
        self._children = [c for c in self._children if c.returncode is None]

    # -- environment of the lab's processes --------------------------------

    def _kea_socket(self, state: LabState) -> Path:
        path = self.data_dir / "dhcpd" / "kea4.sock"
        if len(os.fsencode(path)) <= 100:
            return path
        # A unix socket path has at most 107 bytes: a deep lab directory gets a short one elsewhere.
        short = Path(tempfile.gettempdir()) / f"{state.netns}-kea"
        if str(short) not in state.extra_dirs:
            state.extra_dirs.append(str(short))
        short.mkdir(mode=0o700, exist_ok=True)
        return short / "kea4.sock"

    def env(self, state: LabState) -> dict[str, str]:
        """The environment of the lab's ``qrm server`` (and of ``qrm`` commands run for the lab):
        nothing of the caller's ``QRM_*``, the lab's data directory, and the plugins' settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("QRM_")}
        env.update(
            {
                "QRM_DATA_DIR": str(self.data_dir),
                "QRM_CONFIG": str(self.data_dir / "qrm.toml"),
                "QRM_SERVER_URL": state.server_url,
                "QRM_HEARTBEAT_INTERVAL": str(state.heartbeat_interval),
                "QRM_HEARTBEAT_TIMEOUT": str(state.heartbeat_timeout),
                "QRM_BOOT_TIMEOUT": str(max(BOOT_TIMEOUT, state.heartbeat_timeout)),
                "QRM_INIT_BOOT_IMAGE": "false",
                # qrm-tftpd: boot.ipxe and per-MAC scripts on UDP 69 of the lab's network.
                "QRM_TFTPD_ENABLED": "true",
                "QRM_TFTPD_LISTEN_ADDRESS": SERVER_IP,
                "QRM_TFTPD_PORT": "69",
                "QRM_TFTPD_RETRY_SECONDS": "3",
                # qrm-dhcpd: qrm server runs the DHCP server on the bridge, one reservation per machine.
                "QRM_DHCPD_BACKEND": state.dhcp,
                "QRM_DHCPD_MANAGE": "true",
                "QRM_DHCPD_INTERFACE": BRIDGE,
                "QRM_DHCPD_SUBNET": SUBNET,
                "QRM_DHCPD_POOL_START": POOL[0],
                "QRM_DHCPD_POOL_END": POOL[1],
                "QRM_DHCPD_NEXT_SERVER": SERVER_IP,
                "QRM_DHCPD_LEASE_TIME": "3600",
                "QRM_DHCPD_ISC_PING_CHECK": "false",
                "QRM_DHCPD_KEA_CONTROL_SOCKET": str(self._kea_socket(state)),
            }
        )
        return env

    def settings(self, state: LabState) -> Any:
        from qrm_core.config import Settings

        return Settings(
            data_dir=self.data_dir,
            database_url=None,
            server_url=state.server_url,
            heartbeat_interval=state.heartbeat_interval,
            heartbeat_timeout=state.heartbeat_timeout,
            init_boot_image=False,
            actor="qrm-lab",
            disable_plugins=[],
        )

    def _spawn(
        self,
        state: LabState,
        key: str,
        argv: list[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> Proc:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.dir,
                pass_fds=pass_fds,
                start_new_session=True,
            )
        self._children.append(child)
        proc = Proc(name=key, pid=child.pid, start=procs.start_time(child.pid) or 0)
        return proc

    # -- up --------------------------------------------------------------

    def up(
        self,
        *,
        vms: int = 1,
        dhcp: str = "kea",
        cpus: int = 1,
        memory_mb: int = 256,
        port: int = DEFAULT_PORT,
        kernel_deb: Path | None = None,
        kernel_version: str | None = None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        firmware: str = "bios",
        hosts: int = 0,
    ) -> LabState:
        """Create the namespace, prepare the database, start the server, the helper and ``vms`` machines.

        ``firmware``: ``bios`` (SeaBIOS) or ``uefi`` (OVMF) for every machine, or a comma-separated
        list with one per machine (``bios,uefi``). ``hosts``: hypervisor hosts (libvirtd + QEMU)
        registered as host resources ``hv1``... for partitions."""
        firmwares = check_options(
            vms=vms, dhcp=dhcp, cpus=cpus, memory_mb=memory_mb, port=port, firmware=firmware
        )
        if not 0.5 <= heartbeat_interval <= 60 or heartbeat_timeout < 3 * heartbeat_interval:
            raise InvalidInput("the heartbeat timeout must be at least three heartbeat intervals")
        check_root()
        check_tools(dhcp, uefi="uefi" in firmwares)
        check_plugins_installed()
        check_hosts(hosts)
        if kernel_deb is not None and not kernel_deb.is_file():
            raise InvalidInput(f"--kernel-deb {kernel_deb}: no such file")
        with self._locked():
            existing = self.read_state()
            if existing is not None:
                if self._anything_alive(existing):
                    raise Conflict(
                        f"a lab is already up in {self.dir} (namespace {existing.netns}); "
                        "'qrm lab down' first, or use --dir"
                    )
                self.progress(f"removing what an earlier lab left in {self.dir}")
                self._teardown(existing)
            listener = self._bind(port)
            state = LabState(
                netns=self._netns_name(),
                dhcp=dhcp,
                port=listener.getsockname()[1],
                password=secrets.token_urlsafe(12),
                heartbeat_interval=heartbeat_interval,
                heartbeat_timeout=heartbeat_timeout,
            )
            state.processes["up"] = procs.track("qrm lab up", os.getpid(), group=False)
            self._write_state(state)
            try:
                self._network(state)
                self._start_hosts(state, hosts)
                self._prepare(state, kernel_deb, kernel_version)
                self._start_helper(state, listener)
                listener.close()
                self._start_server(state)
                for index in range(1, vms + 1):
                    spec = qemu.vm_spec(index, cpus=cpus, memory_mb=memory_mb, firmware=firmwares[index - 1])
                    state.vms[spec.name] = spec
                    self._add_tap(state, spec)
                    self._power_on(state, spec, fresh=True)
                state.status = "up"
                state.processes.pop("up", None)
                self._write_state(state)
            except BaseException as exc:
                listener.close()
                why = exc.message if isinstance(exc, QrmError) else type(exc).__name__
                self.progress(f"qrm lab up failed ({why}); tearing down")
                self._teardown(state)
                raise
        return state

    def _netns_name(self) -> str:
        base = f"qrmlab-{os.getpid()}"
        name, n = base, 1
        while procs.netns_exists(name):
            n += 1
            name = f"{base}-{n}"
        return name

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            sock.close()
            raise InvalidInput(
                f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); choose another with --port"
            ) from None
        sock.listen(128)
        return sock

    def _network(self, state: LabState) -> None:
        ns = state.netns
        self.progress(f"network namespace {ns}: bridge {BRIDGE} {SERVER_IP}/{PREFIX_LEN}")
        procs.run_ip("netns", "add", ns)
        steps = [
            ["link", "set", "lo", "up"],
            [
                "link",
                "add",
                BRIDGE,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
                "mcast_snooping",
                "0",
            ],
            ["link", "set", BRIDGE, "address", BRIDGE_MAC],
            # A veth pair keeps the bridge's carrier up before any machine exists.
            ["link", "add", "keep0", "type", "veth", "peer", "name", "keep1"],
            ["link", "set", "keep0", "master", BRIDGE],
            ["link", "set", "keep0", "up"],
            ["link", "set", "keep1", "up"],
            ["addr", "add", f"{SERVER_IP}/{PREFIX_LEN}", "dev", BRIDGE],
            ["link", "set", BRIDGE, "up"],
        ]
        for step in steps:
            procs.run_ip("-n", ns, *step)

    def _add_tap(self, state: LabState, spec: qemu.VmSpec) -> None:
        if procs.run_ip("-n", state.netns, "link", "show", spec.tap, check=False).returncode == 0:
            return
        procs.run_ip("-n", state.netns, "tuntap", "add", "dev", spec.tap, "mode", "tap")
        procs.run_ip("-n", state.netns, "link", "set", spec.tap, "master", BRIDGE)
        procs.run_ip("-n", state.netns, "link", "set", spec.tap, "up")

    def _prepare(self, state: LabState, kernel_deb: Path | None, kernel_version: str | None) -> None:
        """A fresh data directory and database with everything a first VE needs."""
        from qrm_core import db
        from qrm_core.plugins import PluginSystem
        from qrm_core.services import service_context, setup, storage
        from qrm_core.services import virtual_environments as ves

        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(parents=True)
        env = self.env(state)  # before the settings: it may pick a short Kea socket path
        settings = self.settings(state)
        plugins = PluginSystem(settings).load()
        check_plugins_usable(plugins)
        self.progress(f"database {settings.effective_database_url.removeprefix('sqlite:///')}")
        setup.init(
            settings, admin_password=state.password, actor="qrm-lab", plugins=plugins, boot_image=False
        )
        try:
            with service_context(settings, actor="qrm-lab", plugins=plugins) as ctx:
                self._boot_image(ctx, state, kernel_deb, kernel_version)
                storage.add_storage(
                    ctx,
                    name=STORAGE,
                    type="ramdisk",
                    address=SERVER_IP,
                    comment="the lab's qrm server: roots in RAM",
                )
            self.progress(f"filesystem image {FS_IMAGE}: a busybox root (qrm_core.lab.rootfs)")
            tree = rootfs.build_rootfs(self.dir / "rootfs")
            _run(
                qrm_argv(
                    "ramdisk",
                    "import",
                    FS_IMAGE,
                    "--storage",
                    STORAGE,
                    "--from",
                    str(tree),
                    "--size",
                    str(FS_SIZE_MB),
                ),
                "qrm ramdisk import",
                env=env,
            )
            with service_context(settings, actor="qrm-lab", plugins=plugins) as ctx:
                ves.create_ve(
                    ctx,
                    name=VE,
                    boot_image=BOOT_IMAGE,
                    fs_image=FS_IMAGE,
                    failover=True,
                    comment="the lab's example: 'qrm ve start web'",
                )
            if state.hosts:
                with service_context(settings, actor="qrm-lab", plugins=plugins) as ctx:
                    self._register_hosts(ctx, state)
        finally:
            db.dispose_engines()

    def host_dir(self, name: str) -> Path:
        return self.dir / "hosts" / name

    def daemons(self, state: LabState | None = None) -> dict[str, Any]:
        """The hypervisor hosts' libvirt daemons (``LibvirtDaemon``), by host name."""
        from qrm_core.lab.libvirtd import LibvirtDaemon

        state = state or self.require_state()
        return {name: LibvirtDaemon.from_dict(data) for name, data in state.hosts.items()}

    def _start_hosts(self, state: LabState, count: int) -> None:
        """``count`` libvirt daemons in the namespace (their guests' taps join ``br0``), each tracked by PID."""
        from qrm_core.lab.libvirtd import LibvirtDaemon

        for index in range(1, count + 1):
            name = f"hv{index}"
            directory = self.host_dir(name)
            if directory.exists():
                shutil.rmtree(directory)
            daemon = LibvirtDaemon(directory, netns=state.netns)
            # Recorded before it starts: 'down' stops it even if 'up' dies now.
            state.hosts[name] = daemon.to_dict()
            self._write_state(state)
            try:
                daemon.start()
            finally:
                state.hosts[name] = daemon.to_dict()
                self._write_state(state)
            self.progress(f"hypervisor host {name}: libvirtd (pid {daemon.pid}) at {daemon.uri}")

    def _register_hosts(self, ctx: Any, state: LabState) -> None:
        """Each host as a host resource of the qemu hypervisor (what ``qrm resource add
        --hypervisor qemu --libvirt-uri`` does), its partitions on ``br0``."""
        from qrm_core.services import resources

        cpus = os.cpu_count() or 1
        memory = HOST_MEMORY_MB
        with contextlib.suppress(OSError, ValueError, IndexError):
            total = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) // 1024
            memory = min(memory, total)
        for index, (name, data) in enumerate(sorted(state.hosts.items()), start=1):
            socket_path = Path(data["socket_dir"]) / "libvirt-sock"
            resources.add_resource(
                ctx,
                mac=f"02:77:00:00:f0:{index:02x}",
                hostname=name,
                hypervisor=HOST_PLUGIN[0],
                hypervisor_uri=f"qemu+unix:///system?socket={socket_path}",
                network=BRIDGE,
                cpus=cpus,
                memory_mb=memory,
                comment="the lab's hypervisor host: a libvirtd in the lab's namespace",
            )
            # TCG (a real guest hangs under this machine's KVM); both daemons share the
            # namespace, so a live migration's stream goes over its loopback.
            resources.set_resource(
                ctx, name, host_settings={"domain_type": "qemu", "migration_address": "127.0.0.1"}
            )

    def _boot_image(
        self, ctx: Any, state: LabState, kernel_deb: Path | None, kernel_version: str | None
    ) -> None:
        from qrm_core.services import boot_build, boot_images

        version, deb = find_kernel(kernel_deb, kernel_version, self.progress)
        state.kernel_version = version
        cached = cache_root() / "boot" / boot_cache_key(deb, CMDLINE)
        if (cached / "vmlinuz").is_file() and (cached / "initrd").is_file():
            self.progress(f"boot image {BOOT_IMAGE}: kernel {version} (cached build)")
            boot_images.add_boot_image(
                ctx,
                name=BOOT_IMAGE,
                kernel_version=version,
                kernel=cached / "vmlinuz",
                initrd=cached / "initrd",
                cmdline=CMDLINE,
                make_default=True,
                comment=f"built by qrm lab from {deb.name}",
            )
            return
        self.progress(f"boot image {BOOT_IMAGE}: building from {deb.name} (a few seconds; cached afterwards)")
        image = boot_build.create_boot_image(
            ctx,
            name=BOOT_IMAGE,
            kernel_version=version,
            kernel_deb=deb,
            make_default=True,
            cmdline=CMDLINE,
            comment=f"built by qrm lab from {deb.name}",
        )
        assert image.kernel_path and image.initrd_path
        # Into the cache for the next lab: written aside, then renamed (a concurrent lab may win; fine).
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cached.parent))
        try:
            shutil.copyfile(image.kernel_path, tmp / "vmlinuz")
            shutil.copyfile(image.initrd_path, tmp / "initrd")
            os.replace(tmp, cached)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)

    def _start_helper(self, state: LabState, listener: socket.socket) -> None:
        fd = listener.fileno()
        argv = [
            sys.executable,
            "-m",
            "qrm_core.lab.helper",
            "--netns",
            state.netns,
            "--listen-fd",
            str(fd),
            "--target",
            f"{SERVER_IP}:{SERVER_PORT}",
            "--ra-interface",
            BRIDGE,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("QRM_")}
        state.processes["helper"] = self._spawn(
            state, "helper", argv, self.log_dir / "helper.log", env=env, pass_fds=(fd,)
        )
        self._write_state(state)

    def _start_server(self, state: LabState) -> None:
        argv = [
            IP,
            "netns",
            "exec",
            state.netns,
            *qrm_argv("server", "--host", SERVER_IP, "--port", str(SERVER_PORT)),
        ]
        log = self.log_dir / "server.log"
        self.progress(f"qrm server on {state.server_url} (DHCP: {state.dhcp}, TFTP) inside {state.netns}")
        state.processes["server"] = self._spawn(state, "server", argv, log, env=self.env(state))
        self._write_state(state)
        deadline = time.monotonic() + 90
        while True:
            if not procs.alive(state.processes["server"]):
                self._reap()
                raise DriverError(f"qrm server exited at start: {_tail(log)} (log: {log})")
            if self._health(state):
                break
            if time.monotonic() > deadline:
                raise DriverError(f"qrm server did not answer within 90 s (log: {log})")
            time.sleep(0.25)
        # The services start before the server answers; a failed one is an error event.
        with self.client(state) as client:
            for event in client.events(200, None):
                if "failed to start" in event.message:
                    raise PluginError(f"qrm server: {event.message}")

    def _health(self, state: LabState) -> bool:
        import httpx

        try:
            return httpx.get(f"{state.url}/api/v1/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def vars_path(self, name: str) -> Path:
        """A UEFI machine's variable store (its NVRAM): kept from power-on to power-on, removed by ``down``."""
        return self.vm_dir(name) / qemu.VARS_FILE

    def _power_on(self, state: LabState, spec: qemu.VmSpec, *, fresh: bool = False) -> None:
        """Start the machine's QEMU; ``fresh``: a UEFI machine starts with empty variables (``up``)."""
        directory = self.vm_dir(spec.name)
        directory.mkdir(parents=True, exist_ok=True)
        variables = None
        if spec.firmware == "uefi":
            variables = qemu.make_vars(self.vars_path(spec.name), fresh=fresh)
        argv = [IP, "netns", "exec", state.netns, *qemu.qemu_argv(spec, directory / "console.log", variables)]
        state.powered_on[spec.name] = time.time()
        state.vm_procs[spec.name] = self._spawn(state, spec.name, argv, directory / "qemu.log")
        self._write_state(state)
        time.sleep(0.3)
        if not procs.alive(state.vm_procs[spec.name]):
            self._reap()
            raise DriverError(f"QEMU for {spec.name} exited at start: {_tail(directory / 'qemu.log')}")
        self.progress(
            f"{spec.name} powered on ({spec.mac}, {spec.cpus} CPU, {spec.memory_mb} MB, "
            f"{'UEFI (OVMF)' if spec.firmware == 'uefi' else 'BIOS'})"
        )

    # -- down ------------------------------------------------------------

    def _anything_alive(self, state: LabState) -> bool:
        mine = [p for p in state.processes.values() if p.pid != os.getpid()]
        return procs.netns_exists(state.netns) or any(
            procs.alive(p) for p in [*mine, *state.vm_procs.values()]
        )

    def _teardown(self, state: LabState) -> list[str]:
        """Stop every recorded process, anything left in the namespace, delete it; remove the state file."""
        done: list[str] = []
        others = [p for k, p in state.processes.items() if k == "up" and p.pid != os.getpid()]
        if any(procs.alive(p) for p in others):
            procs.stop(others, timeout=5)
            done.append("stopped an unfinished 'qrm lab up'")
        machines = [p for p in state.vm_procs.values() if procs.alive(p)]
        procs.stop(machines, timeout=10, reap=self._children)
        done += [f"powered off {p.name} (pid {p.pid})" for p in machines]
        for name, daemon in self.daemons(state).items():
            if daemon.alive() or daemon.guest_pids():
                pid = daemon.pid
                daemon.stop()
                done.append(f"stopped hypervisor host {name} (libvirtd pid {pid}) and its partitions")
        for key in ("server", "helper"):
            proc = state.processes.get(key)
            if proc is not None and procs.alive(proc):
                procs.stop([proc], timeout=20, reap=self._children)
                done.append(f"stopped the {'qrm server' if key == 'server' else 'helper'} (pid {proc.pid})")
        if procs.netns_exists(state.netns):
            procs.delete_netns(state.netns)
            done.append(f"deleted network namespace {state.netns}")
        for directory in state.extra_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        for name in state.vms:
            with contextlib.suppress(FileNotFoundError):
                self.vars_path(name).unlink()
        self._reap()
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        return done

    def down(self) -> list[str]:
        """Remove everything the state file names; nothing to do is not an error."""
        check_root()
        state = self.read_state()
        if state is None:
            return []
        others = [p for k, p in state.processes.items() if k == "up" and p.pid != os.getpid()]
        stopped = [f"stopped an unfinished 'qrm lab up' (pid {p.pid})" for p in others if procs.alive(p)]
        # An unfinished 'up' holds the lock: stop it first, then take the lock.
        procs.stop(others, timeout=5)
        with self._locked():
            state = self.read_state()
            if state is None:
                return stopped
            return stopped + self._teardown(state)

    # -- machines --------------------------------------------------------

    def vm_start(self, name: str) -> qemu.VmSpec:
        check_root()
        with self._locked():
            state = self._running_state()
            spec = self._spec(state, name)
            proc = state.vm_procs.get(name)
            if proc is not None and procs.alive(proc):
                raise Conflict(f"{name} is already running (pid {proc.pid})")
            self._add_tap(state, spec)
            self._power_on(state, spec)
            return spec

    def vm_disk(self, name: str, image: Path) -> qemu.VmSpec:
        """Give a powered-off machine a local disk (a raw image file, ``/dev/vdX`` to it)
        from its next power-on: what a machine with a disk of its own looks like."""
        check_root()
        if not image.is_file():
            raise NotFound(f"no disk image {image}")
        with self._locked():
            state = self._running_state()
            spec = self._spec(state, name)
            proc = state.vm_procs.get(name)
            if proc is not None and procs.alive(proc):
                raise Conflict(f"{name} is running: power it off first")
            spec.extra = [*spec.extra, "-drive", qemu.disk_option(image)]
            self._write_state(state)
            return spec

    def vm_kill(self, name: str) -> Proc:
        """Pull the plug: SIGKILL, no shutdown (what a failed machine looks like)."""
        check_root()
        with self._locked():
            state = self._running_state()
            self._spec(state, name)
            proc = state.vm_procs.get(name)
            if proc is None or not procs.alive(proc):
                raise Conflict(f"{name} is not running")
            procs.kill(proc, reap=self._children)
            self._reap()
            state.vm_procs.pop(name, None)
            self._write_state(state)
            return proc

    def _running_state(self) -> LabState:
        state = self.require_state()
        if state.status != "up" or not procs.netns_exists(state.netns):
            raise Conflict(f"the lab in {self.dir} is not up ('qrm lab status')")
        return state

    @staticmethod
    def _spec(state: LabState, name: str) -> qemu.VmSpec:
        spec = state.vms.get(name)
        if spec is None:
            raise NotFound(f"the lab has no machine {name!r}; it has {', '.join(state.vms) or 'none'}")
        return spec

    # -- looking at it ---------------------------------------------------

    @contextlib.contextmanager
    def client(self, state: LabState | None = None) -> Iterator[Any]:
        """The lab's server through its API, from this machine (the forwarder)."""
        from qrm_core.client import RemoteClient

        state = state or self.require_state()
        client = RemoteClient(state.url, user=ADMIN, password=state.password, timeout=30)
        try:
            yield client
        finally:
            client.close()

    def status(self) -> dict[str, Any]:
        """Everything ``qrm lab status`` shows, as plain data."""
        state = self.require_state()
        resources: dict[str, Any] = {}
        problem = ""
        server = state.processes.get("server")
        if server is not None and procs.alive(server):
            try:
                with self.client(state) as client:
                    resources = {r.mac: r for r in client.resource_list(None, None, None, 0, None).items}
            except QrmError as exc:
                problem = exc.message
        else:
            problem = "qrm server is not running"
        machines = []
        for name, spec in state.vms.items():
            proc = state.vm_procs.get(name)
            running = proc is not None and procs.alive(proc)
            res = resources.get(spec.mac)
            machines.append(
                {
                    "name": name,
                    "mac": spec.mac,
                    "cpus": spec.cpus,
                    "memory_mb": spec.memory_mb,
                    "firmware": spec.firmware,
                    "power": "on" if running else "off",
                    "pid": proc.pid if running and proc else None,
                    "resource": res.id if res else None,
                    "state": res.state if res else None,
                    "ve": res.ve if res else None,
                    "ip": res.ip if res else None,
                }
            )
        return {
            "directory": str(self.dir),
            "status": state.status,
            "netns": state.netns,
            "netns_exists": procs.netns_exists(state.netns),
            "dhcp": state.dhcp,
            "kernel": state.kernel_version,
            "server_url": state.server_url,
            "url": state.url,
            "user": ADMIN,
            "processes": [
                {"name": key, "pid": p.pid, "running": procs.alive(p)} for key, p in state.processes.items()
            ],
            "machines": machines,
            "hosts": [
                {"name": name, "uri": daemon.uri, "pid": daemon.pid, "running": daemon.alive()}
                for name, daemon in self.daemons(state).items()
            ],
            "problem": problem,
        }

    def env_lines(self) -> list[str]:
        """Shell lines that point ``qrm`` at the lab (``eval "$(qrm lab env)"``)."""
        state = self.require_state()
        return [
            f"export QRM_SERVER={state.url}",
            f"export QRM_USER={ADMIN}",
            f"export QRM_PASSWORD={state.password}",
        ]
