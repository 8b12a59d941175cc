"""Rendering, names, settings and status parsing, without a Nagios."""

from __future__ import annotations

import pytest

from qrm_core.errors import InvalidInput
from qrm_nagios import render, status
from qrm_nagios.render import HostRecord, RenderProblem, StorageRecord
from qrm_nagios.settings import NagiosSettings, load_settings
from qrm_nagios.watch import decide


@pytest.fixture
def settings() -> NagiosSettings:
    return NagiosSettings(manage=True)


def test_a_host_file_carries_parent_groups_and_the_ves_checks(settings) -> None:
    record = HostRecord(
        resource_id=7,
        label="vm7",
        mac="52:54:00:00:00:07",
        address="10.0.0.7",
        parent="hv1",
        ve="web",
        storage="nfs1",
        checks=("http:8080:/health", "tcp:5432", "ping", "ssh", "check_mysql:db1"),
    )
    out = render.render_host(settings, record)
    assert out.problems == []
    text = out.files["hosts/r7.cfg"]
    assert "    host_name                     vm7\n" in text
    assert "    parents                       hv1\n" in text
    assert "    hostgroups                    qrm-ve-web,qrm-storage-nfs1\n" in text
    commands = [line.split()[-1] for line in text.splitlines() if "check_command" in line]
    assert commands == ["qrm-ping", "qrm-http!8080!/health", "qrm-tcp!5432", "qrm-ssh!22", "check_mysql!db1"]
    assert out.hosts == {"vm7": "hosts/r7.cfg"}


def test_a_resource_without_a_name_is_its_mac(settings) -> None:
    record = HostRecord(resource_id=3, label="52:54:00:00:00:03", mac="52:54:00:00:00:03", address="10.0.0.3")
    text = render.render_host(settings, record).files["hosts/r3.cfg"]
    assert "host_name                     52:54:00:00:00:03\n" in text
    assert render.label_of(settings, "52:54:00:00:00:03") == ("resource", "52:54:00:00:00:03")
    assert render.label_of(settings, "storage:nfs1") == ("storage", "nfs1")
    assert render.label_of(settings, "qrm:server") == ("plugin", "nagios")
    assert render.label_of(settings, "localhost") == ("resource", "localhost")
    prefixed = NagiosSettings(manage=True, host_prefix="qrm-")
    assert render.label_of(prefixed, "localhost") is None
    assert render.host_name(prefixed, "node1") == "qrm-node1"


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("tcp", "needs a port"),
        ("tcp:99999", "not a port"),
        ("http:80:health", "use http"),
        ("ssh:22:x", "use ssh"),
        ("ping:1", "no arguments"),
        ("http:80;reboot", "allowed alphabet"),
        ("x!y", "allowed alphabet"),
    ],
)
def test_bad_checks_are_left_out_with_the_reason(settings, spec, why) -> None:
    record = HostRecord(
        resource_id=1, label="n1", mac="52:54:00:00:00:01", address="10.0.0.1", checks=(spec,)
    )
    out = render.render_host(settings, record)
    assert (
        len(out.problems) == 1 and why in out.problems[0] and "resource n1: check left out" in out.problems[0]
    )
    assert spec not in out.files["hosts/r1.cfg"]


@pytest.mark.parametrize(
    ("label", "address", "ve"),
    [
        ("evil\n}\ndefine command {", "10.0.0.1", None),
        ("a;b", "10.0.0.1", None),
        ("n1", "10.0.0.1 ; x", None),
        ("n1", "$(reboot)", None),
        ("n1", "10.0.0.1", "web}\ndefine host{"),
        ("n1", "10.0.0.1", "web;x"),
    ],
)
def test_names_that_would_break_a_definition_are_never_rendered(settings, label, address, ve) -> None:
    record = HostRecord(resource_id=1, label=label, mac="52:54:00:00:00:01", address=address, ve=ve)
    out = render.render_host(settings, record)
    assert out.files == {} and len(out.problems) == 1 and "is not monitored" in out.problems[0]


def test_storage_servers_get_their_protocol_checks(settings) -> None:
    nfs = render.render_storage(settings, StorageRecord(4, "nfs1", "nfs", "10.0.0.2"))
    iscsi = render.render_storage(settings, StorageRecord(5, "tgt", "iscsi", "san.example.org"))
    other = render.render_storage(settings, StorageRecord(6, "demo", "fake", "10.0.0.3"))
    assert "qrm-tcp!2049" in nfs.files["storage/s4.cfg"] and "storage:nfs1" in nfs.hosts
    assert (
        "qrm-tcp!3260" in iscsi.files["storage/s5.cfg"] and "san.example.org" in iscsi.files["storage/s5.cfg"]
    )
    assert "qrm-tcp" not in other.files["storage/s6.cfg"]
    bad = render.render_storage(settings, StorageRecord(7, "x", "nfs", "not an address"))
    assert bad.files == {} and "neither an IP address nor a DNS name" in bad.problems[0]


