"""The hypervisor driver both libvirt plugins are made of.

:class:`LibvirtHypervisor` implements every operation of
:class:`~qrm_core.drivers.base.HypervisorDriver` that libvirt offers, once:
the QEMU and Xen plugins subclass it and say only what differs (the domain
XML of a partition, the URI family, Xen's config files). Connections come
from the process-wide pool (:mod:`qrm_libvirt.connections`), libvirt's errors
become one-line qrm errors (:mod:`qrm_libvirt.errors`), and migration goes
through a replaceable :class:`~qrm_libvirt.migration.Migrator`.

Operations and the libvirt calls behind them:

=====================  =====================================================
create_partition       ``defineXMLFlags(xml, VIR_DOMAIN_DEFINE_VALIDATE)``
start_partition        ``create``
stop_partition         ``shutdown`` (ACPI), then ``destroy`` after the timeout
destroy_partition      ``destroy`` + ``undefineFlags``
reboot_partition       ``reset`` (boots from the network again)
pause / unpause        ``suspend`` / ``resume``
set_memory             ``setMemoryFlags`` (``AFFECT_LIVE`` and/or ``AFFECT_CONFIG``)
set_vcpus              ``setVcpusFlags`` (the same)
pin_vcpus              ``pinVcpuFlags`` (the same)
migrate_partition      ``migrate3`` / ``migrateToURI3`` (:mod:`qrm_libvirt.migration`)
list_partitions        one ``getAllDomainStats`` sweep
=====================  =====================================================
"""

from __future__ import annotations

import abc
import ipaddress
import random
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, urlsplit

from qrm_core.plugin_api import (
    DriverError,
    HostInfo,
    HostTarget,
    HypervisorDriver,
    InvalidInput,
    PartitionInfo,
    PartitionSpec,
    QrmError,
)
from qrm_libvirt import binding, domxml
from qrm_libvirt.binding import libvirt
from qrm_libvirt.connections import ConnectionPool, pool
from qrm_libvirt.errors import LimitExceeded, PartitionStateError, safe_uri, translate
from qrm_libvirt.events import domain_state
from qrm_libvirt.migration import MODES, LibvirtMigrator, MigrationRequest, Migrator
from qrm_libvirt.settings import HOST_SETTINGS, HypervisorSettings, LibvirtSettings

T = TypeVar("T")

#: libvirt transports qrm accepts in a host URI. Not ``ext``: it runs a command named in the URI.
TRANSPORTS = ("", "ssh", "libssh", "libssh2", "tcp", "tls", "unix")
#: URI query parameters qrm refuses: they name programs to run.
FORBIDDEN_PARAMS = ("command", "netcat")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
MIN_MEMORY_MB = 16
MAX_VCPUS = 255


@dataclass
class _Facts:
    """What the XML says and the statistics do not: cached per host and domain name
    (with the domain's UUID: a domain defined again under the same name is read again)."""

    uuid: str
    mac: str
    max_vcpus: int
    pinning: dict[int, tuple[int, ...]]
    memory_target_kib: int | None = None


def parse_version(number: int) -> str:
    """libvirt's packed version (``7002022``) as text (``7.2.22``)."""
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


