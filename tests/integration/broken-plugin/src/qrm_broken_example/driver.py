"""Storage driver module that fails at import, like a driver whose SDK is not installed."""

import qrm_broken_example_missing_sdk  # noqa: F401 - the point: this module does not exist

from qrm_core.drivers.fake import FakeStorage


class BrokenStorage(FakeStorage):  # never reached
    name = "broken"
