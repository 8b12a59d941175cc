"""Console forms: fields, the values typed, and errors next to the field.

The rules are the services'; a form only turns text into the types a
service takes (a number field that holds no number is refused here, as the
API refuses a string where an integer belongs) and puts the service's one-line
message next to the field it is about.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qrm_core.errors import DriverNotFound, QrmError

#: Fields whose value is never shown again (a form that comes back is empty there).
SECRET_KINDS = ("password", "secret")


@dataclass
class Field:
    name: str
    label: str
    kind: str = "text"  # text, number, select, checkbox, password, secret (a textarea), textarea, file
    required: bool = False
    options: list[tuple[str, str]] = field(default_factory=list)  # (value, label)
    help: str = ""
    placeholder: str = ""
    #: Words the services use for this field in their messages ("pool size").
    subjects: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None


class Form:
    def __init__(
        self,
        action: str,
        fields: list[Field],
        *,
        submit: str,
        values: Mapping[str, Any] | None = None,
        prefix: str = "",
    ):
        self.action = action
        #: Before the ids of its fields, for pages with several forms.
        self.prefix = prefix
        self.fields = fields
        self.submit = submit
        self.values: dict[str, Any] = dict(values or {})
        self.errors: dict[str, str] = {}
        self.general = ""
        self.multipart = any(f.kind == "file" for f in fields)

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)

    def read(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """The typed values of a posted form (errors for fields that are not of their type)."""
        typed: dict[str, Any] = {}
        for f in self.fields:
            raw = data.get(f.name)
            if f.kind == "checkbox":
                self.values[f.name] = raw is not None
                typed[f.name] = raw is not None
                continue
            if f.kind == "file":
                typed[f.name] = raw if raw is not None and bool(getattr(raw, "filename", None)) else None
                continue
            text = raw.strip() if isinstance(raw, str) else ""
            if f.kind not in SECRET_KINDS:
                self.values[f.name] = text
            if f.kind == "number":
                if text == "":
                    typed[f.name] = None
                else:
                    try:
                        typed[f.name] = int(text)
                    except ValueError:
                        self.errors[f.name] = f"{f.label}: {text!r} is not a whole number"
                        continue
            else:
                typed[f.name] = text if (text or f.kind in SECRET_KINDS) else None
                if f.kind in SECRET_KINDS:
                    typed[f.name] = raw if isinstance(raw, str) else ""
            if f.required and typed[f.name] in (None, ""):
                self.errors[f.name] = f"{f.label} is required"
        return typed

    @property
    def ok(self) -> bool:
        return not self.errors and not self.general

    def fail(self, exc: QrmError) -> None:
        """Put a service's error next to the field it is about (else above the form)."""
        message = exc.message
        if isinstance(exc, DriverNotFound):
            for f in self.fields:
                if f.kind == "select" and any(s in message for s in f.subjects):
                    self.errors[f.name] = message
                    return
        lowered = message.lower()
        best: tuple[int, str] | None = None
        for f in self.fields:
            for subject in f.subjects:
                at = lowered.find(subject.lower())
                if at >= 0 and (best is None or at < best[0]):
                    best = (at, f.name)
        if best is not None:
            self.errors[best[1]] = message
        else:
            self.general = message
