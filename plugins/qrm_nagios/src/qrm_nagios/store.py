"""The object directory qrm owns, and how a change reaches a running Nagios.

One file per object. A change is applied in four steps, under a lock shared
by every qrm process on the machine (``qrm server``, a ``qrm`` command):

1. **write**: each new or changed file is written beside the old one as
   ``NAME.cfg.new`` (Nagios reads only ``*.cfg`` in its ``cfg_dir``, so the
   running Nagios and a restart never see it); a file whose text is the same
   as on disk is not written at all;
2. **check**: ``nagios4 -v`` runs on a candidate main configuration: Nagios's
   own main file with qrm's ``cfg_dir`` replaced by the list of object files
   as they will be (old files, minus removed ones, with the new ones in place
   of the changed ones). When Nagios rejects it, the files its errors name are
   set aside (their old version stays, the error is reported) and the rest is
   checked again; an error that names no new file rejects the whole change;
3. **rename** the accepted new files over the old ones, and delete removed files;
4. **reload**: ``RESTART_PROGRAM`` through the command pipe, when a Nagios reads it.

What runs is therefore always a configuration Nagios accepted, and a file on
disk is always a checked one: a restart of Nagios at any moment reads a
configuration that passed ``-v``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qrm_core.plugin_api import PluginError, Settings
from qrm_nagios import control, nagioscfg
from qrm_nagios.render import BASE_FILE
from qrm_nagios.settings import NagiosPaths, NagiosSettings

STAGED = ".new"
#: Order of renames: what others refer to comes first; removals go the other way.
_ORDER = {BASE_FILE: 0, "groups": 1, "storage": 2, "hosts": 3}
_FILE_RE = re.compile(r"(?:file|config file) '([^']+)'")
_HOST_RE = re.compile(r"\bhost '([^']+)'")
_HOST_NAME_RE = re.compile(r"^\s*host_name\s+(\S+)\s*$", re.M)
_MAX_ROUNDS = 6


class ConfigRejected(PluginError):
    """Nagios refused the new configuration; nothing was changed."""

    code = "nagios_rejected"


@dataclass
class Verdict:
    ok: bool
    seconds: float
    summary: str
    errors: list[str] = field(default_factory=list)


@dataclass
class ApplyReport:
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    #: relative path -> Nagios's reason, for files whose new version was refused (the old one stays)
    rejected: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    check: str = ""
    reload: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    dry_run: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.written or self.removed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "rejected": self.rejected,
            "problems": self.problems,
            "check": self.check,
            "reload": self.reload,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "dry_run": self.dry_run,
        }


def _rank(path: str) -> tuple[int, str]:
    head = path.split("/", 1)[0]
    return (_ORDER.get(head, _ORDER.get(path, 9)), path)


class ObjectStore:
    """qrm's object directory of one Nagios."""

    def __init__(self, settings: NagiosSettings, core: Settings) -> None:
        self.settings = settings
        self.core = core
        self.paths: NagiosPaths = settings.paths(core)
        self.root = self.paths.object_dir

    # -- reading ---------------------------------------------------------

    def read(self, rel: str) -> str | None:
        try:
            return (self.root / rel).read_text()
        except FileNotFoundError:
            return None

    def files(self) -> list[str]:
        """Relative paths of every ``*.cfg`` file in the directory (what Nagios reads)."""
        found: list[str] = []
        if not self.root.is_dir():
            return found
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            base = os.path.relpath(dirpath, self.root)
            for name in filenames:
                if name.endswith(".cfg"):
                    found.append(name if base == "." else f"{base}/{name}")
        return sorted(found, key=_rank)

    def snapshot(self) -> dict[str, str]:
        """Every object file and its text."""
        return {rel: text for rel in self.files() if (text := self.read(rel)) is not None}

    def main_config(self) -> nagioscfg.MainConfig:
        path = self.paths.main_config
        if path is None:
            raise PluginError("no Nagios main configuration (QRM_NAGIOS_MAIN_CONFIG)")
        config = nagioscfg.read_main_config(path)
        nagioscfg.check_includes(config, self.root)
        return config

    def interval_length(self) -> int:
        if self.settings.manage:
            return 1
        return self.main_config().interval_length

    # -- changing --------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.paths.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.paths.lock, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def apply(
        self,
        desired: dict[str, str | None],
        *,
        complete: bool = False,
        dry_run: bool = False,
        reload: bool = True,
    ) -> ApplyReport:
        """Bring the directory to ``desired`` (path -> text, None to remove): write, check, rename, reload.

        ``complete``: ``desired`` is every object, so files not in it are removed.
        """
        report = ApplyReport(dry_run=dry_run)
        started = time.perf_counter()
        with self.locked():
            self.root.mkdir(parents=True, exist_ok=True)
            present = self.files()
            changes: dict[str, str | None] = {}
            for rel, text in desired.items():
                old = self.read(rel)
                if text is None:
                    if old is not None:
                        changes[rel] = None
                elif text != old:
                    changes[rel] = text
                else:
                    report.unchanged += 1
            if complete:
                for rel in present:
                    if rel not in desired:
                        changes[rel] = None
            report.timings["compare"] = time.perf_counter() - started
            if not changes:
                report.check = "nothing changed"
                return report
            if dry_run:
                report.written = sorted((r for r, t in changes.items() if t is not None), key=_rank)
                report.removed = sorted((r for r, t in changes.items() if t is None), key=_rank)
                return report
            self._apply_locked(changes, present, report, reload=reload)
        report.timings["total"] = time.perf_counter() - started
        return report

    def _apply_locked(
        self, changes: dict[str, str | None], present: list[str], report: ApplyReport, *, reload: bool
    ) -> None:
        config = self.main_config()
        tick = time.perf_counter()
        staged: dict[str, Path] = {}
        try:
            made: set[Path] = set()
            chmod = bool(_umask() & 0o644)
            for rel, text in changes.items():
                if text is None:
                    continue
                target = self.root / rel
                if target.parent not in made:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    made.add(target.parent)
                temp = target.with_name(target.name + STAGED)
                _write(temp, text, chmod=chmod)  # a leftover of a crash was written 0644 by us too
                staged[rel] = temp
            report.timings["write"] = time.perf_counter() - tick
            verdict = self._verify(config, changes, present, staged, report)
            if not verdict.ok:
                raise ConfigRejected(
                    "Nagios rejected the new configuration, nothing was changed: "
                    + (verdict.errors[0] if verdict.errors else verdict.summary)
                )
            report.check = verdict.summary
            tick = time.perf_counter()
            for rel in sorted(changes, key=_rank):
                if rel in report.rejected or changes[rel] is None:
                    continue
                os.replace(staged.pop(rel), self.root / rel)
                report.written.append(rel)
            for rel in sorted(changes, key=_rank, reverse=True):
                if rel in report.rejected or changes[rel] is not None:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    (self.root / rel).unlink()
                report.removed.append(rel)
            report.timings["swap"] = time.perf_counter() - tick
        finally:
            for temp in staged.values():
                with contextlib.suppress(FileNotFoundError):
                    temp.unlink()
        if reload and report.changed:
            tick = time.perf_counter()
            report.reload = self.reload()
            report.timings["reload"] = time.perf_counter() - tick
        elif not report.changed:
            report.reload = "nothing to reload"

    def _verify(
        self,
        config: nagioscfg.MainConfig,
        changes: dict[str, str | None],
        present: list[str],
        staged: dict[str, Path],
        report: ApplyReport,
    ) -> Verdict:
        """``nagios4 -v`` on the files as they will be; set aside the new files Nagios blames."""
        spent = 0.0
        verdict = Verdict(ok=False, seconds=0.0, summary="")
        for _ in range(_MAX_ROUNDS):
            accepted = {rel for rel in changes if rel not in report.rejected}
            files: list[Path] = []
            for rel in present:
                if rel in accepted and changes[rel] is None:
                    continue
                files.append(staged[rel] if rel in accepted and rel in staged else self.root / rel)
            files.extend(
                staged[rel] for rel in sorted(accepted, key=_rank) if rel in staged and rel not in present
            )
            verdict = self.check(config, files)
            spent += verdict.seconds
            if verdict.ok:
                break
            culprits = self._blame(verdict.errors, changes, staged, report)
            if not culprits:
                break
            if not [rel for rel in changes if rel not in report.rejected]:
                # Every change was refused: what runs stays as it is.
                verdict = Verdict(ok=True, seconds=verdict.seconds, summary="every change refused")
                break
        report.timings["check"] = spent
        return verdict

    def _blame(
        self, errors: list[str], changes: dict[str, str | None], staged: dict[str, Path], report: ApplyReport
    ) -> set[str]:
        by_file = {str(path): rel for rel, path in staged.items()}
        by_host: dict[str, str] = {}
        for rel, text in changes.items():
            if text is not None:
                for name in _HOST_NAME_RE.findall(text):
                    by_host.setdefault(name, rel)
        culprits: set[str] = set()
        for error in errors:
            found = {by_file[f] for f in _FILE_RE.findall(error) if f in by_file}
            found |= {by_host[h] for h in _HOST_RE.findall(error) if h in by_host}
            if not found:
                return set()  # an error qrm's new files did not cause: refuse everything
            for rel in found:
                report.rejected.setdefault(rel, _short(error, staged, self.root))
            culprits |= found
        return culprits

    def check(self, config: nagioscfg.MainConfig, files: list[Path]) -> Verdict:
        """Run ``nagios4 -v`` on the main configuration with these object files."""
        self.paths.check_dir.mkdir(parents=True, exist_ok=True)
        candidate = self.paths.check_dir / "nagios-check.cfg"
        candidate.write_text(nagioscfg.candidate(config, self.root, files))
        argv = [self.settings.nagios, "-v", str(candidate)]
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=self.settings.timeout,
                check=False,
            )
        except FileNotFoundError:
            raise PluginError(
                f"{self.settings.nagios} is not installed (apt-get install nagios4-core); "
                "it checks every configuration before Nagios gets it"
            ) from None
        except subprocess.TimeoutExpired:
            raise PluginError(
                f"{self.settings.nagios} -v did not finish in {self.settings.timeout:.0f} s"
            ) from None
        seconds = time.perf_counter() - started
        output = proc.stdout.decode(errors="replace")
        errors = [line.strip() for line in output.splitlines() if line.strip().startswith("Error")]
        errors = [e for e in errors if e not in ("Error processing object config files!",)]
        totals = [line.strip() for line in output.splitlines() if line.strip().startswith("Total ")]
        if proc.returncode == 0:
            return Verdict(ok=True, seconds=seconds, summary="nagios -v: " + ", ".join(totals).lower())
        if not errors:
            tail = [line.strip() for line in output.splitlines() if line.strip()][-3:]
            errors = [" ".join(tail) or f"{argv[0]} -v exited with status {proc.returncode}"]
        return Verdict(ok=False, seconds=seconds, summary=errors[0], errors=errors)

    # -- Nagios ----------------------------------------------------------

    def command_file(self) -> Path | None:
        if self.paths.command_file is not None:
            return self.paths.command_file
        value = self.main_config().get("command_file")
        return Path(value) if value else None

    def status_file(self) -> Path | None:
        if self.paths.status_file is not None:
            return self.paths.status_file
        config = self.main_config()
        value = config.get("status_file")
        return config.resolve(value) if value else None

    def reload(self) -> str:
        """Tell a running Nagios to read its configuration again.

        A pipe without a reader while Nagios's process lives (its pid in
        status.dat, which Nagios removes when it stops) is a Nagios in the
        middle of a restart: it is tried again for a few seconds, so a change
        made during another reload is not left unread."""
        pipe = self.command_file()
        deadline = time.monotonic() + 5.0
        while True:
            if control.send(pipe, [control.command("RESTART_PROGRAM")]):
                return "Nagios told to reload (RESTART_PROGRAM)"
            if not self._alive() or time.monotonic() > deadline:
                return "Nagios is not running; it reads the new configuration when it starts"
            time.sleep(0.2)

    def _alive(self) -> bool:
        """Whether the Nagios that wrote status.dat still runs."""
        path = self.status_file()
        if path is None:
            return False
        try:
            with open(path, "rb") as handle:
                head = handle.read(4096)
        except OSError:
            return False
        match = re.search(rb"\tnagios_pid=(\d+)\n", head)
        if not match:
            return False
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o077  # unknown: assume the strictest, and set the mode explicitly


def _write(path: Path, text: str, *, chmod: bool = True) -> None:
    """A new file readable by the Nagios user (0644), replacing a leftover of an interrupted run.

    ``chmod``: set the mode explicitly (needed when the umask takes read bits away)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if chmod:
            os.fchmod(fd, 0o644)
        view = memoryview(text.encode())
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _short(error: str, staged: dict[str, Path], root: Path) -> str:
    """Nagios's error with the staged file names shown as the object files they become."""
    for rel, path in staged.items():
        error = error.replace(str(path), str(root / rel))
    return error
