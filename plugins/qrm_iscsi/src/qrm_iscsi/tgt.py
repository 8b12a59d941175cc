"""tgt, the userspace iSCSI target: reading its state, writing the scripts that change it.

tgt keeps its targets in memory and is changed one ``tgtadm`` call at a time.
This module reads ``tgtadm --op show --mode target`` (one call gives every
target, LUN, account, ACL and session) and writes shell scripts of ``tgtadm``
calls that a :class:`~qrm_core.remote.Runner` runs on the storage server in
one go (``sh -s``: one round trip, however many changes). Each step of a
script reports its own outcome on a line of its own (``qrm-ok N`` /
``qrm-fail N MESSAGE``), so a batch tells which request failed and why.

Every value in a script is validated by the caller and quoted here; nothing
reaches ``tgtadm`` through a shell word it did not mean to be.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from qrm_core.plugin_api import shell_quote as quote

_TARGET = re.compile(r"^Target (\d+): (\S+)$")
_LUN = re.compile(r"^LUN: (\d+)$")
_NEXUS = re.compile(r"^I_T nexus: (\d+)$")


@dataclass
class Lun:
    number: int
    path: str = ""
    readonly: bool = False


@dataclass
class Session:
    """An initiator logged in to a target (an I_T nexus) and its connections."""

    sid: int
    initiator: str = ""
    connections: list[int] = field(default_factory=list)


@dataclass
class Target:
    tid: int
    name: str
    luns: dict[int, Lun] = field(default_factory=dict)
    accounts: list[str] = field(default_factory=list)
    acl: list[str] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)


def parse_targets(text: str) -> dict[str, Target]:
    """``tgtadm --op show --mode target`` as targets by name."""
    targets: dict[str, Target] = {}
    target: Target | None = None
    section = ""
    lun: Lun | None = None
    session: Session | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if match := _TARGET.match(raw):
            target = Target(int(match[1]), match[2])
            targets[target.name] = target
            section, lun, session = "", None, None
            continue
        if target is None:
            continue
        if line.endswith(" information:"):
            section = line.removesuffix(" information:")
            continue
        if section == "LUN":
            if match := _LUN.match(line):
                lun = Lun(int(match[1]))
                target.luns[lun.number] = lun
            elif lun is not None and line.startswith("Backing store path:"):
                path = line.split(":", 1)[1].strip()
                lun.path = "" if path == "None" else path
            elif lun is not None and line.startswith("Readonly:"):
                lun.readonly = line.split(":", 1)[1].strip() == "Yes"
        elif section == "Account":
            target.accounts.append(line)
        elif section == "ACL":
            target.acl.append(line)
        elif section == "I_T nexus":
            if match := _NEXUS.match(line):
                session = Session(int(match[1]))
                target.sessions.append(session)
            elif session is not None and line.startswith("Initiator:"):
                session.initiator = line.split(":", 1)[1].strip().split(" ")[0]
            elif session is not None and line.startswith("Connection:"):
                session.connections.append(int(line.split(":", 1)[1].strip()))
    return targets


def parse_accounts(text: str) -> set[str]:
    """``tgtadm --op show --mode account``: the account names."""
    return {line.strip() for line in text.splitlines()[1:] if line.strip()}


class Raw(str):
    """A word put into a script as it is: a shell variable the script itself set (``$tid``)."""


SKIPPED = "qrm-skipped"


class Script:
    """A shell script of steps whose outcomes the caller reads back.

    A step is a list of commands run in order in the script's own shell (so a
    variable one sets, like a new target's id, is there for the next), stopping
    at the first failure. It prints ``qrm-ok KEY``, or ``qrm-fail KEY
    <what the failing command said>`` and runs its ``undo`` commands, or
    ``qrm-skip KEY`` when a step it ``requires`` did not succeed.
    """

    def __init__(self, control_port: int, lock: str | None) -> None:
        self.control_port = control_port
        self.requires: dict[str, list[str]] = {}
        self._vars: dict[str, str] = {}
        self.lines = ["set -u", "export LC_ALL=C", "out=$(mktemp) || exit 1", "trap 'rm -f \"$out\"' EXIT"]
        if lock is not None:
            # One change at a time per storage server (several qrm processes, the CLI).
            self.lines += [
                f"mkdir -p {quote(lock.rsplit('/', 1)[0])} 2>/dev/null",
                f"exec 9>>{quote(lock)} || {{ echo 'qrm-fail * cannot open the lock file {lock}'; exit 0; }}",
                "flock -w 60 9 || { echo 'qrm-fail * cannot lock the storage server (flock)'; exit 0; }",
            ]

    def tgtadm(self, *args: str | int) -> str:
        """One tgtadm call as a shell command."""
        words = [a if isinstance(a, Raw) else quote(a) for a in args]
        return f"tgtadm -C {self.control_port} --lld iscsi " + " ".join(words)

    def _var(self, key: str) -> str:
        if key not in self._vars:
            self._vars[key] = f"ok_{len(self._vars)}"
        return self._vars[key]

    def step(
        self,
        key: str,
        commands: list[str],
        *,
        requires: list[str] | tuple[str, ...] = (),
        undo: list[str] | tuple[str, ...] = (),
    ) -> None:
        var = self._var(key)
        self.requires[key] = list(requires)
        condition = " && ".join(f'[ "${self._var(r)}" = 1 ]' for r in requires) or "true"
        # Each command grouped: "a || b" inside one command must not swallow the chain.
        body = " && ".join(f"{{ {c}; }}" for c in commands) if commands else "true"
        undo_text = "; ".join(undo) + ";" if undo else ""
        self.lines += [
            f"{var}=0",
            f"if {condition}; then",
            f'  if {{ {body}; }} >"$out" 2>&1 </dev/null; then {var}=1; echo {quote("qrm-ok " + key)}',
            f"  else printf 'qrm-fail %s %s\\n' {quote(key)} \"$(tr -s '\\n' ' ' <\"$out\" | cut -c1-300)\"; {undo_text} fi",
            f"else echo {quote('qrm-skip ' + key)}; fi",
        ]

    def raw(self, line: str) -> None:
        self.lines.append(line)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def problem(self, found: dict[str, str | None], key: str) -> str | None:
        """Why step ``key`` did not succeed (a skipped step: why what it required failed)."""
        if "*" in found:
            return found["*"]
        if key not in found:
            return "the storage server did not say"
        said = found[key]
        if said != SKIPPED:
            return said
        for required in self.requires.get(key, []):
            why = self.problem(found, required)
            if why is not None:
                return why
        return "skipped"


def outcomes(stdout: str) -> dict[str, str | None]:
    """``{key: None}`` for each step that worked, ``{key: message}`` for each that failed
    (:data:`SKIPPED` for a step whose prerequisite failed)."""
    found: dict[str, str | None] = {}
    for line in stdout.splitlines():
        if line.startswith("qrm-ok "):
            found[line[7:].strip()] = None
        elif line.startswith("qrm-skip "):
            found[line[9:].strip()] = SKIPPED
        elif line.startswith("qrm-fail "):
            key, _, why = line[9:].partition(" ")
            found[key] = why.strip().removeprefix("tgtadm: ") or "failed"
    return found
