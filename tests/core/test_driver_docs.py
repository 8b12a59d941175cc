"""docs/drivers.md documents every method of every driver interface and every value type.

Each interface has a section ``## `StorageDriver` `` (and so on) that must
contain, for every public method of the class (abstract or overridable), its
signature without ``self`` as written in drivers/base.py, e.g.
``validate_location(storage: StorageTarget, location: str) -> None``. Each
value type (the frozen dataclasses drivers receive and return) must appear
with all its field names. Changing an interface without the page fails here.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from qrm_core.drivers import base

DOC = Path(__file__).resolve().parents[2] / "docs" / "drivers.md"
INTERFACES = [base.BaseDriver, base.StorageDriver, base.HypervisorDriver, base.PowerDriver]
VALUE_TYPES = sorted(
    (obj for obj in vars(base).values() if dataclasses.is_dataclass(obj) and isinstance(obj, type)),
    key=lambda t: t.__name__,
)


def render(name: str, function: object) -> str:
    """``name(arg: Type, flag: bool = False) -> None``: the signature without self, unquoted."""
    signature = inspect.signature(function)  # type: ignore[arg-type]
    params = [p for p in signature.parameters.values() if p.name != "self"]
    text = str(signature.replace(parameters=params))
    return name + re.sub(r"'([^']*)'", r"\1", text)


def public_methods(cls: type) -> dict[str, object]:
    """Methods a driver implements or may override (defined on this class, not inherited)."""
    return {
        name: member
        for name, member in vars(cls).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }


def section(title: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"^## `{title}`\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"docs/drivers.md has no section '## `{title}`'"
    return match.group(1)


@pytest.mark.parametrize("cls", INTERFACES, ids=[c.__name__ for c in INTERFACES])
def test_every_method_is_documented_with_its_signature(cls: type) -> None:
    body = section(cls.__name__)
    methods = public_methods(cls)
    abstract = set(getattr(cls, "__abstractmethods__", ()))
    assert abstract <= set(methods) | set(public_methods(base.BaseDriver)), "abstract method not found"
    missing = [render(n, f) for n, f in methods.items() if render(n, f) not in body]
    assert not missing, f"docs/drivers.md, section {cls.__name__}, lacks: {missing}"
    for name in abstract & set(methods):
        assert f"### `{name}`" in body, f"docs/drivers.md: no heading for {cls.__name__}.{name}"


@pytest.mark.parametrize("cls", INTERFACES[1:], ids=[c.__name__ for c in INTERFACES[1:]])
def test_the_page_says_which_methods_are_required_and_which_optional(cls: type) -> None:
    """Each method's text starts with Required., Optional. or Overridable., and says the truth."""
    body = section(cls.__name__)
    for name in public_methods(cls):
        match = re.search(rf"^### `{name}`\s*$.*?```\s*$\s*(\w+)\b", body, flags=re.M | re.S)
        assert match, f"docs/drivers.md: {cls.__name__}.{name} does not say Required, Optional or Overridable"
        said = match.group(1)
        if name in cls.__abstractmethods__:
            expected = "Required"
        elif name in cls.OPTIONAL_OPERATIONS:
            expected = "Optional"
        else:
            expected = "Overridable"
        assert said == expected, f"docs/drivers.md: {cls.__name__}.{name} is {expected}, the page says {said}"


@pytest.mark.parametrize("value_type", VALUE_TYPES, ids=[t.__name__ for t in VALUE_TYPES])
def test_every_value_type_is_documented_with_its_fields(value_type: type) -> None:
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"^### `{value_type.__name__}`\s*$(.*?)(?=^##)", text, flags=re.M | re.S)
    assert match, f"docs/drivers.md has no heading '### `{value_type.__name__}`'"
    fields = [f.name for f in dataclasses.fields(value_type)]
    missing = [f for f in fields if f"`{f}`" not in match.group(1)]
    assert not missing, f"docs/drivers.md, {value_type.__name__}: fields not described: {missing}"


def test_the_interfaces_found_are_the_real_ones() -> None:
    assert {"validate_server", "create_volume", "describe_root"} <= base.StorageDriver.__abstractmethods__
    assert {"create_partition", "destroy_partition"} <= base.HypervisorDriver.__abstractmethods__
    assert "migrate_partition" in base.HypervisorDriver.OPTIONAL_OPERATIONS
    assert {"power_off", "power_state"} <= base.PowerDriver.__abstractmethods__
    assert len(VALUE_TYPES) >= 8
