"""Test helpers for the libvirt plugins (qrm-libvirt's own tests, qrm-qemu's, qrm-xen's).

* :func:`test_host`: a host on libvirt's **test driver** (``test:///<node
  file>``): an in-process hypervisor with the CPUs and memory the test asks
  for and state private to its node file. It runs every operation but
  migration; domains of any type (``kvm``, ``qemu``, ``xen``) are defined
  with ``VIR_DOMAIN_DEFINE_VALIDATE``, i.e. checked against libvirt's RelaxNG
  schema.
* :class:`DefinitionMover`: the migration seam for test-driver hosts (see
  :mod:`qrm_libvirt.migration`): it moves a domain's definition (and its
  running state) between two test hosts, so tests can check what the drivers
  do around a migration. Real migration is tested between two real daemons.
* :func:`assert_valid_domain` / :func:`relaxng`: libvirt's RelaxNG schema
  (``/usr/share/libvirt/schemas/domain.rng``, shipped by libvirt0) through lxml.

Tests skip (or fail under ``CI=true``) through ``qrm_core.testing.missing``
when libvirt-python, lxml or a libvirtd is missing; their conftest files do
that (this module imports nothing of qrm_core but its plugin API). Private
libvirt daemons (real QEMU) are ``qrm_core.lab.libvirtd.LibvirtDaemon``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qrm_core.plugin_api import HostTarget
from qrm_libvirt.migration import MigrationRequest

SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")


def node_xml(cpus: int = 8, memory_mb: int = 16384) -> str:
    """A test-driver node: one NUMA node, ``cpus`` cores, ``memory_mb`` of memory."""
    return (
        "<node><cpu><mhz>2400</mhz><model>x86_64</model><nodes>1</nodes><sockets>1</sockets>"
        f"<cores>{cpus}</cores><threads>1</threads><active>{cpus}</active></cpu>"
        f"<memory>{memory_mb * 1024}</memory></node>\n"
    )


def test_host(
    directory: Path,
    name: str = "hv1",
    *,
    resource_id: int = 1,
    cpus: int = 8,
    memory_mb: int = 16384,
    address: str | None = "192.0.2.10",
    network: str | None = None,
    settings: dict[str, str] | None = None,
) -> HostTarget:
    """A host on libvirt's test driver, with state of its own (its node file)."""
    directory.mkdir(parents=True, exist_ok=True)
    node = (directory / f"{name}.xml").absolute()
    node.write_text(node_xml(cpus, memory_mb))
    return HostTarget(
        resource_id=resource_id,
        mac=f"52:54:00:fe:00:{resource_id % 256:02x}",
        address=address,
        hostname=name,
        cpus=cpus,
        memory_mb=memory_mb,
        uri=f"test://{node}",
        network=network,
        settings=dict(settings or {}),
    )


test_host.__test__ = False  # type: ignore[attr-defined] # not a test, whatever pytest thinks of its name


class DefinitionMover:
    """The migration seam for libvirt's test driver, which cannot migrate.

    Defines the domain's persistent XML on the destination, starts it there
    if it ran (paused again if it was paused), then destroys and undefines it
    on the source: the outcome of ``VIR_MIGRATE_PERSIST_DEST |
    VIR_MIGRATE_UNDEFINE_SOURCE``, without the memory copy. It records each
    request in :attr:`requests`.
    """

    def __init__(self) -> None:
        self.requests: list[MigrationRequest] = []

    def can_migrate(self, source_uri: str, destination_uri: str | None = None) -> bool:
        return True

    def migrate(self, request: MigrationRequest) -> None:
        import libvirt

        self.requests.append(request)
        dom = request.domain
        state = dom.state()[0]
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        moved = request.destination.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        if state != libvirt.VIR_DOMAIN_SHUTOFF:
            moved.create()
            if state == libvirt.VIR_DOMAIN_PAUSED:
                moved.suspend()
            dom.destroy()
        dom.undefine()


@functools.cache
def relaxng() -> Any:
    """libvirt's domain schema (shipped by libvirt0) as an lxml RelaxNG validator."""
    from lxml import etree

    return etree.RelaxNG(etree.parse(str(SCHEMA)))


def assert_valid_domain(xml: str) -> None:
    """The XML validates against libvirt's domain schema (the error log otherwise)."""
    from lxml import etree

    schema = relaxng()
    document = etree.fromstring(xml.encode())
    if not schema.validate(document):
        raise AssertionError(f"domain XML does not validate: {schema.error_log}\n{xml}")


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s (last: {value!r})")
        time.sleep(0.05)
