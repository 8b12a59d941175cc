"""The conformance kit: one test suite every driver runs against its own backend.

A driver's tests subclass the contract of its interface and provide fixtures;
pytest then runs every test below against the real backend (a libvirtd, a
vcsim, a tgt in a namespace)::

    from qrm_core.conformance import HypervisorContract

    class TestQemuConformance(HypervisorContract):
        @pytest.fixture
        def driver(self, settings):
            return QemuHypervisor(settings)

        @pytest.fixture
        def host(self, libvirtd):
            return HostTarget(resource_id=1, mac="52:54:00:00:00:01", address=None,
                              hostname="hv1", cpus=4, memory_mb=4096, uri=libvirtd.uri)

What is checked: every required operation; every optional operation the
driver claims in ``supported_operations()`` (called, and its effect read
back); that every optional operation it does not claim raises
:class:`~qrm_core.errors.UnsupportedOperation`, so ``supported_operations()``
tells the truth; the errors promised for bad input (``InvalidInput``,
``NotFound``, ``DriverError``); and idempotence where the interface promises
it. Everything a test creates carries a unique name and is removed again,
even when the test fails.

Fixtures each contract needs are listed in its docstring; optional ones
have defaults here that a subclass overrides (``other_host`` is None, so
migration is skipped with a reason, unless a second host is given).
docs/drivers.md ("The conformance kit") shows a third-party author how to
use it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from qrm_core.drivers.base import (
    PARTITION_STATES,
    POWER_STATES,
    ExportClient,
    ExportRequest,
    HostTarget,
    HypervisorDriver,
    PartitionSpec,
    PowerDriver,
    PowerTarget,
    StorageDriver,
    StorageTarget,
)
from qrm_core.errors import DriverError, InvalidInput, NotFound, QrmError, UnsupportedOperation

#: Names a driver must refuse (``InvalidInput``) before they reach a config file or command line.
HOSTILE_NAMES = (
    "",
    "two words",
    "semi;colon",
    "new\nline",
    "quote'd",
    'dquote"d',
    "../up",
    "dollar$x",
    "<xml>",
    "a" * 65,
)


def unique(prefix: str) -> str:
    """A name no earlier run used: ``prefix-<6 hex digits>``."""
    return f"{prefix}-{secrets.token_hex(3)}"


def _supported(driver: Any, target: Any, operation: str) -> None:
    if operation not in driver.supported_operations(target):
        pytest.skip(f"{driver.name} does not claim {operation}")


def _expect_unsupported(call: Callable[[], Any]) -> None:
    with pytest.raises(UnsupportedOperation) as info:
        call()
    assert info.value.message and "\n" not in info.value.message


# ---------------------------------------------------------------------------
# Hypervisors
# ---------------------------------------------------------------------------


class HypervisorContract:
    """Fixtures to provide: ``driver`` (a :class:`HypervisorDriver`) and
    ``host`` (a :class:`HostTarget` on the backend with room for two
    partitions of :attr:`cpus` CPUs and :attr:`memory_mb` MB, and at least two
    host CPUs). Optional: ``other_host`` (a second host of the same
    hypervisor, for migration; None skips it).

    Class attributes to override: :attr:`cpus`, :attr:`memory_mb` (the size of
    the partitions it makes), :attr:`start_timeout` is not needed: every
    operation must have finished when the driver returns.
    """

    cpus = 1
    memory_mb = 128

    @pytest.fixture
    def other_host(self) -> HostTarget | None:
        return None

    @pytest.fixture
    def made(self, driver: HypervisorDriver, host: HostTarget) -> Iterator[list[tuple[HostTarget, str]]]:
        """Partitions a test created, destroyed afterwards wherever they are."""
        created: list[tuple[HostTarget, str]] = []
        yield created
        for where, name in created:
            try:
                driver.destroy_partition(where, name)
            except QrmError:
                pass

    def spec(self, name: str, **changes: Any) -> PartitionSpec:
        values: dict[str, Any] = {
            "name": name,
            "cpus": self.cpus,
            "memory_mb": self.memory_mb,
            "mac": "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3)),
            "max_cpus": self.cpus + 1,
            "max_memory_mb": self.memory_mb * 2,
        }
        values.update(changes)
        return PartitionSpec(**values)

    def create(
        self,
        driver: HypervisorDriver,
        host: HostTarget,
        made: list[tuple[HostTarget, str]],
        **changes: Any,
    ) -> PartitionSpec:
        spec = self.spec(unique("qrmct"), **changes)
        made.append((host, spec.name))
        driver.create_partition(host, spec)
        return spec

    # -- required ------------------------------------------------------------

    def test_validate_host_accepts_the_host(self, driver: HypervisorDriver, host: HostTarget) -> None:
        driver.validate_host(host)

    @pytest.mark.parametrize("name", HOSTILE_NAMES)
    def test_hostile_partition_names_are_refused(
        self, driver: HypervisorDriver, host: HostTarget, name: str
    ) -> None:
        with pytest.raises(InvalidInput):
            driver.validate_partition(host, self.spec(name))
        with pytest.raises(InvalidInput):
            driver.create_partition(host, self.spec(name))

    def test_bad_sizes_are_refused(self, driver: HypervisorDriver, host: HostTarget) -> None:
        for changes in ({"cpus": 0}, {"memory_mb": 0}, {"max_memory_mb": self.memory_mb - 1}):
            with pytest.raises(InvalidInput):
                driver.validate_partition(host, self.spec(unique("qrmct"), **changes))

    def test_host_info(self, driver: HypervisorDriver, host: HostTarget) -> None:
        info = driver.host_info(host)
        assert info.cpus >= 1 and info.memory_mb >= 1
        assert 0 <= info.free_memory_mb <= info.memory_mb
        assert info.partitions >= 0 and info.version

    def test_create_get_list_destroy(
        self, driver: HypervisorDriver, host: HostTarget, made: list[tuple[HostTarget, str]]
    ) -> None:
        before = driver.host_info(host).partitions
        spec = self.create(driver, host, made)
        info = driver.get_partition(host, spec.name)
        assert (info.name, info.state, info.cpus, info.memory_mb) == (
            spec.name,
            "stopped",
            spec.cpus,
            spec.memory_mb,
        )
        assert info.mac.lower() == (spec.mac or "").lower()
        assert spec.name in {p.name for p in driver.list_partitions(host)}
        assert driver.host_info(host).partitions == before + 1
        driver.destroy_partition(host, spec.name)
        with pytest.raises(NotFound):
            driver.get_partition(host, spec.name)
        assert spec.name not in {p.name for p in driver.list_partitions(host)}

    def test_create_twice_is_refused_and_keeps_the_first(
        self, driver: HypervisorDriver, host: HostTarget, made: list[tuple[HostTarget, str]]
    ) -> None:
        spec = self.create(driver, host, made)
        with pytest.raises(DriverError):
            driver.create_partition(host, self.spec(spec.name))
        assert driver.get_partition(host, spec.name).mac.lower() == (spec.mac or "").lower()

    def test_missing_partitions_are_not_found(self, driver: HypervisorDriver, host: HostTarget) -> None:
        name = unique("qrmct-missing")
        with pytest.raises(NotFound):
            driver.get_partition(host, name)
        with pytest.raises(NotFound):
            driver.destroy_partition(host, name)
        with pytest.raises(NotFound):
            driver.start_partition(host, name)

    def test_start_and_stop_are_idempotent(
        self, driver: HypervisorDriver, host: HostTarget, made: list[tuple[HostTarget, str]]
    ) -> None:
        spec = self.create(driver, host, made)
        driver.start_partition(host, spec.name)
        driver.start_partition(host, spec.name)
        assert driver.get_partition(host, spec.name).state == "running"
        driver.stop_partition(host, spec.name, force=True)
        driver.stop_partition(host, spec.name, force=True)
        assert driver.get_partition(host, spec.name).state == "stopped"

    def test_a_running_partition_can_be_destroyed(
        self, driver: HypervisorDriver, host: HostTarget, made: list[tuple[HostTarget, str]]
    ) -> None:
        spec = self.create(driver, host, made)
        driver.start_partition(host, spec.name)
        driver.destroy_partition(host, spec.name)
        with pytest.raises(NotFound):
            driver.get_partition(host, spec.name)

    def test_reported_states_are_the_interface_s(
        self, driver: HypervisorDriver, host: HostTarget, made: list[tuple[HostTarget, str]]
    ) -> None:
        self.create(driver, host, made)
        assert {p.state for p in driver.list_partitions(host)} <= set(PARTITION_STATES)

    # -- optional: claimed ones work, the others are refused ------------------

    def test_unclaimed_operations_are_refused(
        self,
        driver: HypervisorDriver,
        host: HostTarget,
        other_host: HostTarget | None,
        made: list[tuple[HostTarget, str]],
    ) -> None:
        supported = driver.supported_operations(host)
        assert supported <= set(HypervisorDriver.OPTIONAL_OPERATIONS)
        spec = self.create(driver, host, made)
        name = spec.name
        calls: dict[str, Callable[[], Any]] = {
            "reboot_partition": lambda: driver.reboot_partition(host, name),
            "pause_partition": lambda: driver.pause_partition(host, name),
            "unpause_partition": lambda: driver.unpause_partition(host, name),
            "set_memory": lambda: driver.set_memory(host, name, self.memory_mb, live=False),
            "set_vcpus": lambda: driver.set_vcpus(host, name, self.cpus, live=False),
            "pin_vcpus": lambda: driver.pin_vcpus(host, name, {0: (0,)}, live=False),
            "migrate_partition": lambda: driver.migrate_partition(host, name, other_host or host, live=False),
            "snapshot_partition": lambda: driver.snapshot_partition(host, name, "s1"),
            "revert_partition": lambda: driver.revert_partition(host, name, "s1"),
            "remove_partition_snapshot": lambda: driver.remove_partition_snapshot(host, name, "s1"),
            "list_partition_snapshots": lambda: driver.list_partition_snapshots(host, name),
        }
        assert set(calls) == set(HypervisorDriver.OPTIONAL_OPERATIONS)
        for operation, call in calls.items():
            if operation not in supported:
                _expect_unsupported(call)

    def test_reboot(
        self, driver: HypervisorDriver, host: HostTarget, made: list[tuple[HostTarget, str]]
    ) -> None:
        _supported(driver, host, "reboot_partition")
        spec = self.create(driver, host, made)
        with pytest.raises(DriverError):
            driver.reboot_partition(host, spec.name)  # not running
        driver.start_partition(host, spec.name)
        driver.reboot_partition(host, spec.name)
        assert driver.get_partition(host, spec.name).state == "running"

    def test_pause_and_resume(
        self, driver: HypervisorDriver, host: HostTarget, made: list[tuple[HostTarget, str]]
    ) -> None:
        _supported(driver, host, "pause_partition")
        _supported(driver, host, "unpause_partition")
        spec = self.create(driver, host, made)
        with pytest.raises(DriverError):
            driver.pause_partition(host, spec.name)  # not running
        driver.start_partition(host, spec.name)
        driver.pause_partition(host, spec.name)
        assert driver.get_partition(host, spec.name).state == "paused"
        with pytest.raises(DriverError):
            driver.pause_partition(host, spec.name)
        driver.unpause_partition(host, spec.name)
        assert driver.get_partition(host, spec.name).state == "running"
        with pytest.raises(DriverError):
            driver.unpause_partition(host, spec.name)

    def test_memory_live_and_persistent(
        self, driver: HypervisorDriver, host: HostTarget, made: list[tuple[HostTarget, str]]
    ) -> None:
        _supported(driver, host, "set_memory")
        spec = self.create(driver, host, made)
        grown = self.memory_mb + self.memory_mb // 2
        driver.set_memory(host, spec.name, grown, live=False)
        assert driver.get_partition(host, spec.name).memory_mb == grown
        with pytest.raises(DriverError):
            driver.set_memory(host, spec.name, self.memory_mb, persistent=False)  # not running
        with pytest.raises(InvalidInput):
            driver.set_memory(host, spec.name, 0)
        driver.set_memory(host, spec.name, self.memory_mb, live=False)
        driver.start_partition(host, spec.name)
        driver.set_memory(host, spec.name, grown)
        assert driver.get_partition(host, spec.name).memory_mb == grown
        maximum = driver.get_partition(host, spec.name).max_memory_mb
        if maximum is not None:
            with pytest.raises(DriverError):
                driver.set_memory(host, spec.name, maximum + 64, persistent=False)
            assert driver.get_partition(host, spec.name).memory_mb == grown

    def test_vcpus_live_and_persistent(
        self, driver: HypervisorDriver, host: HostTarget, made: list[tuple[HostTarget, str]]
    ) -> None:
        _supported(driver, host, "set_vcpus")
        spec = self.create(driver, host, made)
        driver.set_vcpus(host, spec.name, self.cpus + 1, live=False)
        assert driver.get_partition(host, spec.name).cpus == self.cpus + 1
        with pytest.raises(InvalidInput):
            driver.set_vcpus(host, spec.name, 0)
        driver.set_vcpus(host, spec.name, self.cpus, live=False)
        driver.start_partition(host, spec.name)
        driver.set_vcpus(host, spec.name, self.cpus + 1)
        assert driver.get_partition(host, spec.name).cpus == self.cpus + 1

    def test_pinning(
        self, driver: HypervisorDriver, host: HostTarget, made: list[tuple[HostTarget, str]]
    ) -> None:
        _supported(driver, host, "pin_vcpus")
        spec = self.create(driver, host, made)
        driver.pin_vcpus(host, spec.name, {0: (1,)}, live=False)
        assert driver.get_partition(host, spec.name).cpu_pinning.get(0) == (1,)
        with pytest.raises(InvalidInput):
            driver.pin_vcpus(host, spec.name, {0: (host.cpus + 64,)}, live=False)
        with pytest.raises(InvalidInput):
            driver.pin_vcpus(host, spec.name, {spec.cpus + 8: (0,)}, live=False)
        driver.start_partition(host, spec.name)
        driver.pin_vcpus(host, spec.name, {0: (0,)})
        assert driver.get_partition(host, spec.name).cpu_pinning.get(0) == (0,)

    def test_migration(
        self,
        driver: HypervisorDriver,
        host: HostTarget,
        other_host: HostTarget | None,
        made: list[tuple[HostTarget, str]],
    ) -> None:
        _supported(driver, host, "migrate_partition")
        if other_host is None:
            pytest.skip("no second host given (fixture other_host)")
        spec = self.create(driver, host, made)
        made.append((other_host, spec.name))
        with pytest.raises(InvalidInput):
            driver.migrate_partition(host, spec.name, host)
        driver.start_partition(host, spec.name)
        driver.migrate_partition(host, spec.name, other_host, live=True)
        moved = driver.get_partition(other_host, spec.name)
        assert moved.state == "running" and moved.mac.lower() == (spec.mac or "").lower()
        with pytest.raises(NotFound):
            driver.get_partition(host, spec.name)

    def test_snapshots(
        self, driver: HypervisorDriver, host: HostTarget, made: list[tuple[HostTarget, str]]
    ) -> None:
        for operation in (
            "snapshot_partition",
            "revert_partition",
            "remove_partition_snapshot",
            "list_partition_snapshots",
        ):
            _supported(driver, host, operation)
        spec = self.create(driver, host, made)
        driver.snapshot_partition(host, spec.name, "first")
        driver.snapshot_partition(host, spec.name, "second")
        assert driver.list_partition_snapshots(host, spec.name) == ["first", "second"]
        with pytest.raises(DriverError):
            driver.snapshot_partition(host, spec.name, "first")
        driver.revert_partition(host, spec.name, "first")
        with pytest.raises(NotFound):
            driver.revert_partition(host, spec.name, "nosuch")
        driver.remove_partition_snapshot(host, spec.name, "second")
        assert driver.list_partition_snapshots(host, spec.name) == ["first"]
        with pytest.raises(NotFound):
            driver.remove_partition_snapshot(host, spec.name, "second")


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------


class StorageContract:
    """Fixtures to provide: ``driver`` (a :class:`StorageDriver`),
    ``storage`` (a :class:`StorageTarget` the backend serves) and ``client``
    (an :class:`ExportClient` the backend can export to). Optional:
    ``second_client`` (default: a made-up client with another MAC and IP).

    Class attribute :attr:`size_mb` is the size of the volumes it makes.
    """

    size_mb = 8

    @pytest.fixture
    def second_client(self, client: ExportClient) -> ExportClient:
        return ExportClient(
            mac="52:54:00:fe:fe:fe",
            ip="10.250.250.250",
            hostname="second",
            initiator="iqn.2026-12.org.qrm:525400fefefe",
        )

    @pytest.fixture
    def volumes(self, driver: StorageDriver, storage: StorageTarget) -> Iterator[list[str]]:
        """Locations a test created, removed afterwards (exports withdrawn first)."""
        created: list[str] = []
        yield created
        for location in created:
            try:
                driver.remove_volume(storage, location)
            except QrmError:
                pass

    def create(self, driver: StorageDriver, storage: StorageTarget, volumes: list[str]) -> str:
        location = driver.create_volume(storage, unique("qrmct"), self.size_mb).location
        volumes.append(location)
        return location

    def test_validate_server_accepts_the_server(self, driver: StorageDriver, storage: StorageTarget) -> None:
        driver.validate_server(storage)
        driver.check_server(storage)

    @pytest.mark.parametrize("text", ["/a b", "/a;b", "/a\nb", "/a/../b", "/a'b", "/a$b", "/" + "a" * 4000])
    def test_hostile_locations_are_refused(
        self, driver: StorageDriver, storage: StorageTarget, text: str
    ) -> None:
        with pytest.raises(InvalidInput):
            driver.validate_location(storage, text)

    def test_create_list_remove(
        self, driver: StorageDriver, storage: StorageTarget, volumes: list[str]
    ) -> None:
        location = self.create(driver, storage, volumes)
        driver.validate_location(storage, location)
        if "list_volumes" in driver.supported_operations(storage):
            assert location in {v.location for v in driver.list_volumes(storage)}
        driver.remove_volume(storage, location)
        if "list_volumes" in driver.supported_operations(storage):
            assert location not in {v.location for v in driver.list_volumes(storage)}
        with pytest.raises(NotFound):
            driver.remove_volume(storage, location)

    def test_bad_sizes_and_names_are_refused(self, driver: StorageDriver, storage: StorageTarget) -> None:
        with pytest.raises(InvalidInput):
            driver.create_volume(storage, unique("qrmct"), 0)
        for name in HOSTILE_NAMES[1:-1]:
            with pytest.raises(InvalidInput):
                driver.create_volume(storage, name, self.size_mb)

    def test_export_and_unexport_are_idempotent(
        self,
        driver: StorageDriver,
        storage: StorageTarget,
        client: ExportClient,
        volumes: list[str],
    ) -> None:
        location = self.create(driver, storage, volumes)
        driver.export_volume(storage, location, client)
        driver.export_volume(storage, location, client)
        with pytest.raises(DriverError):
            driver.remove_volume(storage, location)  # still exported
        driver.unexport_volume(storage, location, client)
        driver.unexport_volume(storage, location, client)
        driver.remove_volume(storage, location)

    def test_batch_exports_report_each_request(
        self,
        driver: StorageDriver,
        storage: StorageTarget,
        client: ExportClient,
        second_client: ExportClient,
        volumes: list[str],
    ) -> None:
        first = self.create(driver, storage, volumes)
        second = self.create(driver, storage, volumes)
        requests = [ExportRequest(first, client), ExportRequest(second, second_client)]
        outcomes = driver.export_volumes(storage, requests)
        assert [o.request for o in outcomes] == requests
        assert [o.error for o in outcomes] == [None, None]
        withdrawn = driver.unexport_volumes(storage, requests)
        assert [o.error for o in withdrawn] == [None, None]
        driver.remove_volume(storage, first)
        driver.remove_volume(storage, second)

    def test_describe_root_gives_tokens_and_keeps_secrets_off_the_command_line(
        self,
        driver: StorageDriver,
        storage: StorageTarget,
        client: ExportClient,
        volumes: list[str],
    ) -> None:
        location = self.create(driver, storage, volumes)
        for shared in (False, True):
            root = driver.describe_root(storage, location, client, shared=shared)
            assert root.kernel_args and root.description
            assert all(arg and not any(c.isspace() for c in arg) for arg in root.kernel_args)
            for secret in root.secrets.values():
                assert secret not in " ".join(root.kernel_args)
                assert secret not in root.description and secret not in repr(root)

    def test_unclaimed_operations_are_refused(
        self, driver: StorageDriver, storage: StorageTarget, volumes: list[str]
    ) -> None:
        supported = driver.supported_operations(storage)
        assert supported <= set(StorageDriver.OPTIONAL_OPERATIONS)
        location = self.create(driver, storage, volumes)
        calls: dict[str, Callable[[], Any]] = {
            "list_volumes": lambda: driver.list_volumes(storage),
            "capacity": lambda: driver.capacity(storage),
            "clone_volume": lambda: driver.clone_volume(storage, location, unique("qrmct")),
            "snapshot_volume": lambda: driver.snapshot_volume(storage, location, "s1"),
            "list_snapshots": lambda: driver.list_snapshots(storage, location),
            "revert_volume": lambda: driver.revert_volume(storage, location, "s1"),
            "remove_snapshot": lambda: driver.remove_snapshot(storage, location, "s1"),
            "open_tree": lambda: driver.open_tree(storage, location),
            "close_tree": lambda: driver.close_tree(storage, location, "/nonexistent"),
            "read_tree": lambda: driver.read_tree(storage, location),
        }
        assert set(calls) == set(StorageDriver.OPTIONAL_OPERATIONS)
        for operation, call in calls.items():
            if operation not in supported:
                _expect_unsupported(call)

    def test_capacity(self, driver: StorageDriver, storage: StorageTarget, volumes: list[str]) -> None:
        _supported(driver, storage, "capacity")
        before = driver.capacity(storage)
        assert 0 <= before.free_mb <= before.total_mb
        self.create(driver, storage, volumes)
        after = driver.capacity(storage)
        assert after.volumes == before.volumes + 1
        assert after.free_mb <= before.free_mb

    def test_clone(self, driver: StorageDriver, storage: StorageTarget, volumes: list[str]) -> None:
        _supported(driver, storage, "clone_volume")
        location = self.create(driver, storage, volumes)
        name = unique("qrmct")
        clone = driver.clone_volume(storage, location, name)
        volumes.append(clone.location)
        assert clone.location != location
        driver.validate_location(storage, clone.location)
        with pytest.raises(DriverError):
            driver.clone_volume(storage, location, name)
        with pytest.raises(NotFound):
            driver.clone_volume(storage, location + "-missing", unique("qrmct"))

    def test_snapshots(self, driver: StorageDriver, storage: StorageTarget, volumes: list[str]) -> None:
        for operation in ("snapshot_volume", "list_snapshots", "revert_volume", "remove_snapshot"):
            _supported(driver, storage, operation)
        location = self.create(driver, storage, volumes)
        driver.snapshot_volume(storage, location, "first")
        driver.snapshot_volume(storage, location, "second")
        assert driver.list_snapshots(storage, location) == ["first", "second"]
        with pytest.raises(DriverError):
            driver.snapshot_volume(storage, location, "first")
        driver.revert_volume(storage, location, "first")
        with pytest.raises(NotFound):
            driver.revert_volume(storage, location, "nosuch")
        driver.remove_snapshot(storage, location, "second")
        assert driver.list_snapshots(storage, location) == ["first"]
        driver.remove_snapshot(storage, location, "first")

    def test_fill(self, driver: StorageDriver, storage: StorageTarget, volumes: list[str]) -> None:
        """open_tree gives a directory that exists; close_tree says what it did; a
        directory that is not the volume's tree is refused."""
        for operation in ("open_tree", "close_tree"):
            _supported(driver, storage, operation)
        location = self.create(driver, storage, volumes)
        tree = driver.open_tree(storage, location)
        assert tree.startswith("/")
        assert driver.open_tree(storage, location) == tree  # the same one again: a fill resumes
        with pytest.raises(InvalidInput):
            driver.close_tree(storage, location, "/etc")
        assert driver.close_tree(storage, location, tree)

    def test_read_tree(self, driver: StorageDriver, storage: StorageTarget, volumes: list[str]) -> None:
        """read_tree gives an absolute directory for a volume, again after release_tree
        (which may be called twice); a missing volume is NotFound."""
        _supported(driver, storage, "read_tree")
        location = self.create(driver, storage, volumes)
        for _ in range(2):
            tree = driver.read_tree(storage, location)
            try:
                assert tree.startswith("/")
            finally:
                driver.release_tree(storage, location, tree)
        driver.release_tree(storage, location, tree)  # released already: nothing to do
        with pytest.raises(NotFound):
            driver.read_tree(storage, location + "-missing")


