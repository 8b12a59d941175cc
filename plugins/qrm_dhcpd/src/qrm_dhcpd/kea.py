"""Kea DHCPv4: the generated JSON configuration, its check, and the control socket.

The configuration is built as a Python dictionary and serialised with
:func:`json.dumps`, so quoting is never hand-made; on top of that every value
passed :mod:`qrm_dhcpd.hosts` or :mod:`qrm_dhcpd.settings`, so nothing in it
can carry Kea's own extensions (comments, ``<?include?>``) either.

``kea-dhcp4 -t`` checks a file before it replaces the old one. It also checks
that the listed interfaces exist in the namespace it runs in: with
``QRM_DHCPD_NETNS`` the check runs inside that namespace; otherwise, when the
interface does not exist where qrm runs (a server driven from elsewhere), the
check runs on a copy listening on ``"*"`` and says so.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qrm_core.plugin_api import PluginError
from qrm_dhcpd import pxe
from qrm_dhcpd.hosts import Host
from qrm_dhcpd.settings import DhcpdPaths, DhcpdSettings
from qrm_dhcpd.system import netns_prefix, run_check, write_temp

# Kea expressions (ARM "Client Classification"). Option 60 starts with
# "PXEClient" for PXE ROMs and for iPXE; iPXE also sends user-class "iPXE".
PXE_TEST = "substring(option[60].hex,0,9) == 'PXEClient'"
IPXE_TEST = "(option[77].hex == 'iPXE' or option[175].exists)"
EFI64_TEST = " or ".join(f"option[93].hex == 0x{arch:04x}" for arch in pxe.ARCH_EFI64)
BIOS_TEST = f"(not option[93].exists or option[93].hex == 0x{pxe.ARCH_BIOS:04x})"


#: Retries of opening the DHCP socket (every 2 s): about 2 years.
SOCKET_RETRIES = 30_000_000


def _class(name: str, test: str, next_server: str, boot_file: str | None, ipxe_opts: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "test": test, "next-server": next_server}
    if boot_file is not None:
        entry["boot-file-name"] = boot_file
    if ipxe_opts:
        entry["option-data"] = [
            {"space": "dhcp4", "name": "ipxe-encap-opts", "always-send": True},
            {"space": "ipxe", "name": "no-pxedhcp", "data": "1"},
        ]
    return entry


def client_classes(settings: DhcpdSettings) -> list[dict[str, Any]]:
    """PXE classes; each client matches at most one of them."""
    ns = str(settings.next_server)
    if settings.boot_loader == "pxelinux":
        return [
            _class("qrm-pxelinux-ipxe", IPXE_TEST, ns, pxe.PXELINUX, True),
            _class("qrm-pxelinux", f"{PXE_TEST} and not {IPXE_TEST}", ns, pxe.PXELINUX, False),
        ]
    return [
        _class("qrm-ipxe", IPXE_TEST, ns, pxe.IPXE_SCRIPT, True),
        _class(
            "qrm-pxe-efi64", f"{PXE_TEST} and not {IPXE_TEST} and ({EFI64_TEST})", ns, pxe.EFI64_LOADER, False
        ),
        _class("qrm-pxe-bios", f"{PXE_TEST} and not {IPXE_TEST} and {BIOS_TEST}", ns, pxe.BIOS_LOADER, False),
        _class(
            "qrm-pxe-other",
            f"{PXE_TEST} and not {IPXE_TEST} and not ({EFI64_TEST}) and not {BIOS_TEST}",
            ns,
            None,
            False,
        ),
    ]


def reservation(host: Host) -> dict[str, Any]:
    entry: dict[str, Any] = {"hw-address": host.mac}
    if host.ip is not None:
        entry["ip-address"] = str(host.ip)
    if host.hostname:
        entry["hostname"] = host.hostname
    return entry


def hosts_database_params(settings: DhcpdSettings) -> dict[str, Any] | None:
    if settings.kea_hosts_database is None:
        return None
    from qrm_dhcpd.keadb import kea_params

    return kea_params(settings.kea_hosts_database.get_secret_value())


def render(settings: DhcpdSettings, paths: DhcpdPaths, hosts: list[Host] | None) -> dict[str, Any]:
    """The whole Kea configuration; ``hosts`` None means reservations live in the hosts database."""
    net = settings.subnet
    assert net is not None and settings.interface is not None
    subnet: dict[str, Any] = {
        "id": settings.kea_subnet_id,
        "subnet": str(net),
        "pools": [{"pool": f"{settings.pool_start} - {settings.pool_end}"}],
    }
    options: list[dict[str, Any]] = []
    if settings.router is not None:
        options.append({"name": "routers", "data": str(settings.router)})
    if settings.dns_servers:
        options.append(
            {"name": "domain-name-servers", "data": ", ".join(str(a) for a in settings.dns_servers)}
        )
    if settings.domain:
        options.append({"name": "domain-name", "data": settings.domain})
    if options:
        subnet["option-data"] = options
    if hosts is not None:
        subnet["reservations"] = [reservation(h) for h in hosts]
    dhcp4: dict[str, Any] = {
        "user-context": {
            "generated-by": "qrm-dhcpd",
            "note": "qrm rewrites this file; change the QRM_DHCPD_ settings",
        },
        "interfaces-config": {
            "interfaces": [settings.interface],
            "dhcp-socket-type": "raw",
            # A provisioning bridge has no carrier until a machine is plugged in
            # (or a VM's tap is opened). Kea 2.2 then logs DHCPSRV_OPEN_SOCKET_FAIL
            # "interface ... is not running" and, by default, never tries again:
            # it would serve nobody. Keep retrying every 2 s instead.
            "service-sockets-max-retries": SOCKET_RETRIES,
            "service-sockets-retry-wait-time": 2000,
        },
        "control-socket": {"socket-type": "unix", "socket-name": str(paths.control_socket)},
        "lease-database": {
            "type": "memfile",
            "persist": True,
            "name": str(paths.leases),
            "lfc-interval": 3600,
        },
        "host-reservation-identifiers": ["hw-address"],
        "valid-lifetime": settings.lease_time,
        "option-def": [
            {
                "space": "dhcp4",
                "name": "ipxe-encap-opts",
                "code": pxe.IPXE_ENCAP_CODE,
                "type": "empty",
                "encapsulate": "ipxe",
            },
            {"space": "ipxe", "name": "no-pxedhcp", "code": pxe.IPXE_NO_PXEDHCP_CODE, "type": "uint8"},
        ],
        "client-classes": client_classes(settings),
        "subnet4": [subnet],
        "loggers": [
            {"name": "kea-dhcp4", "output_options": [{"output": "stdout"}], "severity": "INFO"},
        ],
    }
    db = hosts_database_params(settings)
    if db is not None:
        dhcp4["hosts-database"] = db
    return {"Dhcp4": dhcp4}


def mask(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration without the hosts database's password, for showing to people."""
    db = config.get("Dhcp4", {}).get("hosts-database")
    if not db or "password" not in db:
        return config
    copy = json.loads(json.dumps(config))
    copy["Dhcp4"]["hosts-database"]["password"] = "(see the configuration file)"
    return copy


