"""An existing Nagios that qrm drives: its own nagios.cfg and objects, qrm's
directory included by one ``cfg_dir`` line, reloads through its command pipe."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from nagioslab import Lab, blocks, hosts_in_status, wait_for

import qrm_nagios.plugin
from qrm_core.errors import InvalidInput
from qrm_core.services import agent, service_context
from qrm_core.testkit import stop_process
from qrm_nagios import control, sync
from qrm_nagios.service import NagiosService, _kill_leftovers
from qrm_nagios.settings import load_settings

ADMIN_OBJECTS = """define timeperiod {
    timeperiod_name always
    alias always
    monday 00:00-24:00
}
define command {
    command_name admin-true
    command_line /bin/true
}
define contact {
    contact_name admin
    host_notification_period always
    service_notification_period always
    host_notification_options n
    service_notification_options n
    host_notification_commands admin-true
    service_notification_commands admin-true
}
define host {
    host_name admin-box
    address 127.0.0.1
    check_command admin-true
    max_check_attempts 1
    check_period always
    contacts admin
}
define service {
    host_name admin-box
    service_description admin-service
    check_command admin-true
    max_check_attempts 1
    check_interval 60
    retry_interval 60
    check_period always
    contacts admin
}
"""


@pytest.fixture
def existing(short_dir: Path, lab: Lab, monkeypatch, qrm_settings) -> Iterator[dict[str, Path]]:
    """An administrator's Nagios (interval_length 60, its own objects), run by the test in ``mon``."""
    etc, var = short_dir / "etc", short_dir / "var"
    for directory in (etc / "conf.d", var / "rw", var / "spool", var / "tmp"):
        directory.mkdir(parents=True)
    qrm_objects = short_dir / "qrm-objects"
    (etc / "conf.d" / "admin.cfg").write_text(ADMIN_OBJECTS)
    main = etc / "nagios.cfg"
    main.write_text(
        "\n".join(
            [
                f"log_file={var / 'nagios.log'}",
                "cfg_dir=conf.d",  # relative, as Nagios allows
                f"cfg_dir={qrm_objects}",
                f"object_cache_file={var / 'objects.cache'}",
                f"status_file={var / 'status.dat'}",
                "status_update_interval=1",
                "nagios_user=root",
                "nagios_group=root",
                "check_external_commands=1",
                f"command_file={var / 'rw' / 'nagios.cmd'}",
                f"query_socket={var / 'rw' / 'nagios.qh'}",
                f"lock_file={var / 'nagios.lock'}",
                f"temp_file={var / 'nagios.tmp'}",
                f"temp_path={var / 'tmp'}",
                f"check_result_path={var / 'spool'}",
                "execute_host_checks=0",
                "execute_service_checks=0",
                "use_syslog=0",
                "check_for_updates=0",
                "enable_notifications=0",
            ]
        )
        + "\n"
    )
    qrm_objects.mkdir()
    for key, value in {
        "QRM_NAGIOS_MAIN_CONFIG": str(main),
        "QRM_NAGIOS_OBJECT_DIR": str(qrm_objects),
        "QRM_NAGIOS_STATE_DIR": str(short_dir / "qrm-state"),
        "QRM_NAGIOS_HOST_PREFIX": "qrm-",
        "QRM_NAGIOS_POLL_INTERVAL": "0.3",
        "QRM_NAGIOS_RESYNC_INTERVAL": "0",
    }.items():
        monkeypatch.setenv(key, value)
    # Nagios refuses to start without a service; qrm's directory is empty until the first sync.
    out = open(short_dir / "nagios.out", "wb")
    proc = lab.mon.popen(["nagios4", str(main)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("the existing Nagios", lambda: control.reader_present(var / "rw" / "nagios.cmd"), 30)
        yield {
            "main": main,
            "objects": qrm_objects,
            "status": var / "status.dat",
            "cache": var / "objects.cache",
        }
    finally:
        stop_process(proc)
        _kill_leftovers(proc.pid)
        out.close()


def test_qrm_keeps_an_existing_nagios_in_step(existing, lab, qrm_settings, qrm_plugins) -> None:
    assert qrm_plugins.register(qrm_nagios.plugin, "nagios")
    service = NagiosService(load_settings(), qrm_settings)
    service.start()
    try:
        assert service.process is None  # not qrm's to run
        with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
            agent.register(
                ctx, mac="52:54:00:12:00:01", ip=lab.address(), hostname="node1", cpus=1, memory_mb=512
            )
        wait_for("the worker", service.idle)
        cache = existing["cache"]
        hosts = wait_for(
            "qrm's host beside the administrator's",
            lambda: (h := {b["host_name"]: b for b in blocks(cache, "host")}) and "qrm-node1" in h and h,
        )
        assert set(hosts) == {"admin-box", "qrm-node1"}  # no qrm server host in an existing Nagios
        assert "qrm-node1" in hosts_in_status(existing["status"])
        # Intervals in the existing Nagios's units (interval_length 60): 60 s -> 1.
        assert hosts["qrm-node1"]["check_interval"] == "1.000000"
        assert (existing["objects"] / "qrm-base.cfg").exists()
    finally:
        service.stop()
    # Without qrm's cfg_dir line, qrm says what to add, in one line, and changes nothing.
    main = existing["main"]
    main.write_text(
        "\n".join(line for line in main.read_text().splitlines() if "qrm-objects" not in line) + "\n"
    )
    before = sorted(p.name for p in existing["objects"].rglob("*.cfg"))
    with pytest.raises(InvalidInput) as info:
        sync.full_sync(load_settings(), qrm_settings)
    assert (
        info.value.message
        == f"{main} does not read qrm's objects: add the line cfg_dir={existing['objects']} to it"
    )
    assert sorted(p.name for p in existing["objects"].rglob("*.cfg")) == before
