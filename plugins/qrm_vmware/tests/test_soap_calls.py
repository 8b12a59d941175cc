"""Round trips to vCenter, counted by the simulator itself (its /qrm/soap-calls counter).

Syncing a vCenter of 1,000 VMs takes the same few SOAP calls as one of 10:
one ContainerView, one RetrievePropertiesEx and one more call per page of
``QRM_VMWARE_PAGE_SIZE`` objects, never a call per VM.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import vcsimkit as kit

from qrm_vmware import sync, vsphere
from qrm_vmware.settings import VmwareSettings

# Round trips to vCenter do not depend on qrm's database: SQLite.
pytestmark = pytest.mark.qrm_backends("sqlite")


@pytest.fixture(scope="module")
def sims(vcsim_binary: Path):
    """Two vCenters of 4 ESXi hosts in a cluster: 10 VMs and 1,000 VMs."""
    small = kit.start(vcsim_binary, "-cluster", "1", "-host", "4", "-standalone-host", "0", "-vm", "10")
    try:
        big = kit.start(vcsim_binary, "-cluster", "1", "-host", "4", "-standalone-host", "0", "-vm", "1000")
        try:
            yield small, big
        finally:
            big.stop()
    finally:
        small.stop()


def calls_of_a_sync(qrm_cli, qrm_settings, sim, name: str, settings: VmwareSettings) -> dict:
    r = qrm_cli(
        "vmware",
        "connect",
        "-n",
        name,
        "--url",
        sim.url,
        "-u",
        sim.username,
        "-p",
        sim.password,
        "--insecure",
    )
    assert r.exit_code == 0, r.stderr
    vsphere.POOL.forget(name)
    sim.reset_calls()
    first = sync.sync_connection(qrm_settings, name, settings=settings)  # logs in, then reads
    assert first.hosts == 4 and first.clusters == 1
    login = sim.soap_calls()
    sim.reset_calls()
    again = sync.sync_connection(qrm_settings, name, settings=settings)
    assert again.vms == first.vms
    return {"first": login, "again": sim.soap_calls(), "vms": again.vms}


def test_a_sync_takes_the_same_calls_for_1000_vms_as_for_10(qrm_cli, qrm_settings, sims) -> None:
    small, big = sims
    settings = VmwareSettings(page_size=2000)
    few = calls_of_a_sync(qrm_cli, qrm_settings, small, "small", settings)
    many = calls_of_a_sync(qrm_cli, qrm_settings, big, "big", settings)
    assert (few["vms"], many["vms"]) == (10, 1000)
    assert many["again"] == few["again"]
    assert many["again"]["methods"] == {"CreateContainerView": 1, "RetrievePropertiesEx": 1, "DestroyView": 1}
    assert many["first"]["total"] == few["first"]["total"] <= 6  # the login, then the same three
    assert "Fetch" not in many["first"]["methods"] and "Fetch" not in many["again"]["methods"]


def test_pages_are_followed(qrm_cli, qrm_settings, sims) -> None:
    """With pages of 100 objects, the 1,005 objects come in 11 pages: one call each, all of them read."""
    _, big = sims
    calls = calls_of_a_sync(qrm_cli, qrm_settings, big, "paged", VmwareSettings(page_size=100))
    assert calls["vms"] == 1000
    assert calls["again"]["methods"] == {
        "CreateContainerView": 1,
        "RetrievePropertiesEx": 1,
        "ContinueRetrievePropertiesEx": 10,
        "DestroyView": 1,
    }