class LibvirtHypervisor(HypervisorDriver):
    """A hypervisor reached through libvirt. Subclasses set the class variables
    and implement :meth:`definition`; they may extend the hooks
    (:meth:`defined`, :meth:`removed`, :meth:`moved`)."""

    #: The URI family: ``qemu`` (``qemu``, ``qemu+ssh``, ...) or ``xen``.
    family: ClassVar[str]
    #: The URI of a host given only its address.
    default_uri: ClassVar[str]
    #: Partitions get MACs under this prefix when qrm gives none.
    mac_prefix: ClassVar[str] = "52:54:00"
    #: The plugin's own settings.
    settings_class: ClassVar[type[HypervisorSettings]] = HypervisorSettings
    #: The bridge partitions join when neither the partition nor its host names one.
    default_bridge: ClassVar[str] = "br0"
    #: Host settings the flavour understands besides :data:`~qrm_libvirt.settings.HOST_SETTINGS`.
    flavour_host_settings: ClassVar[Mapping[str, str]] = {}
    #: ``undefineFlags`` names (libxl refuses some that QEMU takes).
    undefine_flags: ClassVar[tuple[str, ...]] = ("VIR_DOMAIN_UNDEFINE_MANAGED_SAVE",)

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.migrator: Migrator = LibvirtMigrator()
        self._own: HypervisorSettings | None = None
        self._facts: dict[tuple[str, str], _Facts] = {}
        self._facts_lock = threading.Lock()
        #: Per URI: whether getAllDomainStats reports sizes (QEMU, libxl) or only states (test driver).
        self._stats_have_sizes: dict[str, bool] = {}
        #: Per URI: whether the live balloon reaches a new size at once (the test driver) or later.
        self._balloon_follows: dict[str, bool] = {}
        #: Hosts validate_host accepted (their URI, network and settings), and the objects.
        self._valid_hosts: set[tuple[Any, ...]] = set()
        self._valid_objects: dict[int, HostTarget] = {}

    # -- what flavours provide ----------------------------------------------

    @abc.abstractmethod
    def definition(self, host: HostTarget, conn: Any, spec: PartitionSpec) -> domxml.DomainDefinition:
        """The domain to define for ``spec`` on ``host`` (``conn`` is open to it)."""

    def defined(self, host: HostTarget, conn: Any, dom: Any) -> None:
        """Called after the partition was defined and after each persistent change
        (Xen writes its config file here). Raising undoes a create."""

    def removed(self, host: HostTarget, name: str) -> None:
        """Called after the partition was undefined (Xen removes its config file)."""

    def moved(self, host: HostTarget, destination: HostTarget, name: str, dest_conn: Any) -> None:
        """Called after a migration (Xen writes the config on the destination, removes it on the source)."""

    def migration_tuning(self) -> dict[str, Any]:
        """Extra :class:`~qrm_libvirt.migration.MigrationRequest` fields of a live move
        (QEMU's downtime, auto-converge, multifd); none by default (libxl has none of them)."""
        return {}

    def check_host_setting(self, key: str, value: str) -> None:
        """Check a flavour's own host setting (raise InvalidInput)."""

    # -- settings and plumbing ----------------------------------------------

    def detect_missing_dependencies(self) -> list[str]:
        """libvirt-python, if it is missing: the plugin's own dependency, in one line.

        A host this process cannot reach is not the plugin's problem but the host's:
        operations on it fail with "cannot reach host H (URI): why", and the lifecycle
        watcher and the partition sync record it as an event on the host resource.
        """
        return binding.missing()

    def own_settings(self) -> HypervisorSettings:
        if self._own is None:
            self._own = self.settings_class.load()
        return self._own

    def pool(self) -> ConnectionPool:
        shared = pool()
        if not getattr(shared, "_configured", False):
            conf = LibvirtSettings.load()
            shared.connect_timeout = conf.connect_timeout
            shared.keepalive_interval = conf.keepalive_interval
            shared.keepalive_count = conf.keepalive_count
            shared._configured = True  # type: ignore[attr-defined]
        return shared

    def host_setting(self, host: HostTarget, key: str, default: str | None = None) -> str | None:
        value = host.settings.get(key) if host.settings else None
        return value if value not in (None, "") else default

    def uri(self, host: HostTarget) -> str:
        """The host's libvirt URI: its own, or :attr:`default_uri` built from its address."""
        if host.uri:
            return host.uri
        if not host.address:
            raise InvalidInput(
                f"host {host.label} has no IP address and no libvirt URI; "
                f"set one with 'qrm resource set {host.label} --libvirt-uri URI'"
            )
        address = f"[{host.address}]" if ":" in host.address else host.address
        return self.default_uri.format(address=address)

    def _family_of(self, uri: str) -> str:
        return urlsplit(uri).scheme.split("+", 1)[0].lower()

    def _run(
        self,
        host: HostTarget,
        doing: str,
        work: Callable[[Any], T],
        *,
        partition: str | None = None,
        operation: str | None = None,
        retry: bool = True,
    ) -> T:
        """``work(connection)`` on the host, libvirt's errors turned into qrm's."""
        uri = self.uri(host)
        lv = libvirt()
        try:
            result: T = self.pool().call(uri, host.label, work, retry=retry)
        except lv.libvirtError as exc:
            raise translate(
                exc,
                host=host.label,
                uri=uri,
                doing=doing,
                partition=partition,
                driver=self.name,
                operation=operation,
            ) from None
        return result

    def _domain(self, conn: Any, name: str) -> Any:
        return conn.lookupByName(name)

    # -- validation -----------------------------------------------------------

    def validate_host(self, host: HostTarget) -> None:
        """Checked once per host object and per set of values (the checks parse the URI)."""
        if self._valid_objects.get(id(host)) is host:
            return
        key = (host.uri, host.address, host.label, host.network, tuple(sorted((host.settings or {}).items())))
        if key not in self._valid_hosts:
            self._validate_host(host)
            if len(self._valid_hosts) > 4096:
                self._valid_hosts.clear()
            self._valid_hosts.add(key)
        if len(self._valid_objects) > 256:
            self._valid_objects.clear()
        self._valid_objects[id(host)] = host

    def _validate_host(self, host: HostTarget) -> None:
        uri = self.uri(host)
        if len(uri) > 1024 or _CONTROL.search(uri):
            raise InvalidInput(f"libvirt URI of host {host.label} has spaces or control characters")
        try:
            parts = urlsplit(uri)
            query = parse_qsl(parts.query, keep_blank_values=True)
        except ValueError as exc:
            raise InvalidInput(
                f"libvirt URI {safe_uri(uri)!r} of host {host.label} is invalid: {exc}"
            ) from None
        family, _, transport = parts.scheme.lower().partition("+")
        if family not in (self.family, "test"):
            raise InvalidInput(
                f"libvirt URI {safe_uri(uri)!r} of host {host.label} is not a {self.family} URI "
                f"({self.family}://, {self.family}+ssh://...)"
            )
        if transport not in TRANSPORTS:
            raise InvalidInput(
                f"libvirt URI {safe_uri(uri)!r} of host {host.label}: transport {transport!r} is not "
                f"accepted (use {', '.join(t for t in TRANSPORTS if t)})"
            )
        bad = [k for k, _ in query if k.lower() in FORBIDDEN_PARAMS]
        if bad:
            raise InvalidInput(f"libvirt URI of host {host.label}: parameter {bad[0]!r} is not accepted")
        if parts.hostname and not (_is_ip(parts.hostname) or _HOSTNAME.fullmatch(parts.hostname)):
            raise InvalidInput(f"libvirt URI of host {host.label}: {parts.hostname!r} is not a host name")
        if host.network is not None:
            self.check_bridge(host.network, f"host {host.label}'s network")
        known = {**HOST_SETTINGS, **self.flavour_host_settings}
        for key, value in (host.settings or {}).items():
            if key not in known:
                raise InvalidInput(
                    f"unknown {self.name} host setting {key!r}; known: {', '.join(sorted(known))}"
                )
            self._check_host_setting(host, key, value)

    def _check_host_setting(self, host: HostTarget, key: str, value: str) -> None:
        if key == "shutdown_timeout":
            try:
                ok = 0 <= float(value) <= 3600
            except ValueError:
                ok = False
            if not ok:
                raise InvalidInput(f"host setting shutdown_timeout={value!r}: seconds from 0 to 3600")
        elif key == "migration":
            if value not in MODES:
                raise InvalidInput(f"host setting migration={value!r}: use {' or '.join(MODES)}")
        elif key == "migration_address":
            if not (_is_ip(value) or _HOSTNAME.fullmatch(value)):
                raise InvalidInput(f"host setting migration_address={value!r} is not an address or host name")
        elif key == "console_log_dir":
            if not domxml.PATH_RE.fullmatch(value) or "/../" in f"{value}/":
                raise InvalidInput(f"host setting console_log_dir={value!r} must be an absolute path")
        else:
            self.check_host_setting(key, value)

    @staticmethod
    def check_bridge(name: str, what: str) -> None:
        if not domxml.BRIDGE_RE.fullmatch(name or ""):
            raise InvalidInput(
                f"{what} {name!r} is not a bridge name (1-15 letters, digits, '_', '.', '-', "
                "starting with a letter or digit)"
            )

    def validate_partition(self, host: HostTarget, spec: PartitionSpec) -> None:
        super().validate_partition(host, spec)
        if spec.memory_mb < MIN_MEMORY_MB:
            raise InvalidInput(f"a {self.name} partition needs at least {MIN_MEMORY_MB} MB of memory")
        if (spec.max_cpus or spec.cpus) > MAX_VCPUS:
            raise InvalidInput(f"a {self.name} partition has at most {MAX_VCPUS} virtual CPUs")
        if spec.network is not None:
            self.check_bridge(spec.network, f"partition {spec.name}'s network")
        # Core records a partition only after this: a host that does not answer is refused
        # now, in one line, with nothing recorded (the pool keeps the connection for the create).
        self._run(host, f"reach host {host.label}", lambda conn: None)

    def bridge(self, host: HostTarget, spec: PartitionSpec) -> str:
        return spec.network or host.network or self.default_bridge

    def mac(self, spec: PartitionSpec) -> str:
        if spec.mac:
            return spec.mac.lower()
        tail = ":".join(f"{random.randint(0, 255):02x}" for _ in range(3))
        return f"{self.mac_prefix}:{tail}"

    def console_log(self, host: HostTarget, name: str) -> str | None:
        directory = self.host_setting(host, "console_log_dir")
        return f"{directory.rstrip('/')}/{name}.log" if directory else None

    # -- what the driver can do ---------------------------------------------

    def supported_operations(self, target: object | None = None) -> frozenset[str]:
        supported = set(super().supported_operations(target))
        if isinstance(target, HostTarget):
            try:
                uri = self.uri(target)
            except QrmError:
                return frozenset(supported)
            if not self.migrator.can_migrate(uri):
                supported.discard("migrate_partition")
        return frozenset(supported)

    # -- host ---------------------------------------------------------------

    def host_info(self, host: HostTarget) -> HostInfo:
        self.validate_host(host)

        def work(conn: Any) -> HostInfo:
            info = conn.getInfo()
            memory_mb = int(info[1])
            free_mb = int(conn.getFreeMemory()) // (1024 * 1024)
            if free_mb == 0:  # no NUMA cells reported (libvirt's test driver from a node file)
                used = sum(
                    d.info()[2] for d in conn.listAllDomains(libvirt().VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                )
                free_mb = max(0, memory_mb - used // 1024)
            count = conn.numOfDomains() + conn.numOfDefinedDomains()
            return HostInfo(
                hypervisor=str(conn.getType()).lower(),
                version=parse_version(int(conn.getVersion())),
                cpus=int(info[2]),
                memory_mb=memory_mb,
                free_memory_mb=free_mb,
                partitions=count,
            )

        return self._run(host, "read host information", work)

    def host_cpus(self, conn: Any) -> int:
        """The host's CPUs (numbered 0 to N-1), as ``getInfo`` counts them."""
        return int(conn.getInfo()[2])

    # -- partitions: reading --------------------------------------------------

    def _remember(self, uri: str, uuid: str, facts: domxml.DomainFacts) -> _Facts:
        cached = _Facts(
            uuid=uuid,
            mac=facts.mac,
            max_vcpus=facts.max_vcpus,
            pinning=dict(facts.pinning),
            memory_target_kib=facts.memory_target_kib,
        )
        with self._facts_lock:
            self._facts[(uri, facts.name)] = cached
        return cached

    def _forget(self, uri: str, name: str) -> None:
        with self._facts_lock:
            self._facts.pop((uri, name), None)

    def _info_of(self, uri: str, dom: Any) -> PartitionInfo:
        """Exact: the domain's live XML (or its definition when stopped) and state."""
        state = domain_state(dom.state()[0])
        facts = domxml.parse(dom.XMLDesc(0))
        self._remember(uri, dom.UUIDString(), facts)
        memory_kib = facts.memory_kib
        if state != "stopped" and facts.memory_target_kib:
            memory_kib = facts.memory_target_kib
        return PartitionInfo(
            name=facts.name,
            state=state,
            cpus=facts.vcpus,
            memory_mb=memory_kib // 1024,
            mac=facts.mac,
            cpu_pinning=dict(facts.pinning),
            max_cpus=facts.max_vcpus,
            max_memory_mb=facts.max_memory_kib // 1024,
        )

    def get_partition(self, host: HostTarget, name: str) -> PartitionInfo:
        self.validate_host(host)
        uri = self.uri(host)
        return self._run(
            host,
            f"read partition {name}",
            lambda conn: self._info_of(uri, self._domain(conn, name)),
            partition=name,
        )

    def list_partitions(self, host: HostTarget) -> list[PartitionInfo]:
        """One ``getAllDomainStats`` sweep (state, balloon, vCPUs of every domain), in
        libvirt's order.

        The MAC and the pinning are not in the statistics; they come from each
        domain's XML, read once per domain and kept (qrm's own changes update
        them). libvirt's test driver reports only states in its statistics; its
        sizes come from ``info()``, which there is an in-process call.
        """
        self.validate_host(host)
        uri = self.uri(host)
        lv = libvirt()

        def facts_of(dom: Any, name: str) -> _Facts:
            facts = self._facts.get((uri, name))
            uuid = dom.UUIDString()
            if facts is None or facts.uuid != uuid:
                facts = self._remember(uri, uuid, domxml.parse(dom.XMLDesc(0)))
            return facts

        def work(conn: Any) -> list[PartitionInfo]:
            found = []
            if self._stats_have_sizes.get(uri, True):
                wanted = lv.VIR_DOMAIN_STATS_STATE | lv.VIR_DOMAIN_STATS_BALLOON | lv.VIR_DOMAIN_STATS_VCPU
                records = conn.getAllDomainStats(wanted, 0)
                if not records or "balloon.maximum" in records[0][1]:
                    for dom, stats in records:
                        name = dom.name()
                        facts = facts_of(dom, name)
                        state = domain_state(stats.get("state.state", 5))
                        memory_kib = int(stats.get("balloon.current", stats.get("balloon.maximum", 0)))
                        if state != "stopped" and facts.memory_target_kib:
                            memory_kib = facts.memory_target_kib
                        found.append(
                            PartitionInfo(
                                name=name,
                                state=state,
                                cpus=int(stats.get("vcpu.current", 1)),
                                memory_mb=memory_kib // 1024,
                                mac=facts.mac,
                                cpu_pinning=facts.pinning,  # shared with the cache: read-only
                                max_cpus=int(stats.get("vcpu.maximum", facts.max_vcpus)),
                                max_memory_mb=int(stats.get("balloon.maximum", memory_kib)) // 1024,
                            )
                        )
                    return found
                self._stats_have_sizes[uri] = False
            # The test driver's statistics have states only; its info() is an in-process call.
            for dom in conn.listAllDomains(0):
                name = dom.name()
                facts = facts_of(dom, name)
                code, max_kib, memory_kib, vcpus, _ = dom.info()
                state = domain_state(code)
                if state != "stopped" and facts.memory_target_kib:
                    memory_kib = facts.memory_target_kib
                found.append(
                    PartitionInfo(
                        name=name,
                        state=state,
                        cpus=vcpus,
                        memory_mb=memory_kib // 1024,
                        mac=facts.mac,
                        cpu_pinning=facts.pinning,
                        max_cpus=facts.max_vcpus,
                        max_memory_mb=max_kib // 1024,
                    )
                )
            return found

        return self._run(host, "list partitions", work)

    # -- partitions: life cycle ---------------------------------------------

    def _exists(self, conn: Any, name: str) -> bool:
        lv = libvirt()
        try:
            conn.lookupByName(name)
        except lv.libvirtError as exc:
            if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
                return False
            raise
        return True

    def create_partition(self, host: HostTarget, spec: PartitionSpec) -> PartitionInfo:
        self.validate_host(host)
        self.validate_partition(host, spec)
        uri = self.uri(host)
        lv = libvirt()

        def work(conn: Any) -> PartitionInfo:
            if self._exists(conn, spec.name):
                raise DriverError(f"partition {spec.name} already exists on host {host.label}")
            xml = domxml.render(self.definition(host, conn, spec))
            dom = conn.defineXMLFlags(xml, lv.VIR_DOMAIN_DEFINE_VALIDATE)
            try:
                self.defined(host, conn, dom)
            except BaseException:
                dom.undefine()
                raise
            return self._info_of(uri, dom)

        return self._run(host, f"create partition {spec.name}", work, partition=spec.name, retry=False)

    def start_partition(self, host: HostTarget, name: str) -> None:
        self.validate_host(host)

        lv = libvirt()

        def work(conn: Any) -> None:
            dom = self._domain(conn, name)
            if dom.isActive():
                return
            try:
                dom.create()
            except lv.libvirtError as exc:
                # Started meanwhile by someone else (the engine finishing the same creation): done.
                if exc.get_error_code() != lv.VIR_ERR_OPERATION_INVALID or not dom.isActive():
                    raise

        self._run(host, f"start partition {name}", work, partition=name)

    def stop_partition(self, host: HostTarget, name: str, force: bool = False) -> None:
        """ACPI power button, then ``destroy`` once the shutdown timeout passed
        (a paused partition cannot answer ACPI: it is pulled at once)."""
        self.validate_host(host)
        lv = libvirt()
        timeout = float(self.host_setting(host, "shutdown_timeout") or self.own_settings().shutdown_timeout)

        def work(conn: Any) -> None:
            dom = self._domain(conn, name)
            if not dom.isActive():
                return
            if not force and dom.state()[0] != lv.VIR_DOMAIN_PAUSED and timeout > 0:
                try:
                    dom.shutdown()
                except lv.libvirtError as exc:
                    if exc.get_error_code() != lv.VIR_ERR_OPERATION_INVALID:
                        raise
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if not dom.isActive():
                        return
                    time.sleep(0.2)
            try:
                dom.destroy()
            except lv.libvirtError as exc:
                # It went off by itself meanwhile: that is what was wanted.
                if exc.get_error_code() != lv.VIR_ERR_OPERATION_INVALID or dom.isActive():
                    raise

        self._run(host, f"stop partition {name}", work, partition=name, retry=False)

    def destroy_partition(self, host: HostTarget, name: str) -> None:
        self.validate_host(host)
        uri = self.uri(host)
        lv = libvirt()
        flags = 0
        for flag in self.undefine_flags:
            flags |= getattr(lv, flag, 0)

        def work(conn: Any) -> None:
            dom = self._domain(conn, name)
            if dom.isActive():
                try:
                    dom.destroy()
                except lv.libvirtError as exc:
                    if exc.get_error_code() != lv.VIR_ERR_OPERATION_INVALID or dom.isActive():
                        raise
            if dom.isPersistent():
                dom.undefineFlags(flags)
            self._forget(uri, name)

        self._run(host, f"destroy partition {name}", work, partition=name)
        self.removed(host, name)

    # -- partitions: optional operations ------------------------------------

    def _running(self, dom: Any, host: HostTarget, name: str, doing: str) -> int:
        code = dom.state()[0]
        if domain_state(code) == "stopped":
            raise PartitionStateError(f"cannot {doing}: partition {name} on host {host.label} is not running")
        return int(code)

    def reboot_partition(self, host: HostTarget, name: str) -> None:
        self.validate_host(host)

        def work(conn: Any) -> None:
            dom = self._domain(conn, name)
            self._running(dom, host, name, f"reboot partition {name}")
            dom.reset(0)

        self._run(host, f"reboot partition {name}", work, partition=name, operation="reboot_partition")

    def pause_partition(self, host: HostTarget, name: str) -> None:
        self.validate_host(host)
        lv = libvirt()

        def work(conn: Any) -> None:
            dom = self._domain(conn, name)
            if self._running(dom, host, name, f"pause partition {name}") == lv.VIR_DOMAIN_PAUSED:
                raise PartitionStateError(f"partition {name} on host {host.label} is paused already")
            dom.suspend()

        self._run(host, f"pause partition {name}", work, partition=name, operation="pause_partition")

    def unpause_partition(self, host: HostTarget, name: str) -> None:
        self.validate_host(host)
        lv = libvirt()

        def work(conn: Any) -> None:
            dom = self._domain(conn, name)
            if self._running(dom, host, name, f"resume partition {name}") != lv.VIR_DOMAIN_PAUSED:
                raise PartitionStateError(f"partition {name} on host {host.label} is not paused")
            dom.resume()

        self._run(host, f"resume partition {name}", work, partition=name, operation="unpause_partition")

    def _flags(self, dom: Any, name: str, live: bool, persistent: bool, what: str) -> int:
        """``AFFECT_LIVE`` (running partitions) and ``AFFECT_CONFIG`` (every partition qrm
        makes is persistent), as asked."""
        lv = libvirt()
        flags = 0
        if live and dom.isActive():
            flags |= lv.VIR_DOMAIN_AFFECT_LIVE
        if persistent:
            flags |= lv.VIR_DOMAIN_AFFECT_CONFIG
        if flags == 0:
            if not live and not persistent:
                raise InvalidInput(f"change {what} of partition {name}: neither live nor persistent")
            raise PartitionStateError(
                f"partition {name} is not running: only a persistent change of {what} applies"
            )
        return flags

    @staticmethod
    def _each(flags: int, call: Callable[[int], None]) -> None:
        """``call(AFFECT_LIVE)`` then ``call(AFFECT_CONFIG)``, for those in ``flags``: one at a
        time, as every libvirt driver takes them (the test driver refuses both at once)."""
        lv = libvirt()
        for flag in (lv.VIR_DOMAIN_AFFECT_LIVE, lv.VIR_DOMAIN_AFFECT_CONFIG):
            if flags & flag:
                call(flag)

    def _record_target(self, uri: str, dom: Any, kib: int) -> None:
        """Keep a new live balloon target in the domain's live metadata when the balloon has
        not reached it yet: libvirt reports the balloon's current size, which follows the
        target only as fast as the guest's balloon driver (never, without one), and qrm
        reports what it gave the partition. Backends whose balloon follows at once (the
        test driver) are noticed on the first change and spared the metadata."""
        lv = libvirt()
        if self._balloon_follows.get(uri, False):
            return
        if int(dom.info()[2]) == kib:
            self._balloon_follows.setdefault(uri, True)
            return
        self._balloon_follows[uri] = False
        element = f"<partition managed-by='qrm' memory-target-kib='{int(kib)}'/>"
        try:
            dom.setMetadata(
                lv.VIR_DOMAIN_METADATA_ELEMENT, element, "qrm", domxml.QRM_NS, lv.VIR_DOMAIN_AFFECT_LIVE
            )
        except lv.libvirtError as exc:
            if exc.get_error_code() not in (lv.VIR_ERR_NO_SUPPORT, lv.VIR_ERR_ARGUMENT_UNSUPPORTED):
                raise

    def _after_change(self, host: HostTarget, conn: Any, dom: Any, flags: int) -> None:
        lv = libvirt()
        self._forget(self.uri(host), dom.name())
        if flags & lv.VIR_DOMAIN_AFFECT_CONFIG:
            self.defined(host, conn, dom)

    def set_memory(
        self, host: HostTarget, name: str, memory_mb: int, *, live: bool = True, persistent: bool = True
    ) -> None:
        self.validate_host(host)
        if memory_mb < MIN_MEMORY_MB:
            raise InvalidInput(f"a {self.name} partition needs at least {MIN_MEMORY_MB} MB of memory")

        uri = self.uri(host)
        lv = libvirt()

        def work(conn: Any) -> None:
            dom = self._domain(conn, name)
            flags = self._flags(dom, name, live, persistent, "memory")
            kib = memory_mb * 1024

            def apply(flag: int) -> None:
                try:
                    dom.setMemoryFlags(kib, flag)
                except lv.libvirtError as exc:  # above the maximum: libvirt checks, qrm says it clearly
                    maximum = int(dom.maxMemory()) // 1024
                    if exc.get_error_code() == lv.VIR_ERR_INVALID_ARG and memory_mb > maximum:
                        raise LimitExceeded(
                            f"memory {memory_mb} MB is above the maximum of partition {name} "
                            f"({maximum} MB, set when it was created)"
                        ) from None
                    raise
                if flag == lv.VIR_DOMAIN_AFFECT_LIVE:
                    self._record_target(uri, dom, kib)

            self._each(flags, apply)
            self._after_change(host, conn, dom, flags)

        self._run(host, f"set the memory of partition {name}", work, partition=name, operation="set_memory")

    def _max_vcpus(self, dom: Any) -> int:
        return domxml.parse(dom.XMLDesc(libvirt().VIR_DOMAIN_XML_INACTIVE)).max_vcpus

    def set_vcpus(
        self, host: HostTarget, name: str, cpus: int, *, live: bool = True, persistent: bool = True
    ) -> None:
        self.validate_host(host)
        if cpus < 1:
            raise InvalidInput("a partition needs at least 1 virtual CPU")

        lv = libvirt()

        def work(conn: Any) -> None:
            dom = self._domain(conn, name)
            flags = self._flags(dom, name, live, persistent, "virtual CPUs")

            def apply(flag: int) -> None:
                try:
                    dom.setVcpusFlags(cpus, flag)
                except lv.libvirtError as exc:  # above the maximum: libvirt checks, qrm says it clearly
                    maximum = self._max_vcpus(dom)
                    if exc.get_error_code() == lv.VIR_ERR_INVALID_ARG and cpus > maximum:
                        raise LimitExceeded(
                            f"{cpus} virtual CPUs is above the maximum of partition {name} ({maximum}, set "
                            "when it was created)"
                        ) from None
                    raise

            self._each(flags, apply)
            self._after_change(host, conn, dom, flags)

        self._run(
            host, f"set the virtual CPUs of partition {name}", work, partition=name, operation="set_vcpus"
        )

    def pin_vcpus(
        self,
        host: HostTarget,
        name: str,
        pinning: dict[int, tuple[int, ...]],
        *,
        live: bool = True,
        persistent: bool = True,
    ) -> None:
        """``pinVcpuFlags`` per virtual CPU. A virtual CPU that is not online is
        pinned in the definition only. libvirt's test driver takes no flags:
        there a pinning applies to the current state (live while running)."""
        self.validate_host(host)
        if not pinning:
            raise InvalidInput("no pinning given (VCPU:CPULIST)")
        uri = self.uri(host)
        lv = libvirt()
        test_driver = uri.startswith("test:")

        def work(conn: Any) -> None:
            dom = self._domain(conn, name)
            host_cpus = self.host_cpus(conn)
            maximum = self._max_vcpus(dom)
            for vcpu, cpus in sorted(pinning.items()):
                if not 0 <= vcpu < maximum:
                    raise InvalidInput(
                        f"partition {name} has no virtual CPU {vcpu} (it has {maximum}: 0-{maximum - 1})"
                    )
                if not cpus:
                    raise InvalidInput(f"virtual CPU {vcpu} of partition {name} is pinned to no CPU")
                missing = [c for c in cpus if not 0 <= c < host_cpus]
                if missing:
                    raise InvalidInput(
                        f"host {host.label} has no CPU {missing[0]} (it has {host_cpus}: 0-{host_cpus - 1})"
                    )
            flags = self._flags(dom, name, live, persistent, "CPU pinning")
            active = bool(dom.isActive())
            online = int(dom.vcpusFlags(lv.VIR_DOMAIN_AFFECT_LIVE)) if active else 0
            plan = []
            for vcpu, cpus in sorted(pinning.items()):
                these = flags
                if vcpu >= online:
                    these &= ~lv.VIR_DOMAIN_AFFECT_LIVE
                    if these == 0:
                        raise InvalidInput(
                            f"virtual CPU {vcpu} of partition {name} is not online: only a persistent "
                            "pinning applies to it"
                        )
                plan.append((vcpu, tuple(c in cpus for c in range(host_cpus)), these))
            for vcpu, cpumap, these in plan:

                def pin(flag: int, vcpu: int = vcpu, cpumap: tuple[bool, ...] = cpumap) -> None:
                    if not test_driver:
                        dom.pinVcpuFlags(vcpu, cpumap, flag)
                    elif flag == lv.VIR_DOMAIN_AFFECT_LIVE:
                        dom.pinVcpuFlags(vcpu, cpumap, 0)  # the test driver's only flag: the live state
                    else:  # and it pins no definition: define it again with the pinning
                        self._pin_in_definition(conn, dom, vcpu, cpumap)

                self._each(these, pin)
            self._after_change(host, conn, dom, flags)

        self._run(host, f"pin the CPUs of partition {name}", work, partition=name, operation="pin_vcpus")

    @staticmethod
    def _pin_in_definition(conn: Any, dom: Any, vcpu: int, cpumap: tuple[bool, ...]) -> None:
        """Pin in the persistent definition by defining it again (libvirt's test driver only)."""
        lv = libvirt()
        root = ET.fromstring(dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE))
        cputune = root.find("cputune")
        if cputune is None:
            cputune = ET.Element("cputune")
            root.insert(list(root).index(root.find("vcpu")) + 1, cputune)  # type: ignore[arg-type]
        for old in cputune.findall(f"vcpupin[@vcpu='{vcpu}']"):
            cputune.remove(old)
        cpus = tuple(i for i, on in enumerate(cpumap) if on)
        ET.SubElement(cputune, "vcpupin", {"vcpu": str(vcpu), "cpuset": domxml.format_cpuset(cpus)})
        conn.defineXMLFlags(ET.tostring(root, encoding="unicode"), lv.VIR_DOMAIN_DEFINE_VALIDATE)

    def migrate_partition(
        self, host: HostTarget, name: str, destination: HostTarget, live: bool = True
    ) -> None:
        self.validate_host(host)
        self.validate_host(destination)
        source_uri, dest_uri = self.uri(host), self.uri(destination)
        if not self.migrator.can_migrate(source_uri):
            raise self.unsupported("migrate_partition", host.label)
        if self._family_of(dest_uri) != self._family_of(source_uri):
            raise InvalidInput(
                f"host {destination.label} is a {self._family_of(dest_uri)} host, host {host.label} a "
                f"{self._family_of(source_uri)} one: partitions move only between hosts of one hypervisor"
            )
        if dest_uri == source_uri or destination.resource_id == host.resource_id:
            raise InvalidInput(f"partition {name} is already on host {host.label}")
        if not self.migrator.can_migrate(source_uri, dest_uri):
            raise self.unsupported("migrate_partition", host.label)
        own = self.own_settings()
        mode = self.host_setting(host, "migration", own.migration) or "managed"
        address = self.host_setting(destination, "migration_address", destination.address)
        migrate_uri = None
        if address:
            migrate_uri = f"tcp://[{address}]" if ":" in address else f"tcp://{address}"
        doing = f"migrate partition {name} to host {destination.label}"
        dest_conn = self._run(destination, doing, lambda conn: conn, partition=name)

        def work(conn: Any) -> None:
            dom = self._domain(conn, name)
            if self._exists(dest_conn, name):
                raise DriverError(f"host {destination.label} already has a partition named {name}")
            self.migrator.migrate(
                MigrationRequest(
                    domain=dom,
                    source=conn,
                    destination=dest_conn,
                    destination_uri=dest_uri,
                    live=live,
                    mode=mode,
                    migrate_uri=migrate_uri,
                    bandwidth_mib=own.migration_bandwidth or None,
                    **self.migration_tuning(),
                )
            )
            self._forget(source_uri, name)

        self._run(host, doing, work, partition=name, operation="migrate_partition", retry=False)
        self._run(
            destination,
            f"take over partition {name} from host {host.label}",
            lambda conn: self.moved(host, destination, name, conn),
            partition=name,
        )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True
