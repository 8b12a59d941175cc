"""docs/hooks.md documents every hook exactly as qrm_core.hookspecs declares it.

The signature is rendered from the specification with ``inspect.signature``;
because hookspecs.py uses ``from __future__ import annotations``, annotations
are the strings written in the source, which are printed without quotes:
``qrm_resource_added(resource: ResourcePublic, ctx: HookContext) -> None``.
Adding, renaming or changing a hook without changing docs/hooks.md fails here,
and so does a section for a hook that no longer exists.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pluggy
import pytest

from qrm_core import hookspecs

DOC = Path(__file__).resolve().parents[2] / "docs" / "hooks.md"


def render(function: object) -> str:
    """``name(arg: Type, ...) -> Return`` as written in the source."""
    signature = inspect.signature(function)  # type: ignore[arg-type]

    def text(annotation: object) -> str:
        return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)

    params = ", ".join(
        p.name if p.annotation is inspect.Parameter.empty else f"{p.name}: {text(p.annotation)}"
        for p in signature.parameters.values()
    )
    result = (
        ""
        if signature.return_annotation is inspect.Signature.empty
        else f" -> {text(signature.return_annotation)}"
    )
    return f"{function.__name__}({params}){result}"  # type: ignore[attr-defined]


def kind(caller: pluggy.HookCaller) -> str:
    """How results combine, derived from the specification (see hookspecs' module docstring)."""
    assert caller.spec is not None
    if caller.spec.opts.get("historic"):
        return "historic"
    if caller.spec.opts.get("firstresult"):
        return "first result"
    if str(inspect.signature(caller.spec.function).return_annotation).startswith("list["):
        return "collecting"
    if caller.name.startswith("qrm_register_"):
        return "registration"
    return "event"


def hook_callers() -> list[pluggy.HookCaller]:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    callers = [getattr(pm.hook, name) for name in dir(pm.hook) if name.startswith("qrm_")]
    assert len(callers) > 20, "the hook specifications were not found"
    return sorted(callers, key=lambda c: c.name)


def sections() -> dict[str, str]:
    """Text of each ``### `qrm_...` `` section of the document, by hook name."""
    text = DOC.read_text(encoding="utf-8")
    parts = re.split(r"^### `(qrm_\w+)`\s*$", text, flags=re.M)
    found: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        assert name not in found, f"docs/hooks.md has two sections for {name}"
        found[name] = body.split("\n## ", 1)[0]
    return found


CALLERS = hook_callers()


@pytest.mark.parametrize("caller", CALLERS, ids=[c.name for c in CALLERS])
def test_every_hook_is_documented_with_its_signature_and_kind(caller: pluggy.HookCaller) -> None:
    assert caller.spec is not None
    documented = sections()
    assert caller.name in documented, f"docs/hooks.md has no section '### `{caller.name}`'"
    body = documented[caller.name]
    signature = render(caller.spec.function)
    assert signature in body, f"docs/hooks.md, section {caller.name}: the signature must read\n{signature}"
    assert f"**Kind:** {kind(caller)}" in body, (
        f"docs/hooks.md, section {caller.name}: say '**Kind:** {kind(caller)}' (how results combine)"
    )
    assert "@hookimpl" in body, f"docs/hooks.md, section {caller.name}: give an example implementation"


def test_no_section_documents_a_hook_that_does_not_exist() -> None:
    stale = sorted(set(sections()) - {c.name for c in CALLERS})
    assert not stale, f"docs/hooks.md documents hooks that are not specified: {stale}"


def test_the_check_notices_a_changed_signature() -> None:
    def qrm_resource_added(resource: ResourcePublic, ctx: HookContext, extra: int) -> None:  # noqa: F821
        """A changed hook."""

    assert render(qrm_resource_added) not in sections()["qrm_resource_added"]


@pytest.mark.parametrize("caller", CALLERS, ids=[c.name for c in CALLERS])
def test_every_example_is_a_valid_implementation(caller: pluggy.HookCaller) -> None:
    """The example code runs and pluggy accepts it as an implementation of that hook."""
    import types

    blocks = re.findall(r"```python\n(.*?)```", sections()[caller.name], flags=re.S)
    examples = [b for b in blocks if "@hookimpl" in b]
    assert examples, f"docs/hooks.md, section {caller.name}: no example"
    for number, source in enumerate(examples):
        module = types.ModuleType(f"hooks_md_{caller.name}_{number}")
        exec(compile(source, f"docs/hooks.md ({caller.name})", "exec"), module.__dict__)
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        pm.register(module)  # raises if an argument name is not in the specification
        implemented = [c.name for c in pm.get_hookcallers(module) or []]
        assert implemented == [caller.name], f"the example of {caller.name} implements {implemented}"
