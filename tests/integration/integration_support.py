"""Constants and helpers shared by the integration tests (fixtures are in conftest.py)."""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: The distribution that is broken on purpose (tests/integration/broken-plugin).
BROKEN_DISTRIBUTION = "qrm-broken-example"
BROKEN_PLUGIN = "broken-example"
BROKEN_DRIVER = "broken"
EXAMPLE_DISTRIBUTION = "qrm-example"


def installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter of this environment (a fresh process: nothing imported yet)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def run_qrm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the installed ``qrm`` command as a user would, in a new process."""
    qrm = Path(sys.executable).with_name("qrm")
    command = (
        [str(qrm)] if qrm.exists() else [sys.executable, "-c", "from qrm_core.cli.main import run; run()"]
    )
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, check=False)
