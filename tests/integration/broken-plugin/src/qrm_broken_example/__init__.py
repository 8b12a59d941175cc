"""A qrm plugin that cannot load, for the integration tests (see README.md)."""
