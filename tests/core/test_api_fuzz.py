"""Schemathesis against the running server's own OpenAPI document: whatever a
client sends, the answer is never a 5xx (validation errors are 4xx)."""

import base64
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.qrm_backends("sqlite")
def test_no_request_makes_the_server_fail(qrm_server, tmp_path: Path) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is part of qrm-core[test]"
    auth = base64.b64encode(b"qrm:qrm").decode()
    result = subprocess.run(
        [
            st,
            "run",
            f"{qrm_server.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--header",
            f"Authorization: Basic {auth}",
            "--phases",
            "fuzzing",
            "--max-examples",
            "4",
            "--seed",
            "20261124",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Server error" not in result.stdout
