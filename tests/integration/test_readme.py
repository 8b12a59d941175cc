"""The README's shell blocks, run as written, in order, against a real server.

Every fenced ``sh`` block of README.md runs, one after the other in one bash
(as a reader types them into one terminal: variables and the background
``qrm lab simulate`` carry over), with ``set -e``: a command that fails fails
the test. A block preceded by ``<!-- readme-test: skip (REASON) -->`` is not
run; the test names each skipped block and its reason, and fails if a skip
gives none. Today two are skipped: the Quick start (``scripts/run.sh``, tested
by test_quickstart.py, and the whole test suite) and the lab (root and QEMU,
tested by test_lab_e2e.py).

The server is what ``scripts/run.sh`` starts, ``qrm init`` then ``qrm server
--host 127.0.0.1``, with this environment's installation, a private data
directory on SQLite and a free port. What the test changes, and why:

* the blocks run in a scratch directory whose ``.venv`` is this interpreter's
  environment, so ``source .venv/bin/activate`` activates the qrm under test;
* ``127.0.0.1:8080`` in the blocks becomes the server's real port, and
  ``QRM_SERVER_URL`` tells ``qrm lab simulate`` (whose default is port 8080)
  the same;
* the Debian kernel package ``qrm boot-image create --download`` fetches is
  put into the data directory's cache first when the boot image tests have
  already downloaded it (``~/.cache/qrm-test/kernel``), and kept there after
  this test downloaded it: the command is the same, the download happens once.

Everything started is stopped by PID (the server) and by the process group of
the bash that ran the blocks (the simulated agents it put in the background).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from qrm_core.testkit import free_port

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*(?:\((?P<reason>[^)]*)\))?\s*-->")
FENCE = re.compile(r"^```(?P<lang>\S*)\n(?P<body>.*?)^```$", re.M | re.S)
PASSWORD = "Tulip-Harbor-Kettle-47"


def readme_blocks(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(blocks to run, [(first line, reason) of skipped blocks]) of the README's ``sh`` blocks."""
    run: list[str] = []
    skipped: list[tuple[str, str]] = []
    for match in FENCE.finditer(text):
        if match.group("lang") != "sh":
            continue
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
        marker = SKIP.fullmatch(before.strip())
        body = match.group("body")
        if marker:
            reason = (marker.group("reason") or "").strip()
            assert reason, f"README block skipped without a reason: {body.splitlines()[0]!r}"
            skipped.append((body.splitlines()[0], reason))
        else:
            run.append(body)
    return run, skipped


def test_blocks_are_found_and_every_skip_says_why() -> None:
    run, skipped = readme_blocks(README.read_text())
    assert any("qrm boot-image create" in block for block in run)
    assert any("qrm lab simulate" in block for block in run)
    assert [first for first, _ in skipped] == [
        "bash scripts/run.sh     # set up qrm in .venv, create its database (SQLite) and run `qrm server` on 127.0.0.1:8080",
        "sudo qrm lab up --vms 2",
    ], skipped
    print("skipped README blocks:", *(f"{first!r}: {reason}" for first, reason in skipped), sep="\n  ")


def _kernel_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qrm-test" / "kernel"  # the boot image tests' cache (tests/core/bootimage/conftest.py)


def _stop(proc: subprocess.Popen[bytes], group: bool) -> None:
    if proc.poll() is None:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait(10)
    elif group:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # what the blocks left in the background
        except ProcessLookupError:
            pass


def test_readme_walk_through_runs_as_written(tmp_path: Path) -> None:
    if shutil.which("apt-cache") is None or shutil.which("dpkg") is None:
        pytest.skip("the walk-through builds a boot image from a Debian kernel: run it on Debian")
    bindir = Path(sys.executable).parent
    qrm = bindir / "qrm"
    assert qrm.exists(), f"qrm is not installed beside {sys.executable}"
    work = tmp_path / "work"
    work.mkdir()
    venv = work / ".venv"
    if (Path(sys.prefix) / "bin" / "activate").exists():
        venv.symlink_to(sys.prefix)
    else:  # an environment without an activate script: one that does what activate does
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "activate").write_text(f'export PATH="{bindir}:$PATH"\n')
    data = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QRM_") or k.startswith("QRM_TEST_")}
    env.pop("VIRTUAL_ENV", None)
    env["QRM_DATA_DIR"] = str(data)
    env["QRM_SERVER_URL"] = url

    # What scripts/run.sh does once its .venv is set up.
    init = subprocess.run([str(qrm), "init"], env=env, capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, init.stderr
    cache = _kernel_cache()
    kernels = data / "cache" / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    for deb in sorted(cache.glob("linux-image-*.deb")) if cache.is_dir() else []:
        os.link(deb, kernels / deb.name) if deb.stat().st_dev == kernels.stat().st_dev else shutil.copy(
            deb, kernels
        )
    server_log = tmp_path / "server.log"
    with open(server_log, "wb") as out:
        server = subprocess.Popen(
            [str(qrm), "server", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    script_log = tmp_path / "readme.log"
    walk: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"qrm server ended:\n{server_log.read_text()[-3000:]}"
            try:
                if httpx.get(url + "/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (
                f"qrm server did not answer:\n{server_log.read_text()[-3000:]}"
            )
            time.sleep(0.3)

        blocks, _ = readme_blocks(README.read_text())
        script = "set -e -o pipefail\nset -x\n" + "\n".join(
            block.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for block in blocks
        )
        (tmp_path / "readme.sh").write_text(script)
        with open(script_log, "wb") as out:
            walk = subprocess.Popen(
                ["bash", str(tmp_path / "readme.sh")],
                cwd=work,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            code = walk.wait(900)
        except subprocess.TimeoutExpired:
            code = None
        log = script_log.read_text(errors="replace")
        assert code == 0, f"the README's walk-through failed ({code}):\n{log[-5000:]}"

        # What the blocks did, seen through the API with the password the walk-through set.
        auth = ("qrm", PASSWORD)
        image = httpx.get(url + "/api/v1/boot-images/qrm", auth=auth, timeout=30).json()
        assert image["kernel_sha256"] and image["initrd_sha256"], image
        assert httpx.get(url + "/api/v1/ves/web", auth=auth, timeout=30).json()["pool_size"] == 3
        assert httpx.get(url + "/api/v1/ves/demo", auth=auth, timeout=30).json()["state"] == "stopped"
        partitions = httpx.get(url + "/api/v1/partitions", auth=auth, timeout=30).json()
        partitions = partitions["items"] if isinstance(partitions, dict) else partitions
        assert [(p["name"], p["cpus"], p["memory_mb"], p["cpu_pinning"]) for p in partitions] == [
            ("hv1-1", 1, 512, "0:2,3")
        ], partitions
        assert httpx.get(url + "/api/v1/resources", auth=("qrm", "qrm"), timeout=30).status_code == 401
        assert "virtual environment demo is running" in log
        assert "Traceback" not in log, log[-5000:]
    finally:
        if walk is not None:
            _stop(walk, group=True)
        _stop(server, group=False)
        cache.mkdir(parents=True, exist_ok=True)
        for deb in kernels.glob("linux-image-*.deb"):
            if not (cache / deb.name).exists():
                shutil.copy(deb, cache)  # for the next run and the boot image tests
    assert "Traceback" not in server_log.read_text(errors="replace"), server_log.read_text()[-5000:]
