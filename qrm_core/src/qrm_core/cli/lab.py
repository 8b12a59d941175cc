"""``qrm lab``: a data center in a box.

``simulate`` runs simulated node agents against a qrm server (real HTTP, the
real protocol). ``up|down|status|env|console|vm`` run the QEMU lab
(qrm_core.lab.netlab)::

    sudo qrm lab up --vms 2            # namespace, qrm server + Kea + TFTP, two QEMU machines
    sudo qrm lab up --hosts 1          # ...and a hypervisor host hv1 (libvirtd + QEMU) for partitions
    eval "$(sudo qrm lab env)"          # QRM_SERVER=http://127.0.0.1:8077, user, password
    qrm resource list                   # the machines, idle, with their real MACs, CPUs, memory
    qrm ve start web --wait             # one reboots into the VE
    sudo qrm lab console vm1 --follow   # its serial console
    sudo qrm lab down

The QEMU lab's commands act on this machine (namespaces, processes); they
need root and ignore ``--server``.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from qrm_core.cli.common import OutputOpt, client, state, sub_app
from qrm_core.cli.output import Output, message, print_json, show_list
from qrm_core.errors import AuthError, Forbidden, InvalidInput
from qrm_core.lab import netlab

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
MachineArg = Annotated[str, typer.Argument(help="the machine, e.g. vm1")]

app = sub_app("A data center in a box: simulated agents, QEMU machines.")


def say(line: str) -> None:
    """One plain line (no wrapping: paths and passwords are copied from it)."""
    typer.echo(line)


@app.command("up")
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
    hosts: Annotated[
        int,
        typer.Option(
            "--hosts",
            help="hypervisor hosts hv1...: libvirt daemons running QEMU, for 'qrm partition add --host hv1'",
        ),
    ] = 0,
    directory: DirOpt = DEFAULT_DIR,
) -> None:
    """Start the lab: a namespace with qrm server, DHCP, TFTP and N QEMU machines that PXE-boot."""
    lab = netlab.Lab(directory, progress=lambda line: say(line))
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
        hosts=hosts,
    )
    say(
        f"lab up in {lab.dir}: {len(state.vms)} machine(s) booting from the network "
        f"('qrm lab status', 'qrm lab console vm1 --follow')"
    )
    if state.hosts:
        say(
            f"hypervisor hosts {', '.join(sorted(state.hosts))} (qemu): "
            "e.g. qrm partition add --host hv1 --count 2 --cpus 1 --memory 256"
        )
    say(
        f"qrm server: {state.url} from this machine ({state.server_url} inside {state.netns}), "
        f"user {netlab.ADMIN}, password {state.password}"
    )
    say('point qrm at it with: eval "$(qrm lab env)"   then e.g.: qrm resource list; qrm ve start web --wait')


@app.command("down")
def lab_down(directory: DirOpt = DEFAULT_DIR) -> None:
    """Stop every process of the lab and delete its namespace (also after a crash; safe to repeat)."""
    lab = netlab.Lab(directory)
    done = lab.down()
    if not done:
        say(f"no lab running in {lab.dir}; nothing to do")
        return
    for line in done:
        say(line)
    say(f"lab in {lab.dir} is down (logs and consoles stay there)")


@app.command("status")
def lab_status(
    directory: DirOpt = DEFAULT_DIR,
    output: OutputOpt = Output.table,
) -> None:
    """Show the lab: processes, machines, and what qrm knows of them."""
    status = netlab.Lab(directory).status()
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
    for host in status.get("hosts", []):
        say(
            f"  hypervisor host {host['name']}: libvirtd pid {host['pid']}, "
            f"{'running' if host['running'] else 'NOT running'}, {host['uri']}"
        )
    if status["problem"]:
        say(f"  {status['problem']}")
    if status["status"] != "up" and not any(p["running"] for p in status["processes"] if p["name"] == "up"):
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


@app.command("env")
def lab_env(directory: DirOpt = DEFAULT_DIR) -> None:
    """Print shell lines that point qrm at the lab's server: eval "$(qrm lab env)"."""
    for line in netlab.Lab(directory).env_lines():
        typer.echo(line)