def dumps(config: dict[str, Any]) -> str:
    """The file text: indented for people, one line per reservation.

    ``json.dumps(indent=...)`` falls back to the pure-Python encoder (about
    80 ms for 10,000 reservations here); the reservations are encoded compactly
    (the C encoder) and spliced in, one per line, in a few milliseconds.
    """
    dhcp4 = config["Dhcp4"]
    subnets = dhcp4.get("subnet4", [])
    parts: list[str] = []
    shell_subnets = []
    for index, subnet in enumerate(subnets):
        if "reservations" in subnet:
            shell_subnets.append(dict(subnet, reservations=f"\x00qrm-reservations-{index}"))
            parts.append(",\n".join(json.dumps(r) for r in subnet["reservations"]))
        else:
            shell_subnets.append(subnet)
            parts.append("")
    text = json.dumps({"Dhcp4": dict(dhcp4, **{"subnet4": shell_subnets})}, indent=1)
    for index, body in enumerate(parts):
        marker = json.dumps(f"\x00qrm-reservations-{index}")
        text = text.replace(marker, f"[\n{body}\n]" if body else "[]", 1)
    return text + "\n"


# ---------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------


@dataclass
class CheckResult:
    ok: bool
    message: str
    wildcard: bool = False


def kea_env(paths: DhcpdPaths) -> dict[str, str]:
    """Kea's pid and lock files go into the state directory, not /run/kea."""
    env = dict(os.environ)
    env["KEA_PIDFILE_DIR"] = str(paths.state_dir)
    env["KEA_LOCKFILE_DIR"] = str(paths.state_dir)
    return env


