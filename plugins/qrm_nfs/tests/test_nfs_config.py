"""The generated EXPORT grammar: rendering, the strict parser, ganesha's log. No root needed."""

from __future__ import annotations

import pytest

from qrm_core.errors import DriverError
from qrm_nfs import ganesha
from qrm_nfs.ganesha import ConfigMismatch, Export

EXPORTS = [
    Export(1001, "/srv/qrm/nfs/db", ("10.0.11.60",)),
    Export(1000, "/srv/qrm/nfs/web", ("10.0.11.50", "10.0.11.51")),
]


def test_render_reads_back_exactly() -> None:
    text = ganesha.render(EXPORTS)
    assert ganesha.parse_exports(text) == sorted(EXPORTS, key=lambda e: e.export_id)
    ganesha.verify_rendered(text, EXPORTS)
    assert text == ganesha.render(list(reversed(EXPORTS)))  # stable text: no spurious reloads
    assert 'Path = "/srv/qrm/nfs/web";' in text and 'Pseudo = "/srv/qrm/nfs/web";' in text
    assert "Clients = 10.0.11.50, 10.0.11.51;" in text and "Squash = No_Root_Squash;" in text
    assert ganesha.parse_exports(ganesha.render([])) == []


@pytest.mark.parametrize(
    "export",
    [
        Export(1000, '/srv/x"; Path = "/', ("10.0.0.1",)),
        Export(1000, "/srv/x}\nEXPORT {", ("10.0.0.1",)),
        Export(1000, "/srv/../etc", ("10.0.0.1",)),
        Export(1000, "/srv/x", ("10.0.0.1; Access_Type = RW",)),
        Export(1000, "/srv/x", ("*",)),
        Export(1000, "/srv/x", ()),
        Export(0, "/srv/x", ("10.0.0.1",)),
        Export(70000, "/srv/x", ("10.0.0.1",)),
    ],
)
def test_render_refuses_anything_outside_the_grammar(export: Export) -> None:
    with pytest.raises(DriverError):
        ganesha.render([export])


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: t + '%include "/etc/passwd"\n',
        lambda t: t + "NFS_CORE_PARAM { Protocols = 4; }\n",
        lambda t: t.replace("SecType = sys;", "SecType = sys; Bogus = 1;"),
        lambda t: t.replace("Access_Type = None;", "Access_Type = RW;", 1),
        lambda t: t.replace(
            "Squash = No_Root_Squash;\n    Protocols", "Squash = Root_Squash;\n    Protocols"
        ),
        lambda t: t.replace("Clients = 10.0.11.60;", "Clients = 0.0.0.0/0;"),
        lambda t: t.replace("Name = VFS;", "Name = PROXY;"),
        lambda t: t.replace('Pseudo = "/srv/qrm/nfs/db";', 'Pseudo = "/elsewhere";'),
        lambda t: t.rstrip().rstrip("}"),
        lambda t: t.replace("Export_Id = 1000;", "Export_Id = 1000; Export_Id = 2;"),
    ],
)
def test_strict_parser_catches_tampering(tamper) -> None:
    text = tamper(ganesha.render(EXPORTS))
    with pytest.raises(ConfigMismatch):
        ganesha.verify_rendered(text, EXPORTS)


def test_verify_catches_a_different_meaning() -> None:
    text = ganesha.render(EXPORTS)
    with pytest.raises(ConfigMismatch):
        ganesha.verify_rendered(text, EXPORTS[:1])


SAMPLE_LOG = """\
24/11/2026 08:00:59 : epoch 6b05443b : vm : nfs-ganesha-31972[main] load_rados_config :CONFIG :WARN :Missing RADOS URLs backend library
24/11/2026 08:00:59 : epoch 6b05443b : vm : nfs-ganesha-31972[main] nfs_set_param_from_conf :NFS STARTUP :EVENT :Configuration file successfully parsed
24/11/2026 08:00:59 : epoch 6b05443b : vm : nfs-ganesha-31972[main] gsh_dbus_pkginit :DBUS :CRIT :dbus_bus_get failed
24/11/2026 08:00:59 : epoch 6b05443b : vm : nfs-ganesha-31972[main] build_default_root :CONFIG :INFO :Export 0 (/) successfully created
24/11/2026 08:00:59 : epoch 6b05443b : vm : nfs-ganesha-31972[main] config_errs_to_log :CONFIG :CRIT :Config File (/x.conf:8): Unknown parameter (Bogus_Key)
24/11/2026 08:00:59 : epoch 6b05443b : vm : nfs-ganesha-31972[main] config_errs_to_log :CONFIG :CRIT :Config File (/x.conf:7): Errors processing block (EXPORT)
24/11/2026 08:00:59 : epoch 6b05443b : vm : nfs-ganesha-31972[main] Register_program :DISP :MAJ :Cannot register NFS V3 on UDP
"""


def test_log_problems_keep_only_configuration_complaints() -> None:
    problems = ganesha.log_problems(SAMPLE_LOG)
    assert problems == [
        "Config File (/x.conf:8): Unknown parameter (Bogus_Key)",
        "Config File (/x.conf:7): Errors processing block (EXPORT)",
    ]