def test_the_last_guard_refuses_what_slipped_through() -> None:
    with pytest.raises(RenderProblem):
        render._line("alias", "x\ny")
    with pytest.raises(RenderProblem):
        render._line("check_command", "qrm-tcp!22;x")
    with pytest.raises(RenderProblem):
        render._line("address", "$HOSTNAME$")
    assert render._line("check_command", "qrm-tcp!22").strip() == "check_command                 qrm-tcp!22"


def test_intervals_follow_the_interval_length(settings) -> None:
    seconds = NagiosSettings(manage=True, check_interval=120, retry_interval=30)
    assert "check_interval                120\n" in render.render_base(seconds, 1)
    assert "check_interval                2\n" in render.render_base(seconds, 60)
    assert "retry_interval                0.5\n" in render.render_base(seconds, 60)


@pytest.mark.parametrize(
    ("env", "text"),
    [
        ({"QRM_NAGIOS_HOST_PREFIX": "a b"}, "QRM_NAGIOS_HOST_PREFIX"),
        ({"QRM_NAGIOS_NETNS": "x;y"}, "QRM_NAGIOS_NETNS"),
        ({"QRM_NAGIOS_PING_WARNING": "100"}, "QRM_NAGIOS_PING_WARNING"),
        ({"QRM_NAGIOS_CONTACTS": "admins,bad name"}, "QRM_NAGIOS_CONTACTS"),
        ({"QRM_NAGIOS_STATE_DIR": "/tmp/a;b"}, "QRM_NAGIOS_STATE_DIR"),
        ({"QRM_NAGIOS_HOST_URL": "javascript:alert(1)"}, "QRM_NAGIOS_HOST_URL"),
        ({"QRM_NAGIOS_MANAGE": "true", "QRM_NAGIOS_MAIN_CONFIG": "/etc/nagios4/nagios.cfg"}, "not both"),
        ({"QRM_NAGIOS_AGENT_REFRESH": "100", "QRM_NAGIOS_AGENT_FRESHNESS": "150"}, "twice"),
    ],
)
def test_bad_settings_are_one_line(monkeypatch, env, text) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(InvalidInput) as info:
        load_settings()
    assert text in info.value.message and "\n" not in info.value.message


STATUS = b"""info {
\tcreated=1700000100
\tversion=4.4.6
\t}

programstatus {
\tnagios_pid=4242
\tprogram_start=1700000000
\t}

hoststatus {
\thost_name=web1
\thas_been_checked=1
\tcurrent_state=1
\tplugin_output=PING CRITICAL - Packet loss = 100%
\tlast_check=1700000090
\tcurrent_attempt=2
\tmax_attempts=3
\tstate_type=0
\tlast_state_change=1700000080
\tlast_hard_state_change=1700000000
\tis_flapping=0
\t}

hoststatus {
\thost_name=web2
\thas_been_checked=0
\tcurrent_state=0
\tplugin_output=
\t}

servicestatus {
\thost_name=web1
\tservice_description=agent
\thas_been_checked=1
\tcurrent_state=2
\tplugin_output=CRITICAL - no heartbeat for 40 s; current_state=0
\tstate_type=1
\t}

contactstatus {
\tcontact_name=qrm-nobody
\t}
"""


def test_status_parsing_keeps_what_qrm_uses() -> None:
    parsed = status.parse(STATUS)
    assert (parsed.created, parsed.pid, parsed.program_start) == (1700000100, 4242, 1700000000)
    web1 = parsed.hosts["web1"]
    assert (web1.state_name, web1.hard, web1.attempt, web1.max_attempts, web1.kind) == (
        "DOWN",
        False,
        2,
        3,
        "soft 2/3",
    )
    assert web1.output == "PING CRITICAL - Packet loss = 100%"
    agent = web1.services["agent"]
    assert (agent.state_name, agent.hard) == ("CRITICAL", True)
    assert agent.output == "CRITICAL - no heartbeat for 40 s; current_state=0"
    assert parsed.hosts["web2"].state_name == "PENDING"
    only = status.parse(STATUS, only="web2")
    assert list(only.hosts) == ["web2"] and only.hosts["web2"].services == {}


def test_failover_waits_for_a_hard_state_and_never_follows_flapping() -> None:
    host = status.HostStatus(name="web1", state=1, hard=False, attempt=2, max_attempts=3, checked=True)
    assert decide(host).fail is False and "soft (2/3)" in decide(host).why
    host.hard = True
    host.attempt = 3
    host.output = "PING CRITICAL"
    assert decide(host).fail is True and decide(host).why == "host DOWN (hard, 3/3): PING CRITICAL"
    host.flapping = True
    assert decide(host).fail is False and "flapping" in decide(host).why
    host.flapping = False
    host.state = 2
    assert decide(host).fail is False and "UNREACHABLE" in decide(host).why
