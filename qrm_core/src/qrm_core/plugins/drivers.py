"""The driver factory: loads exactly the named driver with stevedore, once per process."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from stevedore import DriverManager

from qrm_core.drivers.base import BaseDriver
from qrm_core.errors import DriverLoadError, DriverNotFound, PluginError
from qrm_core.plugins.discovery import DRIVER_GROUPS, KIND_BY_GROUP, EntryPointRecord

if TYPE_CHECKING:
    from qrm_core.config import Settings


class DriverFactory:
    """Builds drivers by group and name from the records discovery found.

    ``names(group)`` says which names may be used (installed, enabled, not
    broken, allowed by the settings); a name outside it gets an error that
    says why (unknown, disabled and by which plugin, broken).
    """

    def __init__(
        self,
        settings: Settings,
        records: dict[tuple[str, str], EntryPointRecord],
        names: Callable[[str], list[str]],
    ) -> None:
        self.settings = settings
        self.records = records
        self._names = names
        self._drivers: dict[tuple[str, str], BaseDriver] = {}
        self._given: dict[tuple[str, str], BaseDriver] = {}  # instances handed in with put()
        self._lock = threading.Lock()

    def reset(self, settings: Settings) -> None:
        """Forget built drivers; the next use builds them with ``settings``."""
        with self._lock:
            self.settings = settings
            self._drivers = dict(self._given)

    def put(self, group: str, driver: BaseDriver) -> None:
        """Use ``driver`` as the driver named ``driver.name`` of ``group``."""
        with self._lock:
            self._given[(group, driver.name)] = driver
            self._drivers[(group, driver.name)] = driver

    def get(self, group: str, name: str) -> BaseDriver:
        """The enabled driver ``name`` of ``group`` (case-insensitive)."""
        key = name.lower()
        available = self._names(group)
        if key not in available:
            record = self.records.get((group, key))
            if record is not None and not record.enabled and record.disabled_by:
                raise PluginError(
                    f"{KIND_BY_GROUP[group]} driver {key!r} is disabled because plugin {record.disabled_by!r} "
                    f"is; enable it with 'qrm plugins enable {record.disabled_by}'",
                    name=key,
                )
            if record is not None and not record.enabled:
                raise PluginError(
                    f"{KIND_BY_GROUP[group]} driver {key!r} is disabled; "
                    f"enable it with 'qrm plugins enable {key}'",
                    name=key,
                )
            if record is not None and record.error:
                raise DriverLoadError(group, key, record.error)
            raise DriverNotFound(group, key, available)
        return self.build(group, key)

    def build(self, group: str, name: str) -> BaseDriver:
        """Load and instantiate a driver (cached), recording a failure on its record."""
        cache_key = (group, name)
        driver = self._drivers.get(cache_key)
        if driver is not None:
            return driver
        with self._lock:
            driver = self._drivers.get(cache_key)
            if driver is not None:
                return driver
            driver = self._load(group, name)
            self._drivers[cache_key] = driver
            return driver

    def _load(self, group: str, name: str) -> BaseDriver:
        failure: list[str] = []

        def on_failure(_manager: Any, ep: Any, exc: BaseException) -> None:
            failure.append(f"{type(exc).__name__}: {exc}")

        record = self.records.get((group, name))
        try:
            manager = DriverManager(
                namespace=group,
                name=name,
                invoke_on_load=True,
                invoke_args=(self.settings,),
                on_load_failure_callback=on_failure,
            )
        except Exception as exc:  # noqa: BLE001 - stevedore raises several kinds
            reason = failure[0] if failure else f"{type(exc).__name__}: {exc}"
            if record is not None:
                record.error = reason
            raise DriverLoadError(group, name, reason) from None
        loaded = manager.driver
        expected = DRIVER_GROUPS[group]
        if not isinstance(loaded, expected):
            reason = f"{type(loaded).__name__} is not a {expected.__name__}"
            if record is not None:
                record.error = reason
            raise DriverLoadError(group, name, reason)
        return loaded
