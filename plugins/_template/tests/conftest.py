"""Core's fixtures: real databases (SQLite, PostgreSQL, MariaDB), the real plugin system, ``qrm`` in-process."""

pytest_plugins = ["qrm_core.testing"]