# ---------------------------------------------------------------------------
# Power
# ---------------------------------------------------------------------------


class PowerContract:
    """Fixtures to provide: ``driver`` (a :class:`PowerDriver`) and ``target``
    (a :class:`PowerTarget` whose machine the test may switch on and off).
    Optional: ``bad_targets`` (targets ``validate`` must refuse)."""

    @pytest.fixture
    def bad_targets(self, target: PowerTarget) -> list[PowerTarget]:
        return [
            PowerTarget(
                resource_id=target.resource_id,
                mac=target.mac,
                address=address,
                username=target.username,
                password=target.password,
            )
            for address in (None, "", "a b", "x;y", "new\nline")
        ]

    def test_validate(self, driver: PowerDriver, target: PowerTarget, bad_targets: list[PowerTarget]) -> None:
        driver.validate(target)
        for bad in bad_targets:
            with pytest.raises(InvalidInput):
                driver.validate(bad)

    def test_on_off_are_idempotent(self, driver: PowerDriver, target: PowerTarget) -> None:
        driver.power_off(target, force=True)
        driver.power_off(target, force=True)
        assert driver.power_state(target) == "off"
        driver.power_on(target)
        driver.power_on(target)
        assert driver.power_state(target) == "on"
        assert driver.power_state(target) in POWER_STATES

    def test_the_password_is_not_in_repr(self, target: PowerTarget) -> None:
        if target.password:
            assert target.password not in repr(target)

    def test_reset(self, driver: PowerDriver, target: PowerTarget) -> None:
        if "reset" not in driver.supported_operations(target):
            _expect_unsupported(lambda: driver.reset(target))
            return
        driver.power_off(target, force=True)
        with pytest.raises(DriverError):
            driver.reset(target)
        driver.power_on(target)
        driver.reset(target)
        assert driver.power_state(target) == "on"
