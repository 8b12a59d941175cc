"""``qrm --server URL`` starts without the database layer, the services or the plugins.

Through a server the CLI only speaks HTTP: importing SQLAlchemy, the ORM models,
the services and every plugin took about 1.8 s of each command's start (the
whole of a ``qrm partition migrate`` took 7.7 s, of which 5.5 s were libvirt's).
A fresh interpreter runs real commands through the real entry point against
an in-process HTTP answer (httpx's MockTransport: no socket) and reports what
it imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

RUN = r"""
import json, sys
import httpx

seen = []


def answer(request):
    seen.append(f"{request.method} {request.url.path}")
    return httpx.Response(200, json=json.loads(sys.argv[1]))


real_init = httpx.Client.__init__


def init(self, *args, **kwargs):
    kwargs["transport"] = httpx.MockTransport(answer)
    real_init(self, *args, **kwargs)


httpx.Client.__init__ = init
from qrm_core.cli.main import main

status = main(sys.argv[2:])
heavy = sorted(
    name
    for name in sys.modules
    if name.split(".")[0] in ("sqlalchemy", "sqlmodel", "alembic", "fastapi")
    or name.startswith(("qrm_core.services", "qrm_core.plugins", "qrm_core.engine"))
    or name in ("qrm_core.models", "qrm_core.db", "qrm_core.local_client")
)
sys.stderr.write("\nRESULT " + json.dumps({"status": status, "requests": seen, "heavy": heavy}) + "\n")
"""

PARTITION = {
    "id": 7,
    "name": "web-1",
    "host": "hv2",
    "hypervisor": "qemu",
    "cpus": 1,
    "memory_mb": 256,
    "cpu_pinning": "",
    "mac": "52:54:00:00:00:07",
    "state": "running",
    "resource_id": 3,
    "ve": None,
    "created_at": "2026-12-05T10:00:00",
}


def run(answer: Any, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRM_")}
    done = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(answer), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert "\nRESULT " in done.stderr, done.stderr
    return done, json.loads(done.stderr.rsplit("\nRESULT ", 1)[1])


def test_a_command_through_a_server_imports_no_database_layer() -> None:
    done, result = run(
        PARTITION, "--server", "http://qrm.test", "-u", "qrm", "-p", "pw",
        "partition", "migrate", "web-1", "--to", "hv2", "-o", "json",
    )  # fmt: skip
    assert result["status"] == 0, done.stderr
    assert result["requests"] == ["POST /api/v1/partitions/web-1/migrate"]
    assert json.loads(done.stdout) == PARTITION  # printed as before
    assert result["heavy"] == []


def test_a_table_through_a_server_prints_as_before() -> None:
    done, result = run([PARTITION], "--server=http://qrm.test", "--token", "t", "partition", "list")
    assert result["status"] == 0 and result["heavy"] == [], done.stderr
    assert done.stdout.splitlines() == [
        "NAME   HOST  HYPERVISOR  CPUS  MEMORY MB  CPU PINNING  MAC                STATE    VE",
        "web-1  hv2   qemu        1     256        -            52:54:00:00:00:07  running  -",
    ]


def test_help_through_a_server_still_lists_the_plugins_commands() -> None:
    done, result = run([], "--server", "http://qrm.test", "--help")
    assert result["status"] == 0, done.stderr
    assert "qrm_core.plugins" in result["heavy"]


@pytest.mark.parametrize(
    ("args", "core"),
    [
        (["partition", "list"], True),
        (["--server", "http://x", "-u", "a", "-p", "b", "resource", "show", "3"], True),
        (["-ua", "--token", "t", "events"], True),
        (["--server", "http://x", "vmware", "sync"], False),  # a plugin's
        (["--server", "http://x", "--help"], False),
        ([], False),
        (["--server", "http://x", "--", "partition"], False),
    ],
)
def test_which_commands_are_core_s(args: list[str], core: bool) -> None:
    from qrm_core.cli.main import core_command

    assert core_command(args) is core
