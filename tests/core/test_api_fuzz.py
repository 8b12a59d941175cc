"""Schemathesis over the running server's own OpenAPI document, every operation,
every check: whatever a client sends, the server never fails (no 5xx), answers
only the status codes the document declares, with bodies and headers the
document describes, accepts every request the document allows and refuses
those it does not; a method a path does not have is a 405 with ``Allow``.

Bounded and deterministic: a fixed seed, a fixed number of cases per operation,
one worker (about two minutes on two cores)."""

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qrm_core.config import Settings, reset_settings_cache
from qrm_core.testing import missing, running_server
from qrm_core.testkit import Netns, stop_process

#: Cases per operation and phase (about N minutes on two cores).
EXAMPLES = 3

#: A rule between fields that JSON Schema cannot state is written in the
#: operation's description, and only the check that the server accepts every
#: request the schema allows is left out there.
CROSS_FIELD_RULES = [
    ("/api/v1/partitions", "POST"),  # max_cpus >= cpus, max_memory_mb >= memory_mb
    ("/api/v1/filesystem-images/capture", "POST"),  # identity or password, one of the two
    ("/api/v1/filesystem-images/{name}/capture", "POST"),  # identity or password, one of the two
]

CONFIG = """
seed = 20261205
workers = 1
max-failures = 50
color = false
generation.max-examples = {examples}
generation.database = "none"
phases.examples.enabled = true
phases.coverage.enabled = true
phases.fuzzing.enabled = true
phases.stateful.enabled = false

[auth.openapi.basicAuth]
username = "qrm"
password = "qrm"

[auth.openapi.enrollmentToken]
bearer = "{enrollment}"

# Changing the password of the user the run acts as would lock the run out;
# tests/core/test_api.py and test_logins.py test this operation.
[[operations]]
include-path = "/api/v1/users/{{name}}/password"
enabled = false
{cross_field}
"""


@pytest.mark.slow
@pytest.mark.qrm_backends("sqlite")
def test_the_api_does_what_its_openapi_document_says(
    qrm_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is part of qrm-core[test]"
    if os.geteuid() != 0:
        missing(
            "root",
            "the run is kept in a network namespace of its own (a storage check or a capture "
            "with a generated address must reach nothing)",
        )
    # Wrong credentials are part of the run (the ignored_auth check): no
    # throttling of the run's own address (tests/core/test_logins.py tests it).
    monkeypatch.setenv("QRM_LOGIN_USER_FAILURES", "100000")
    monkeypatch.setenv("QRM_LOGIN_ADDRESS_FAILURES", "100000")
    reset_settings_cache()
    netns = Netns("fz")
    try:
        with contextlib.ExitStack() as stack:
            # The server's threads are started inside the namespace and stay there.
            server = netns.inside(lambda: stack.enter_context(running_server(Settings())))
            config = tmp_path / "schemathesis.toml"
            config.write_text(
                CONFIG.format(
                    examples=EXAMPLES,
                    enrollment=server.enrollment_token(),
                    cross_field="".join(
                        f'\n[[operations]]\ninclude-path = "{path}"\ninclude-method = "{method}"\n'
                        "checks.positive_data_acceptance.enabled = false\n"
                        for path, method in CROSS_FIELD_RULES
                    ),
                )
            )
            proc = netns.popen(
                [st, "--config-file", str(config), "run", f"{server.url}/openapi.json"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=tmp_path,
            )
            try:
                output, _ = proc.communicate(timeout=900)
            finally:
                stop_process(proc)
    finally:
        netns.delete()
    summary = output[-8000:]
    assert proc.returncode == 0, summary
    assert "Server error" not in output
    assert "Selected: " in output and "Tested: " in output, summary
