"""xl config files: what qrm writes is read by Xen's own parser (libxlutil) exactly as
qrm meant it, for HVM and PV guests; hand-written configs of the usual shapes parse the
same way (so the parser is the real grammar, not a lenient one); and nothing a user can
set adds a line or a setting."""

from __future__ import annotations

import pytest

from qrm_core.plugin_api import InvalidInput
from qrm_xen.xlcfg import XlConfig

HVM = dict(
    name="web-1",
    mode="hvm",
    memory_mb=256,
    max_memory_mb=512,
    vcpus=1,
    max_vcpus=4,
    mac="00:16:3e:12:34:56",
    bridge="xenbr0",
    nic_model="e1000",
    pinning={0: (0, 1), 2: (3,)},
)
PV = dict(
    name="pv.guest_2",
    mode="pv",
    memory_mb=128,
    max_memory_mb=128,
    vcpus=2,
    max_vcpus=2,
    mac="00:16:3e:00:00:07",
    bridge="br-prov",
    kernel="/var/lib/qrm/boot/vmlinuz-6.1.0-13-amd64",
    ramdisk="/var/lib/qrm/boot/initrd.img",
    extra="console=hvc0 qrm.server=http://10.0.0.1:8080 qrm.mac=00:16:3e:00:00:07 quiet",
)

#: Configs of the shapes people write by hand (xl.cfg(5)): comments, both quotes,
#: lists over several lines, trailing commas, numbers, a disk and a vif spec.
HAND_WRITTEN = {
    "hvm": (
        "# A fully virtualised guest\n"
        "type = 'hvm'\n"
        'name = "hvm-example"\n'
        "memory = 1024\n"
        "vcpus = 2\n"
        'vif = [ "mac=00:16:3e:aa:bb:cc,bridge=xenbr0,model=e1000" ]\n'
        "disk = [ 'format=raw, vdev=hda, access=rw, target=/dev/vg0/guest' ]\n"
        "boot = 'cd'\n"
        "sdl = 0\n"
        "vnc = 1\n"
        "serial = 'pty'\n"
    ),
    "pv": (
        'name = "pv-example"\n'
        'kernel = "/boot/vmlinuz"\n'
        'ramdisk = "/boot/initrd.img"\n'
        'extra = "root=/dev/xvda1 console=hvc0"\n'
        "memory = 512\n"
        "maxmem = 1024\n"
        "vcpus = 1\n"
        "cpus = [\n"
        '    "0-1",\n'
        '    "2",\n'
        "]\n"
        "vif = [ '' ]\n"
        "on_crash = 'restart'\n"
    ),
}


def test_hvm_config_reads_back_as_written(xl_parser) -> None:
    config = XlConfig(**HVM)
    text = config.render()
    expected = dict(config.settings())
    parsed = xl_parser.parse(text, {k: type(v) for k, v in expected.items()})
    assert parsed.ok, parsed.report
    assert parsed.values == expected
    assert parsed.values["vif"] == ["mac=00:16:3e:12:34:56,bridge=xenbr0,type=ioemu,model=e1000"]
    assert parsed.values["cpus"] == ["0-1", "all", "3"]
    assert (parsed.values["type"], parsed.values["boot"]) == ("hvm", "n")


def test_pv_config_reads_back_as_written(xl_parser) -> None:
    config = XlConfig(**PV)
    expected = dict(config.settings())
    parsed = xl_parser.parse(config.render(), {k: type(v) for k, v in expected.items()})
    assert parsed.ok, parsed.report
    assert parsed.values == expected
    assert parsed.values["extra"] == PV["extra"]
    assert "boot" not in expected and parsed.values["kernel"] == PV["kernel"]


@pytest.mark.parametrize("shape", sorted(HAND_WRITTEN))
def test_hand_written_configs_parse(xl_parser, shape: str) -> None:
    parsed = xl_parser.parse(HAND_WRITTEN[shape], {"name": str, "memory": int, "vif": list, "cpus": list})
    assert parsed.ok, parsed.report
    assert parsed.values["name"] == f"{shape}-example"
    if shape == "pv":
        assert parsed.values["cpus"] == ["0-1", "2"]


@pytest.mark.parametrize(
    "text",
    [
        'name = "unterminated\nmemory = 128\n',
        "memory = = 5\n",
        'vif = [ "a" "b" ]\n',
        "name = bare words\n",
    ],
)
def test_the_parser_refuses_broken_syntax(xl_parser, text: str) -> None:
    """The check can fail: libxlutil reports these (what a careless renderer could write)."""
    assert not xl_parser.parse(text, {"name": str}).ok


def test_an_injected_line_is_what_the_checks_would_catch(xl_parser) -> None:
    """Had a quote reached the file, a second setting would appear: the parser sees it.
    qrm never gets there: XlConfig refuses the value first."""
    smuggled = 'name = "x"\nextra = "a"\nmemory = 99999\n'
    assert xl_parser.parse(smuggled, {"memory": int}).values == {"memory": 99999}
    with pytest.raises(InvalidInput):
        XlConfig(**{**PV, "extra": 'a"\nmemory = 99999\n"'})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", 'x"; on_crash="preserve'),
        ("name", "a\nb"),
        ("mac", "00:16:3e:00:00:07,script=/tmp/evil"),
        ("bridge", "br0,script=/tmp/evil"),
        ("bridge", 'br0"'),
        ("kernel", "/boot/vmlinuz\"\nramdisk='/x'"),
        ("kernel", "relative/vmlinuz"),
        ("ramdisk", "/boot/initrd img"),
        ("extra", "console=hvc0\nmemory=1"),
        ("extra", "quote'd"),
        ("extra", 'dquote"d'),
        ("extra", "back\\slash"),
        ("extra", "hash # comment"),
        ("nic_model", "e1000,script=x"),
        ("mode", "hvm\nboot='c'"),
    ],
)
def test_hostile_values_are_refused(field: str, value: str) -> None:
    base = PV if field in ("kernel", "ramdisk", "extra") else HVM
    with pytest.raises(InvalidInput) as info:
        XlConfig(**{**base, field: value})
    assert "\n" not in info.value.message


def test_a_pv_guest_needs_a_kernel() -> None:
    with pytest.raises(InvalidInput, match="needs a kernel"):
        XlConfig(**{**PV, "kernel": None})
