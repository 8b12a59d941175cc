"""Schemathesis over the running server's own OpenAPI document, every operation,
every check: whatever a client sends, the server never fails (no 5xx), answers
only the status codes the document declares, with bodies and headers the
document describes, accepts every request the document allows and refuses
those it does not; a method a path does not have is a 405 with ``Allow``.

Bounded and deterministic: a fixed seed, a fixed number of cases per operation,
one worker (about a minute on two cores); the run is
:func:`qrm_core.testing.fuzz_api`, which tests/integration/test_api_fuzz_plugins.py
runs with every plugin installed."""

from pathlib import Path

import pytest

from qrm_core.testing import fuzz_api


@pytest.mark.slow
@pytest.mark.qrm_backends("sqlite")
def test_the_api_does_what_its_openapi_document_says(
    qrm_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = fuzz_api(tmp_path, monkeypatch)
    assert any(path.startswith("/api/v1/") for path in run.document["paths"])
