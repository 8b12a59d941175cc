"""Input validation: what may reach generated configuration files."""

import pytest

from qrm_core.errors import InvalidInput
from qrm_core.services import validation as v


@pytest.mark.parametrize(
    "text, expected",
    [
        ("52:54:00:AB:cd:01", "52:54:00:ab:cd:01"),
        ("52-54-00-ab-cd-01", "52:54:00:ab:cd:01"),
        ("5254.00ab.cd01", "52:54:00:ab:cd:01"),
        ("525400abcd01", "52:54:00:ab:cd:01"),
        ("2:54:0:ab:cd:1", "02:54:00:ab:cd:01"),
    ],
)
def test_mac_notations_normalize(text: str, expected: str) -> None:
    assert v.mac(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "52:54:00:ab:cd",
        "52:54:00:ab:cd:01:02",
        "01:00:5e:00:00:01",
        "00:00:00:00:00:00",
        "52:54:00:ab:cd:zz",
        "52:54-00:ab:cd:01",
        "52:54:00:ab:cd:01\nhost x {",
    ],
)
def test_bad_macs_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput):
        v.mac(text)


@pytest.mark.parametrize(
    "text",
    ["web", "web-01", "a.b_c", "X" * 64, "1web"],
)
def test_good_names(text: str) -> None:
    assert v.name(text) == text


@pytest.mark.parametrize(
    "text",
    ["", "-web", "web 01", "web;rm", 'a"b', "a\nb", "X" * 65, "123", "web}", "../etc", "wéb"],
)
def test_names_cannot_carry_syntax(text: str) -> None:
    with pytest.raises(InvalidInput):
        v.name(text)


def test_comments_are_one_line() -> None:
    assert v.comment("QRMSRC") == "QRMSRC"
    assert v.comment(None) == ""
    for bad in ("a\nb", "a\rb", "a\x00b", "x" * 256):
        with pytest.raises(InvalidInput):
            v.comment(bad)


def test_ip_addresses() -> None:
    assert v.ip("10.0.11.35") == "10.0.11.35"
    assert v.ip(" fd00::1 ") == "fd00::1"
    for bad in ("10.0.11.356", "10.0.11", "host.example", "", "10.0.0.1; x"):
        with pytest.raises(InvalidInput):
            v.ip(bad)


def test_kernel_args_are_plain_tokens() -> None:
    assert v.kernel_args("console=ttyS0,115200 quiet root=/dev/nfs") == [
        "console=ttyS0,115200",
        "quiet",
        "root=/dev/nfs",
    ]
    for bad in ('a="b c"', "x;reboot", "$(id)", "a`b`", "#comment", "a\\b"):
        with pytest.raises(InvalidInput):
            v.kernel_args(bad)


def test_kernel_versions() -> None:
    assert v.kernel_version("2.6.9-22.EL") == "2.6.9-22.EL"
    assert v.kernel_version("6.1.0-28-amd64") == "6.1.0-28-amd64"
    with pytest.raises(InvalidInput):
        v.kernel_version("6.1 amd64")
