"""``qrm lab up|down|status|env|console|vm``: the QEMU data center in a box (qrm_core.lab.netlab).

Wired into the ``lab`` group of ``qrm`` by :func:`register`::

    sudo qrm lab up --vms 2            # namespace, qrm server + Kea + TFTP, two QEMU machines
    eval "$(sudo qrm lab env)"          # QRM_SERVER=http://127.0.0.1:8077, user, password
    qrm resource list                   # the machines, idle, with their real MACs, CPUs, memory
    qrm ve start web --wait             # one reboots into the VE
    sudo qrm lab console vm1 --follow   # its serial console
    sudo qrm lab down

These commands act on this machine (namespaces, processes); they need root
and ignore ``--server``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from qrm_core.cli.output import Output, print_json, show_list

DirOpt = Annotated[
    Path,
    typer.Option(
        "--dir",
        envvar="QRM_LAB_DIR",
        help="the lab's directory: state, database, logs, consoles",
        file_okay=False,
    ),
]
DEFAULT_DIR = Path(".lab")


def say(line: str) -> None:
    """One plain line (no wrapping: paths and passwords are copied from it)."""
    typer.echo(line)


def register(lab_app: typer.Typer) -> None:
    """Add the QEMU lab's commands to the ``qrm lab`` group."""
    from qrm_core.lab import netlab

    @lab_app.command("up")
    def lab_up(
        vms: Annotated[int, typer.Option("--vms", "-n", help="QEMU machines to start")] = 1,
        dhcp: Annotated[str, typer.Option("--dhcp", help="DHCP server: kea or isc")] = "kea",
        memory: Annotated[int, typer.Option("--memory", help="MB of RAM per machine")] = 256,
        cpus: Annotated[int, typer.Option("--cpus", help="CPUs per machine")] = 1,
        port: Annotated[
            int, typer.Option("--port", help="port on 127.0.0.1 that reaches the lab's qrm server")
        ] = netlab.DEFAULT_PORT,
        kernel_deb: Annotated[
            Path | None,
            typer.Option("--kernel-deb", help="Debian kernel package to build the boot image from"),
        ] = None,
        kernel_version: Annotated[
            str | None,
            typer.Option("--kernel", help="kernel release to download (default: Debian's current)"),
        ] = None,
        heartbeat_timeout: Annotated[
            float, typer.Option("--heartbeat-timeout", help="seconds of silence before a machine is in error")
        ] = netlab.DEFAULT_HEARTBEAT_TIMEOUT,
        firmware: Annotated[
            str,
            typer.Option(
                "--firmware",
                help="bios (SeaBIOS) or uefi (OVMF) for every machine, or one per machine: bios,uefi",
            ),
        ] = "bios",
        directory: DirOpt = DEFAULT_DIR,
    ) -> None:
        """Start the lab: a namespace with qrm server, DHCP, TFTP and N QEMU machines that PXE-boot."""
        from qrm_core.lab.netlab import Lab

        lab = Lab(directory, progress=lambda line: say(line))
        state = lab.up(
            vms=vms,
            dhcp=dhcp.lower(),
            cpus=cpus,
            memory_mb=memory,
            port=port,
            kernel_deb=kernel_deb,
            kernel_version=kernel_version,
            heartbeat_timeout=heartbeat_timeout,
            firmware=firmware,
        )
        say(
            f"lab up in {lab.dir}: {len(state.vms)} machine(s) booting from the network "
            f"('qrm lab status', 'qrm lab console vm1 --follow')"
        )
        say(
            f"qrm server: {state.url} from this machine ({state.server_url} inside {state.netns}), "
            f"user {netlab.ADMIN}, password {state.password}"
        )
        say(
            'point qrm at it with: eval "$(qrm lab env)"   then e.g.: qrm resource list; qrm ve start web --wait'
        )

    @lab_app.command("down")
    def lab_down(directory: DirOpt = DEFAULT_DIR) -> None:
        """Stop every process of the lab and delete its namespace (also after a crash; safe to repeat)."""
        from qrm_core.lab.netlab import Lab

        lab = Lab(directory)
        done = lab.down()
        if not done:
            say(f"no lab running in {lab.dir}; nothing to do")
            return
        for line in done:
            say(line)
        say(f"lab in {lab.dir} is down (logs and consoles stay there)")

    @lab_app.command("status")
    def lab_status(
        directory: DirOpt = DEFAULT_DIR,
        output: Annotated[
            Output,
            typer.Option("--output", "-o", help="table for people, json for programs", case_sensitive=False),
        ] = Output.table,
    ) -> None:
        """Show the lab: processes, machines, and what qrm knows of them."""
        from qrm_core.lab.netlab import Lab

        status = Lab(directory).status()
        if output is Output.json:
            print_json(status)
            return
        running = all(p["running"] for p in status["processes"]) and status["netns_exists"]
        say(
            f"lab in {status['directory']}: {status['status']}{'' if running else ' (something stopped)'}, "
            f"namespace {status['netns']}{'' if status['netns_exists'] else ' (gone)'}, DHCP {status['dhcp']}, "
            f"kernel {status['kernel']}"
        )
        say(f"qrm server: {status['url']} from here, {status['server_url']} inside; user {status['user']}")
        for proc in status["processes"]:
            say(f"  {proc['name']}: pid {proc['pid']}, {'running' if proc['running'] else 'NOT running'}")
        if status["problem"]:
            say(f"  {status['problem']}")
        if status["status"] != "up" and not any(
            p["running"] for p in status["processes"] if p["name"] == "up"
        ):
            say("  'qrm lab up' did not finish: 'qrm lab down' removes what it left")
        show_list(
            status["machines"],
            [
                ("MACHINE", lambda m: m["name"]),
                ("MAC", lambda m: m["mac"]),
                ("CPUS", lambda m: m["cpus"]),
                ("MEMORY MB", lambda m: m["memory_mb"]),
                ("FIRMWARE", lambda m: m.get("firmware", "bios")),
                ("POWER", lambda m: m["power"]),
                ("RESOURCE", lambda m: m["resource"]),
                ("STATE", lambda m: m["state"]),
                ("VE", lambda m: m["ve"]),
                ("IP", lambda m: m["ip"]),
            ],
            Output.table,
            "Machines",
        )

    @lab_app.command("env")
    def lab_env(directory: DirOpt = DEFAULT_DIR) -> None:
        """Print shell lines that point qrm at the lab's server: eval "$(qrm lab env)"."""
        from qrm_core.lab.netlab import Lab

        for line in Lab(directory).env_lines():
            typer.echo(line)

    @lab_app.command("console")
    def lab_console(
        name: Annotated[str, typer.Argument(help="the machine, e.g. vm1")],
        follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until Ctrl-C")] = False,
        directory: DirOpt = DEFAULT_DIR,
    ) -> None:
        """Show a machine's serial console (kernel and node agent; iPXE prints on the screen only)."""
        from qrm_core.lab.netlab import Lab

        path = Lab(directory).console_path(name)
        out = sys.stdout.buffer
        offset = 0
        while True:
            try:
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                offset += len(chunk)
                out.write(chunk)
                out.flush()
            if not follow:
                return
            time.sleep(0.2)

    vm_app = typer.Typer(help="Power the lab's machines on and off.", no_args_is_help=True)
    lab_app.add_typer(vm_app, name="vm")

    @vm_app.command("start")
    def vm_start(
        name: Annotated[str, typer.Argument(help="the machine, e.g. vm1")], directory: DirOpt = DEFAULT_DIR
    ) -> None:
        """Power a machine on: it boots from the network."""
        from qrm_core.lab.netlab import Lab

        spec = Lab(directory).vm_start(name)
        say(f"{spec.name} powered on ({spec.mac})")

    @vm_app.command("kill")
    def vm_kill(
        name: Annotated[str, typer.Argument(help="the machine, e.g. vm1")], directory: DirOpt = DEFAULT_DIR
    ) -> None:
        """Pull a machine's plug (SIGKILL to its QEMU): what a failed machine looks like to qrm."""
        from qrm_core.lab.netlab import Lab

        proc = Lab(directory).vm_kill(name)
        say(f"{name} killed (pid {proc.pid})")
