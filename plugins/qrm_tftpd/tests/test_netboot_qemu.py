"""The generated files validated by the real boot loaders: iPXE and pxelinux in QEMU.

Two virtual machines (QEMU under TCG) on a bridge inside a network namespace
this test creates; ``qrm tftpd`` (the real command, a separate process) serves
them from a SQLite database inside the same namespace.

* VM A runs Debian's iPXE (``ipxe.lkrn`` with a start script that sets a
  static address - no DHCP here, that is the dhcpd plugin's side - and chains
  ``boot.ipxe``). With no boot image yet it gets the "nothing to boot" script,
  which must wait and come back through ``boot.ipxe``; once the test adds a
  boot image it must fetch the kernel over HTTP, the initrd over TFTP (the
  HTTP stand-in has none: the fallback) and boot it.
* VM B chains ``pxelinux.0`` from iPXE (which provides the PXE API, as a
  NIC's ROM would): ``ldlinux.c32``, then ``pxelinux.cfg/01-<mac>``, which must
  reload ``pxelinux.0`` while there is nothing to boot and then fetch the
  kernel and initrd named in it.

The "kernel" is a 121-byte multiboot probe (source below): iPXE boots it like
a kernel, and it writes the command line and the initrd it was given to the
serial port, then ends QEMU through the isa-debug-exit device - so the test
sees exactly what a real kernel would have received.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IPXE_DIR, PXELINUX_DIR, SYSLINUX_DIR, need_file, need_tool, network_namespace

from qrm_core.testkit import wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]

# The probe "kernel", assembled once with GNU as (``as --32``, ``ld -m elf_i386
# -Ttext=0x100000 --oformat binary``) from:
#
#   header: .long 0x1BADB002, 0x00010000, -(0x1BADB002+0x00010000)   # multiboot, a.out kludge
#           .long header, header, 0, 0, _start                        # load at 1 MiB, enter _start
#   _start: mov esi,[ebx+16]; call puts                # the command line (mbi.cmdline)
#           mov al,10; call putc
#           mov ecx,[ebx+20]; jecxz done                # mods_count
#           mov edi,[ebx+24]; mov esi,[edi]; mov ebp,[edi+4]   # first module = the initrd
#   loop:   cmp esi,ebp; jae done; lodsb; call putc; jmp loop
#   done:   mov al,10; call putc; mov dx,0xf4; mov al,0x10; out dx,al    # QEMU exits with 33
#   halt:   hlt; jmp halt
#   puts:   lodsb; test al,al; jz 1f; call putc; jmp puts; 1: ret
#   putc:   mov ah,al; mov dx,0x3fd; 2: in al,dx; test al,0x20; jz 2b   # wait for COM1
#           mov al,ah; mov dx,0x3f8; out dx,al; ret
PROBE = bytes.fromhex(
    "02b0ad1b00000100fe4f51e400001000000010000000000000000000200010008b7310e831000000b00ae837"
    "0000008b4b14e3148b7b188b378b6f0439ee7308ace820000000ebf4b00ae81700000066baf400b010eef4eb"
    "fdac84c07407e803000000ebf4c388c466bafd03eca82074fb88e066baf803eec3"
)
PROBE_EXIT = 33

SUBNET = "10.231.0"
SERVER = f"{SUBNET}.1"
MAC_A, IP_A = "52:54:00:23:10:0a", f"{SUBNET}.10"
MAC_B, IP_B = "52:54:00:23:10:0b", f"{SUBNET}.11"
INITRD = b"qrm-test-initrd: the agent would live here\n"


def qrm(
    *args: str, env: dict[str, str], netns: str | None = None, **kwargs
) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from qrm_core.cli.main import run; run()", *args]
    if netns:
        return subprocess.Popen(["ip", "netns", "exec", netns, *cmd], env=env, **kwargs)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=60)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture
def netns() -> Iterator[str]:
    if not os.path.exists("/dev/net/tun"):
        from qrm_core.testing import missing

        missing("/dev/net/tun", "QEMU needs tap devices")
    steps = [
        ["link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"],
        ["addr", "add", f"{SERVER}/24", "dev", "br0"],
        ["link", "set", "br0", "up"],
    ]
    for tap in ("tapa", "tapb"):
        steps += [
            ["tuntap", "add", "dev", tap, "mode", "tap"],
            ["link", "set", tap, "master", "br0"],
            ["link", "set", tap, "up"],
        ]
    with network_namespace("qemu", steps) as name:
        yield name


def test_ipxe_and_pxelinux_boot_what_qrm_tftpd_serves(netns: str, tmp_path: Path) -> None:
    qemu = need_tool("qemu-system-x86_64", "qemu-system-x86")
    lkrn = need_file(IPXE_DIR / "ipxe.lkrn", "ipxe")
    need_file(PXELINUX_DIR / "pxelinux.0", "pxelinux")
    need_file(SYSLINUX_DIR / "ldlinux.c32", "syslinux-common")

    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRM_")}
    env.update(
        QRM_DATA_DIR=str(data),
        QRM_TFTPD_SERVER_URL=f"http://{SERVER}:8080",
        QRM_TFTPD_RETRY_SECONDS="1",
        QRM_TFTPD_LISTEN_ADDRESS="0.0.0.0",  # the default: answers come from the address asked (IP_PKTINFO)
    )
    # Beyond loopback only with a changed admin password (core's listening rule).
    qrm("init", "--admin-password", "netboot-test-password", env=env)
    (tmp_path / "probe").write_bytes(PROBE)
    (tmp_path / "initrd").write_bytes(INITRD)
    # The qrm server's /boot/<image>/ files over HTTP (a stand-in: that endpoint is
    # core's); it has the kernel but no initrd, so iPXE must fall back to TFTP for it.
    web = tmp_path / "web" / "boot" / "idle"
    web.mkdir(parents=True)
    (web / "vmlinuz").write_bytes(PROBE)

    scripts = {}
    for vm, ip, first in (("a", IP_A, "boot.ipxe"), ("b", IP_B, "pxelinux.0")):
        scripts[vm] = tmp_path / f"start-{vm}.ipxe"
        scripts[vm].write_text(
            "#!ipxe\nifopen net0\n"
            f"set net0/ip {ip}\nset net0/netmask 255.255.255.0\nset next-server {SERVER}\n"
            f"set filename {first}\nchain tftp://{SERVER}/{first}\n"
        )

    processes: list[subprocess.Popen] = []
    http_log = (tmp_path / "http.log").open("w")
    try:
        processes.append(
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    netns,
                    sys.executable,
                    "-m",
                    "http.server",
                    "--bind",
                    SERVER,
                    "--directory",
                    str(tmp_path / "web"),
                    "8080",
                ],
                stdout=http_log,
                stderr=subprocess.STDOUT,
            )
        )
        tftpd = qrm("tftpd", env=env, netns=netns, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        processes.append(tftpd)
        assert "serving" in tftpd.stdout.readline()
        log_file = data / "logs" / "qrm.log"

        def served(name: str, client: str) -> int:
            text = log_file.read_text() if log_file.exists() else ""
            return len(re.findall(rf"tftp: {re.escape(client)}:\d+ {re.escape(name)}: done", text))

        vms = {}
        for vm, mac in (("a", MAC_A), ("b", MAC_B)):
            vms[vm] = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    netns,
                    qemu,
                    "-accel",
                    "tcg",
                    "-m",
                    "96",
                    "-display",
                    "none",
                    "-monitor",
                    "none",
                    "-no-reboot",
                    "-serial",
                    f"file:{tmp_path / f'serial-{vm}.log'}",
                    "-device",
                    "isa-debug-exit,iobase=0xf4,iosize=0x04",
                    "-kernel",
                    str(lkrn),
                    "-initrd",
                    str(scripts[vm]),
                    "-netdev",
                    f"tap,id=n0,ifname=tap{vm},script=no,downscript=no",
                    "-device",
                    f"virtio-net-pci,netdev=n0,mac={mac},romfile=",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            processes.append(vms[vm])

        # Nothing to boot yet: both must come back for their file, more than once.
        wait_until(lambda: served("ipxe/52-54-00-23-10-0a.ipxe", IP_A) >= 2, "iPXE to ask again", 60, 0.2)
        wait_until(
            lambda: served("pxelinux.cfg/01-52-54-00-23-10-0b", IP_B) >= 2, "pxelinux to ask again", 60, 0.2
        )
        assert served("pxelinux.0", IP_B) >= 2  # the retry config reloads pxelinux.0
        qrm(
            "boot-image",
            "add",
            "-n",
            "idle",
            "-k",
            "6.1",
            "--kernel",
            str(tmp_path / "probe"),
            "--initrd",
            str(tmp_path / "initrd"),
            "--cmdline",
            "quiet console=ttyS0",
            "--default",
            env=env,
        )

        # VM A boots the probe: kernel over HTTP, initrd over TFTP, our command line.
        assert vms["a"].wait(60) == PROBE_EXIT, vms["a"].stderr.read() if vms["a"].stderr else ""
        cmdline, _, rest = (tmp_path / "serial-a.log").read_bytes().partition(b"\n")
        assert re.fullmatch(
            rf"http://{SERVER}:8080/boot/idle/vmlinuz initrd=initrd quiet console=ttyS0 "
            rf"qrm.server=http://{SERVER}:8080 qrm.mac={MAC_A} qrm.gen=0 qrm.enroll=[\w-]+ qrm.mode=idle",
            cmdline.decode(),
        ), cmdline
        assert rest == INITRD + b"\n"
        # The server logs a transfer when its last ACK is in; a busy machine can log it after the VM ran.
        wait_until(lambda: served("boot/idle/initrd", IP_A) >= 1, "the initrd transfer's log line", 10, 0.1)
        assert served("boot/idle/initrd", IP_A) == 1 and served("boot/idle/vmlinuz", IP_A) == 0
        http = (tmp_path / "http.log").read_text()
        assert (
            '"GET /boot/idle/vmlinuz HTTP/1.1" 200' in http and '"GET /boot/idle/initrd HTTP/1.1" 404' in http
        )

        # VM B: pxelinux read the per-MAC config and fetched what it names, over TFTP.
        wait_until(lambda: served("boot/idle/initrd", IP_B) >= 1, "pxelinux to load the initrd", 60, 0.2)
        assert served("boot/idle/vmlinuz", IP_B) == 1
        assert served("ldlinux.c32", IP_B) >= 1
    finally:
        for process in reversed(processes):
            stop(process)
        http_log.close()
        shutil.rmtree(tmp_path / "web", ignore_errors=True)
