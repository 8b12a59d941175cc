"""The node agents of qrm's VMs in a simulated vCenter, played by the test.

vcsim runs no guest, so nothing PXE-boots there. This plays what would run
in each VM: while vCenter reports one of qrm's VMs powered on, a simulated
node agent (core's ``qrm lab simulate`` agents, the real agent protocol over
HTTP) boots with the MAC vCenter gave the VM's NIC, registers, heartbeats
and reboots when told; when vCenter powers the VM off, its agent goes
silent, as a real guest would. :meth:`VmAgents.kill` makes one agent stop
while its VM keeps running (a hung guest).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from typing import Any

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from qrm_core.lab.simulate import NodeSpec, Simulation, ip_for
from qrm_vmware import refs

PC = vmodl.query.PropertyCollector


class VmAgents:
    def __init__(self, server_url: str, enrollment_token: str, vcsim: Any) -> None:
        self.server_url = server_url
        self.token = enrollment_token
        self.vcsim = vcsim
        self.killed: set[str] = set()
        self.running: dict[str, str] = {}  # MAC -> VM name, agents now running
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sim: Simulation | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="vm-agents", daemon=True)
        self.errors: list[str] = []

    def start(self) -> VmAgents:
        self._thread.start()
        return self

    def kill(self, mac: str) -> None:
        """The agent of ``mac`` stops (its VM stays powered on in vCenter)."""
        self.killed.add(mac)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(20)

    # -- the loop --------------------------------------------------------------

    def _main(self) -> None:
        asyncio.run(self._run())

    def _powered_on(self, si: Any) -> dict[str, tuple[str, int, int]]:
        """MAC -> (VM name, CPUs, memory) of qrm's powered-on VMs, from vCenter (one call)."""
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        try:
            spec = PC.FilterSpec(
                objectSet=[
                    PC.ObjectSpec(
                        obj=view,
                        skip=True,
                        selectSet=[PC.TraversalSpec(type=vim.view.ContainerView, path="view")],
                    )
                ],
                propSet=[
                    PC.PropertySpec(
                        type=vim.VirtualMachine,
                        pathSet=[
                            "name",
                            "runtime.powerState",
                            "config.annotation",
                            "config.hardware.device",
                            "config.hardware.numCPU",
                            "config.hardware.memoryMB",
                        ],
                    )
                ],
            )
            result = content.propertyCollector.RetrievePropertiesEx([spec], PC.RetrieveOptions())
        finally:
            view.Destroy()
        found: dict[str, tuple[str, int, int]] = {}
        for obj in result.objects if result else ():
            props = {p.name: p.val for p in obj.propSet}
            marker = refs.parse_marker(props.get("config.annotation"))
            if marker is None or marker.creating or props.get("runtime.powerState") != "poweredOn":
                continue
            nics = [
                d
                for d in props.get("config.hardware.device", ())
                if isinstance(d, vim.vm.device.VirtualEthernetCard)
            ]
            if nics:  # the MAC vCenter gave the VM's NIC (qrm asked for it; vCenter is the truth)
                found[nics[0].macAddress.lower()] = (
                    props["name"],
                    int(props["config.hardware.numCPU"]),
                    int(props["config.hardware.memoryMB"]),
                )
        return found

    async def _run(self) -> None:
        sim = Simulation(self.server_url, self.token, reboot_delay=0.3)
        self._sim = sim
        runner = asyncio.create_task(sim.run([]))
        while sim._client is None:
            await asyncio.sleep(0.01)
        si = SmartConnect(
            protocol="https",
            host=self.vcsim.host,
            port=self.vcsim.port,
            user=self.vcsim.username,
            pwd=self.vcsim.password,
            sslContext=ssl._create_unverified_context(),
        )
        try:
            while not self._stop.is_set():
                try:
                    on = self._powered_on(si)
                except Exception as exc:  # the simulator went away: keep the last picture
                    self.errors.append(str(exc))
                    on = {mac: (name, 1, 1) for mac, name in self.running.items()}
                for mac, (name, cpus, memory) in on.items():
                    if mac not in self.running and mac not in self.killed:
                        self.running[mac] = name
                        sim.add(
                            NodeSpec(
                                mac=mac,
                                ip=ip_for(int(mac[-8:].replace(":", ""), 16)),
                                cpus=cpus,
                                memory_mb=memory,
                            )
                        )
                for mac in list(self.running):
                    if mac not in on or mac in self.killed:
                        del self.running[mac]
                        sim.remove(mac)
                await asyncio.sleep(0.2)
        finally:
            sim.stopping.set()
            await asyncio.gather(runner, return_exceptions=True)
            Disconnect(si)
