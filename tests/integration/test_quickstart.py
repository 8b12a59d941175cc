"""The README's first Quick start command, as a newcomer runs it:
``bash scripts/run.sh`` sets up ``.venv`` (core and every plugin), creates the
embedded SQLite database and serves qrm on 127.0.0.1. Run with a private data
directory and port; the server is stopped by the PID this test started."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from qrm_core.testkit import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_run_script_serves_qrm_on_the_sqlite_default(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRM_") or k.startswith("QRM_TEST_")}
    env.pop("VIRTUAL_ENV", None)
    env["QRM_DATA_DIR"] = str(tmp_path / "data")
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", "scripts/run.sh", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 600  # a fresh .venv installs core and every plugin first
        url = f"http://127.0.0.1:{port}"
        while True:
            assert proc.poll() is None, (
                f"scripts/run.sh ended ({proc.returncode}):\n{log.read_text()[-3000:]}"
            )
            try:
                if httpx.get(url + "/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"qrm server did not answer:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        # openQRM's default login works on a fresh install, and the database is SQLite in the data directory.
        answer = httpx.get(url + "/api/v1/resources", auth=("qrm", "qrm"), timeout=10)
        assert answer.status_code == 200 and answer.json()["items"] == []
        assert (tmp_path / "data" / "qrm.db").is_file()
        assert httpx.get(url + "/api/v1/resources", timeout=10).status_code == 401
        # Issue 15: a fresh install (default password, no provisioning address) serves
        # this machine only - TFTP included, which used to serve UDP 0.0.0.0:69.
        text = log.read_text()
        assert "serves this machine only" in text and "tftpd: serving on 127.0.0.1 only" in text
        listening = subprocess.run(["ss", "-H", "-lntup"], capture_output=True, text=True, check=True).stdout
        mine = [line.split() for line in listening.splitlines() if f"pid={proc.pid}," in line]
        assert mine, listening
        for fields in mine:
            host = fields[4].rsplit(":", 1)[0].strip("[]")
            assert host in ("127.0.0.1", "::1"), f"listens beyond loopback: {' '.join(fields)}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the session run.sh's exec'd server leads
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