def check(settings: DhcpdSettings, paths: DhcpdPaths, path: Path, config: dict[str, Any]) -> CheckResult:
    """Run ``kea-dhcp4 -t`` on ``path`` (see the module text for where)."""
    assert settings.interface is not None
    target = path
    wildcard = False
    extra: Path | None = None
    if not settings.netns and not Path("/sys/class/net", settings.interface).exists():
        copy = json.loads(json.dumps(config))
        copy["Dhcp4"]["interfaces-config"]["interfaces"] = ["*"]
        extra = write_temp(path, json.dumps(copy))
        target, wildcard = extra, True
    try:
        paths.state_dir.mkdir(parents=True, exist_ok=True)
        argv = [*netns_prefix(settings.netns), settings.kea_dhcp4, "-t", str(target)]
        code, output = run_check(argv, timeout=max(settings.timeout, 30.0), env=kea_env(paths))
    finally:
        if extra is not None:
            extra.unlink(missing_ok=True)
    if code == 0:
        return CheckResult(True, "kea-dhcp4 -t: configuration is valid", wildcard)
    return CheckResult(False, first_error(output), wildcard)


def first_error(output: str) -> str:
    """The line of Kea's output that says what is wrong."""
    for marker in ("Error encountered:", " ERROR ", "FATAL"):
        for line in output.splitlines():
            if marker in line:
                return line.split(marker, 1)[1].strip() if marker == "Error encountered:" else line.strip()
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "kea-dhcp4 -t failed without a message"


# ---------------------------------------------------------------------------
# The control socket
# ---------------------------------------------------------------------------


class KeaControl:
    """Commands over Kea's unix control socket (``config-set``, ``config-get``, ...)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    def command(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one command; return Kea's answer (``result`` 0 is success)."""
        request: dict[str, Any] = {"command": command}
        if arguments is not None:
            request["arguments"] = arguments
        return self.raw(json.dumps(request).encode())

    def raw(self, payload: bytes) -> dict[str, Any]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise KeaUnreachable(
                    f"Kea is not running (control socket {self.path}: {exc.strerror})"
                ) from None
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    break
                chunks.append(data)
        except TimeoutError:
            raise PluginError(f"Kea did not answer on {self.path} within {self.timeout:.0f} s") from None
        except OSError as exc:
            raise KeaUnreachable(f"cannot talk to Kea on {self.path}: {exc}") from None
        finally:
            sock.close()
        body = b"".join(chunks)
        try:
            answer = json.loads(body)
        except ValueError:
            raise PluginError(f"Kea sent an answer that is not JSON: {body[:80]!r}") from None
        if isinstance(answer, list):  # the control agent wraps answers in a list
            answer = answer[0] if answer else {}
        if not isinstance(answer, dict):
            raise PluginError(f"Kea sent an unexpected answer: {body[:80]!r}")
        return answer

    def alive(self) -> bool:
        """Whether a Kea answers on the socket."""
        try:
            return self.command("version-get").get("result") == 0
        except PluginError:
            return False

    def _send_config(self, command: str, text: str) -> dict[str, Any]:
        return self.raw(b'{"command": "' + command.encode() + b'", "arguments": ' + text.encode() + b"}")

    def config_set(self, config: dict[str, Any], *, tested: bool = False, text: str | None = None) -> None:
        """Replace Kea's running configuration, after Kea itself has tested it.

        Kea 2.2 does not survive a rejected ``config-set``: it logs
        ``DHCP4_CONFIG_UNRECOVERABLE_ERROR`` and stops answering DHCP while the
        process and its control socket stay up (seen here; see the tests). So
        every configuration goes through ``config-test`` first, which runs the
        same parser without applying anything, unless ``tested``: the full
        rewrite has just had ``kea-dhcp4 -t`` pass this very configuration in
        the server's own network namespace. ``text`` is the configuration
        already encoded (the file's text), to avoid encoding it again.
        """
        body = text if text is not None else json.dumps(config)
        answer = {"result": 0} if tested else self._send_config("config-test", body)
        if answer.get("result") != 0:
            raise PluginError(
                f"Kea rejected the configuration (config-test), nothing changed: {answer.get('text', answer)}"
            )
        answer = self._send_config("config-set", body)
        if answer.get("result") != 0:
            raise PluginError(
                f"Kea failed to apply a tested configuration (config-set): {answer.get('text', answer)}"
            )


class KeaUnreachable(PluginError):
    """No Kea listens on the control socket."""
