"""The generated files: content, and refusal of anything that could inject commands."""

from __future__ import annotations

import pytest

from qrm_core.services.boot import BootConfig
from qrm_tftpd import render


def idle(**changes: object) -> BootConfig:
    values: dict[str, object] = dict(
        mac="52:54:00:12:34:56",
        mode="idle",
        boot_generation=2,
        boot_image="idle",
        kernel_name="boot/idle/vmlinuz",
        initrd_name="boot/idle/initrd",
        kernel_url="http://10.0.0.1:8080/boot/idle/vmlinuz",
        initrd_url="http://10.0.0.1:8080/boot/idle/initrd",
        cmdline="quiet qrm.server=http://10.0.0.1:8080 qrm.mac=52:54:00:12:34:56 qrm.gen=2 qrm.mode=idle",
    )
    values.update(changes)
    return BootConfig.model_validate(values)


def test_boot_ipxe_chains_the_per_mac_script() -> None:
    text = render.boot_ipxe()
    assert text.startswith("#!ipxe\n")
    assert "chain tftp://${next-server}/ipxe/${mac:hexhyp}.ipxe || goto qrm-wait" in text
    assert "goto qrm-next" in text  # retries in a loop, not by nesting chains
    assert "chain tftp://${next-server}:6969/ipxe/" in render.boot_ipxe(6969)


def test_ipxe_script_prefers_http_and_falls_back_to_tftp() -> None:
    text = render.ipxe_script(idle())
    args = "initrd=initrd quiet qrm.server=http://10.0.0.1:8080 qrm.mac=52:54:00:12:34:56 qrm.gen=2 qrm.mode=idle"
    assert (
        f"kernel http://10.0.0.1:8080/boot/idle/vmlinuz {args} || "
        f"kernel tftp://${{next-server}}/boot/idle/vmlinuz {args} || goto qrm-failed\n"
    ) in text
    assert (
        "initrd http://10.0.0.1:8080/boot/idle/initrd || initrd tftp://${next-server}/boot/idle/initrd"
        " || goto qrm-failed\n"
    ) in text
    assert "boot || goto qrm-failed\n" in text
    assert text.endswith("exit 1\n")


def test_without_a_server_url_kernels_come_over_tftp_only() -> None:
    text = render.ipxe_script(idle(kernel_url=None, initrd_url=None), port=1069)
    assert "http://10.0.0.1:8080/boot" not in text
    assert "kernel tftp://${next-server}:1069/boot/idle/vmlinuz initrd=initrd quiet" in text


def test_ve_boot_is_labelled() -> None:
    text = render.ipxe_script(idle(mode="ve", ve="web", cmdline="qrm.mode=ve qrm.ve=web"))
    assert "# qrm boot script for 52:54:00:12:34:56: VE web, boot image idle, boot generation 2" in text
    conf = render.pxelinux_config(idle(mode="ve", ve="web", cmdline="qrm.mode=ve qrm.ve=web"))
    assert "  APPEND initrd=boot/idle/initrd qrm.mode=ve qrm.ve=web\n" in conf


def test_pxelinux_config() -> None:
    text = render.pxelinux_config(idle())
    assert text.splitlines()[2:] == [
        "DEFAULT qrm",
        "PROMPT 0",
        "TIMEOUT 0",
        "SAY qrm: 52:54:00:12:34:56 boots idle with boot image idle",
        "LABEL qrm",
        "  KERNEL boot/idle/vmlinuz",
        "  APPEND initrd=boot/idle/initrd quiet qrm.server=http://10.0.0.1:8080 "
        "qrm.mac=52:54:00:12:34:56 qrm.gen=2 qrm.mode=idle",
    ]


def test_nothing_to_boot_prints_waits_and_asks_again() -> None:
    none = BootConfig(
        mac="52:54:00:12:34:56", mode="none", message="no default boot image: add one with 'qrm x'"
    )
    text = render.ipxe_script(none, retry_seconds=7)
    assert (
        "echo qrm: nothing to boot for 52:54:00:12:34:56: no default boot image: add one with qrm x\n" in text
    )
    assert "sleep 7\nexit 1\n" in text
    assert "kernel" not in text
    conf = render.pxelinux_config(none, retry_seconds=7)
    assert "TIMEOUT 70\n" in conf and "KERNEL pxelinux.0" in conf and "DEFAULT qrm-retry" in conf


@pytest.mark.parametrize(
    "changes",
    [
        {"cmdline": "quiet ${evil}"},
        {"cmdline": "a||b"},
        {"cmdline": "quiet\nchain http://evil/x"},
        {"cmdline": "#comment"},
        {"cmdline": "a;b"},
        {"cmdline": 'say="hi"'},
        {"kernel_url": "http://x/k ; chain http://evil/"},
        {"kernel_url": "http://x/${net0/ip}"},
        {"kernel_url": "ftp://x/k"},
        {"kernel_name": "boot/../../etc/passwd"},
        {"kernel_name": "boot/idle/vmlinuz\nkernel http://evil"},
        {"boot_image": "idle\nboot"},
        {"boot_image": "idle\n"},
        {"cmdline": "quiet\n"},
        {"cmdline": "quiet\tx"},
        {"ve": "web\n", "mode": "ve"},
        {"mac": "52:54:00:12:34:56\nchain x"},
    ],
)
def test_injection_is_refused(changes: dict[str, str]) -> None:
    config = idle().model_copy(update=changes)
    with pytest.raises(render.RenderError, match="refusing to write"):
        render.ipxe_script(config)
    if "kernel_url" not in changes:
        with pytest.raises(render.RenderError):
            render.pxelinux_config(config)


def test_messages_lose_everything_special() -> None:
    assert render.safe_text("a'b\"c${x}\n#d;e&&f||g\\h") == "a b c x d e f g h"


def test_hexhyp() -> None:
    assert render.hexhyp("52:54:00:aa:bb:cc") == "52-54-00-aa-bb-cc"
    with pytest.raises(render.RenderError):
        render.hexhyp("52-54-00-aa-bb-cc")