@app.command("console")
def lab_console(
    name: MachineArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until Ctrl-C")] = False,
    directory: DirOpt = DEFAULT_DIR,
) -> None:
    """Show a machine's serial console (kernel and node agent; iPXE prints on the screen only)."""
    path = netlab.Lab(directory).console_path(name)
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


@app.command("simulate")
def lab_simulate(
    ctx: typer.Context,
    nodes: Annotated[int, typer.Option("--nodes", "-n", help="simulated machines")] = 10,
    hypervisor_hosts: Annotated[
        int,
        typer.Option("--hypervisor-hosts", help="extra machines that host fake-hypervisor partitions"),
    ] = 0,
    cpus: Annotated[int, typer.Option("--cpus")] = 2,
    memory: Annotated[int, typer.Option("--memory", help="MB per machine")] = 2048,
    duration: Annotated[
        float | None, typer.Option("--duration", help="seconds to run (default: until Ctrl-C)")
    ] = None,
    reboot_delay: Annotated[float, typer.Option("--reboot-delay", help="seconds a reboot takes")] = 1.0,
    enroll: Annotated[
        str | None, typer.Option("--enroll", help="enrollment token (default: ask the site)")
    ] = None,
    sim_server: Annotated[str | None, typer.Option("--agent-url", help="server URL agents use")] = None,
) -> None:
    """Run N simulated node agents against a qrm server (real HTTP, real protocol)."""
    import asyncio

    from qrm_core.lab.simulate import Simulation, free_run, node_specs

    cli = state(ctx)
    url = sim_server or cli.server or cli.settings.server_url or "http://127.0.0.1:8080"
    if nodes < 0 or hypervisor_hosts < 0 or nodes + hypervisor_hosts == 0:
        raise InvalidInput("simulate at least one machine")
    if nodes + hypervisor_hosts >= 1 << 24:
        raise InvalidInput(f"simulate at most {(1 << 24) - 2} machines per run")
    token = enroll or client(ctx).enrollment_token()
    # MACs no earlier (or concurrent) run uses: a block the server knows no machine in.
    try:
        run = free_run([r.mac for r in client(ctx).resource_list().items])
    except (AuthError, Forbidden) as exc:  # --enroll without a user: pick a block at random
        message(f"cannot list the server's machines ({exc.message}): MAC block chosen at random")
        run = random.randint(1, 255)
    sim = Simulation(
        url,
        token,
        reboot_delay=reboot_delay,
        fake_state_dir=cli.settings.state_dir,
        # After a rotation the machines fetch the site's new enrollment token
        # (with this CLI's access); with --enroll they have only the one given.
        enrollment=None if enroll else client(ctx).enrollment_token,
        report=lambda line: typer.echo(f"warning: {line}", err=True),
    )
    specs = node_specs(nodes, cpus=cpus, memory_mb=memory, hypervisor_hosts=hypervisor_hosts, run=run)
    message(
        f"simulating {len(specs)} machines against {url} (MACs {specs[0].mac} to {specs[-1].mac}; Ctrl-C to stop)"
    )
    try:
        stats = asyncio.run(sim.run(specs, duration=duration))
    except KeyboardInterrupt:
        stats = sim.stats
    message(
        f"registrations {stats.registrations}, heartbeats {stats.heartbeats}, reboots {stats.reboots}, "
        f"halts {stats.halts}, errors {stats.errors}"
    )


vm_app = sub_app("Power the lab's machines on and off.")
app.add_typer(vm_app, name="vm")


@vm_app.command("start")
def vm_start(name: MachineArg, directory: DirOpt = DEFAULT_DIR) -> None:
    """Power a machine on: it boots from the network."""
    spec = netlab.Lab(directory).vm_start(name)
    say(f"{spec.name} powered on ({spec.mac})")


@vm_app.command("kill")
def vm_kill(name: MachineArg, directory: DirOpt = DEFAULT_DIR) -> None:
    """Pull a machine's plug (SIGKILL to its QEMU): what a failed machine looks like to qrm."""
    proc = netlab.Lab(directory).vm_kill(name)
    say(f"{name} killed (pid {proc.pid})")
