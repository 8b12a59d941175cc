"""The lead's conformance kit (qrm_core.conformance) run against the vmware driver and a real vSphere API (vcsim).

Twice: with an ESXi host of a cluster as the host (and a standalone ESXi
host to migrate to, which changes the VM's resource pool too), and with the
cluster itself as the host (vCenter places the VMs; CPU pinning is not
offered there, and the kit checks that it is refused).
"""

from __future__ import annotations

import pytest
from pyVmomi import vim

from qrm_core.conformance import HypervisorContract
from qrm_core.drivers.base import HostTarget, HypervisorDriver
from qrm_vmware import refs

# The database only holds the connection here: one backend is enough.
pytestmark = pytest.mark.qrm_backends("sqlite")


@pytest.fixture(scope="module")
def morefs(vcsim) -> dict[str, str]:
    si = vcsim.connect()
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.ManagedEntity], True)
    try:
        return {
            o.name: o._moId for o in view.view if isinstance(o, vim.HostSystem | vim.ClusterComputeResource)
        }
    finally:
        view.Destroy()


@pytest.fixture
def connected(qrm_settings, qrm_plugins, vcsim) -> None:
    """vCenter vc1 stored in this test's database (the driver reads its connection there).

    Stored directly, without the login 'qrm vmware connect' makes (test_connect.py covers that)."""
    from qrm_core.services import service_context
    from qrm_vmware.connections import Connection, ConnectionStore
    from qrm_vmware.settings import load

    with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
        connection = Connection("vc1", vcsim.url, vcsim.username, vcsim.password, insecure=True)
        ConnectionStore(qrm_settings, load()).put(ctx, connection, replace_existing=True)
        ctx.commit()


def target(n: int, name: str, kind: str, moid: str, cpus: int) -> HostTarget:
    return HostTarget(
        resource_id=n,
        mac=f"02:00:00:00:00:0{n}",
        address=None,
        hostname=name.replace("_", "-"),
        cpus=cpus,
        memory_mb=4096,
        uri=refs.host_uri("vc1", kind, moid),
    )


class TestVmwareOnAnEsxiHost(HypervisorContract):
    memory_mb = 128

    @pytest.fixture
    def driver(self, qrm_plugins, connected) -> HypervisorDriver:
        return qrm_plugins.hypervisor_driver("vmware")

    @pytest.fixture
    def host(self, morefs) -> HostTarget:
        return target(1, "DC0_C0_H0", "HostSystem", morefs["DC0_C0_H0"], 2)

    @pytest.fixture
    def other_host(self, morefs) -> HostTarget:
        return target(2, "DC0_H0", "HostSystem", morefs["DC0_H0"], 2)


class TestVmwareOnACluster(HypervisorContract):
    memory_mb = 128

    @pytest.fixture
    def driver(self, qrm_plugins, connected) -> HypervisorDriver:
        return qrm_plugins.hypervisor_driver("vmware")

    @pytest.fixture
    def host(self, morefs) -> HostTarget:
        return target(3, "DC0_C0", "ClusterComputeResource", morefs["DC0_C0"], 4)

    @pytest.fixture
    def other_host(self, morefs) -> HostTarget:
        return target(2, "DC0_H0", "HostSystem", morefs["DC0_H0"], 2)
