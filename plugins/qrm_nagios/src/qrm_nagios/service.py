"""What runs inside ``qrm server``: a managed Nagios (optional) and the plugin's worker.

The worker thread does, in turn:

* apply the changes hooks handed it (many changes that arrive together are
  rendered, checked and reloaded as one);
* send the agents' heartbeat states to Nagios (at once for resources whose
  state changed, every ``agent_refresh`` seconds for all);
* read Nagios's status every ``poll_interval`` seconds: state changes become
  events, a hard DOWN may fail a resource over (see :mod:`qrm_nagios.watch`);
* compare every object with the database every ``resync_interval`` seconds.

A managed Nagios is started in the foreground as a child process (in
``netns`` if set) and stopped by its PID; nothing is ever stopped by name.
If it exits on its own, the worker records it and starts it again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

from qrm_core.plugin_api import EventLevel, PluginError, QrmError, Settings, monitoring_view
from qrm_nagios import agent, control, nagioscfg, source, sync, watch
from qrm_nagios.health import reader
from qrm_nagios.settings import NagiosSettings
from qrm_nagios.store import ObjectStore
from qrm_nagios.sync import Changes

log = logging.getLogger("qrm.plugins.nagios")

#: Seconds the worker waits after a change for others to join it.
BATCH_DELAY = 0.2

_active: NagiosService | None = None
_active_lock = threading.Lock()


def active_service(settings: NagiosSettings, core: Settings) -> NagiosService | None:
    """The running service of this process for the same object directory, if any."""
    with _active_lock:
        service = _active
    if service is None or not service.running:
        return None
    if service.paths.object_dir != settings.paths(core).object_dir:
        return None
    return service


def _tail(path: Path, lines: int = 4) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept)


class NagiosService:
    """The plugin's part of ``qrm server``."""

    def __init__(self, settings: NagiosSettings, core: Settings) -> None:
        self.settings = settings
        self.core = core
        self.store = ObjectStore(settings, core)
        self.paths = self.store.paths
        self.name = f"nagios ({settings.mode})"
        self.process: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._cond = threading.Condition()
        self._pending = Changes()
        self._agents: set[int] = set()
        self._agent_codes: dict[int, int] = {}
        self._said: set[str] = set()
        self._restarts = 0
        self._next_restart = 0.0
        self.watcher = watch.Watcher(settings, core)
        self.running = False
        #: Counters for tests and ``qrm nagios status``.
        self.applied = 0
        self.polls = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    # -- life cycle ------------------------------------------------------

    def start(self) -> None:
        global _active
        if self.running:
            return
        if self.settings.manage:
            self._prepare_managed()
        try:
            result = sync.full_sync(self.settings, self.core, reload=not self.settings.manage)
            self._report(result.report, result.rendered.files)
        except QrmError as exc:
            if self.settings.manage and not (self.paths.object_dir / "qrm-base.cfg").exists():
                raise
            # What Nagios runs stays as it is; the worker tries again at the next resync.
            self._note(EventLevel.ERROR, "plugin", "nagios", f"nagios: start-up sync failed: {exc.message}")
        if self.settings.manage:
            self._start_process()
        self._stopping.clear()
        self.running = True
        self._thread = threading.Thread(target=self._run, name="qrm-nagios", daemon=True)
        self._thread.start()
        with _active_lock:
            _active = self
        log.info("nagios: %s started%s", self.name, f" (pid {self.pid})" if self.pid else "")

    def stop(self) -> None:
        global _active
        with _active_lock:
            if _active is self:
                _active = None
        self.running = False
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.timeout)
            self._thread = None
        self._stop_process()

    # -- work handed in by hooks ------------------------------------------

    def submit(self, changes: Changes) -> None:
        with self._cond:
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.merge(changes)
            self._cond.notify_all()

    def agents_changed(self, resource_ids: set[int]) -> None:
        with self._cond:
            self._agents |= resource_ids
            self._cond.notify_all()

    def idle(self) -> bool:
        """Nothing waiting (tests wait for this before looking at Nagios)."""
        with self._cond:
            return not self._pending and not self._agents and not self._busy

    _busy = False
    _pending_since = 0.0

    # -- the worker --------------------------------------------------------

    def _run(self) -> None:
        now = time.monotonic()
        next_poll = now
        next_agents = now
        next_resync = now + self.settings.resync_interval if self.settings.resync_interval else float("inf")
        while not self._stopping.is_set():
            with self._cond:
                wait = min(next_poll, next_agents, next_resync) - time.monotonic()
                if not self._pending and not self._agents and wait > 0:
                    self._cond.wait(timeout=min(wait, 1.0))
                if self._pending and not self._stopping.is_set():
                    # Changes come in bursts (a rack powering on): gather what
                    # arrives within a moment into one check and one reload.
                    until = self._pending_since + BATCH_DELAY
                    while (gather := until - time.monotonic()) > 0 and not self._stopping.is_set():
                        self._cond.wait(timeout=gather)
                pending, self._pending = self._pending, Changes()
                agents, self._agents = self._agents, set()
                self._busy = bool(pending or agents)
            if self._stopping.is_set():
                break
            try:
                if pending:
                    self._apply(pending)
                now = time.monotonic()
                if now >= next_agents:
                    self._send_agents(None)
                    next_agents = now + self.settings.agent_refresh
                elif agents:
                    self._send_agents(agents)
                if now >= next_poll:
                    self._keep_nagios_running()
                    self._poll()
                    next_poll = time.monotonic() + self.settings.poll_interval
                if now >= next_resync:
                    result = sync.full_sync(self.settings, self.core)
                    self._report(result.report, result.rendered.files)
                    next_resync = time.monotonic() + self.settings.resync_interval
            except QrmError as exc:
                self._note(EventLevel.ERROR, "plugin", "nagios", f"nagios: {exc.message}")
            except Exception as exc:
                log.exception("nagios: worker step failed")
                self._note(EventLevel.ERROR, "plugin", "nagios", f"nagios: {type(exc).__name__}: {exc}")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _apply(self, changes: Changes) -> None:
        try:
            desired, report = sync.apply_changes_with_texts(self.settings, self.core, changes)
        except QrmError as exc:
            self._note(EventLevel.ERROR, "plugin", "nagios", f"nagios: {exc.message}")
            return
        self.applied += 1
        self._report(report, desired)

    def _report(self, report: sync.ApplyReport, texts: dict[str, str] | dict[str, str | None]) -> None:
        notes = sync.notes_for(self.settings, report, texts)
        fresh = [n for n in notes if n.message not in self._said or n.level is EventLevel.ERROR]
        self._said.update(n.message for n in notes)
        watch.record(self.core, fresh)

    def _note(self, level: EventLevel, object_type: str, name: str, message: str) -> None:
        log.log(logging.ERROR if level is EventLevel.ERROR else logging.INFO, "%s", message)
        watch.record(self.core, [watch.Note(level, object_type, name, message)])

    def _send_agents(self, ids: set[int] | None) -> None:

        items: list[Any]
        with source.reading(self.core) as ctx:
            if ids is None:
                items = list(monitoring_view(ctx)[0])
            else:
                items = [r for r in source.resources_by_id(ctx, ids).values() if r is not None]
        lines, codes = agent.result_lines(self.settings, self.core, items)
        if not lines:
            return
        if control.send(self.store.command_file(), lines, timeout=self.settings.timeout):
            self._agent_codes.update(codes)

    def _poll(self) -> None:
        path = self.store.status_file()
        if path is None:
            return
        status = reader(path).read()
        if status is None:
            return
        self.polls += 1
        watch.record(self.core, self.watcher.poll(status))

    # -- a managed Nagios ----------------------------------------------------

    def _prepare_managed(self) -> None:
        prepare_managed(self.settings, self.core)

    def _argv(self) -> list[str]:
        assert self.paths.main_config is not None
        prefix = ["ip", "netns", "exec", self.settings.netns] if self.settings.netns else []
        return [*prefix, self.settings.nagios, str(self.paths.main_config)]

    def _start_process(self) -> None:
        if self.settings.netns and not Path("/run/netns", self.settings.netns).exists():
            raise PluginError(f"network namespace {self.settings.netns!r} does not exist (QRM_NAGIOS_NETNS)")
        self._out = open(self.paths.stdout, "ab")
        argv = self._argv()
        try:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except FileNotFoundError:
            self._close_out()
            raise PluginError(f"{argv[0]} is not installed (apt-get install nagios4-core)") from None
        command_file = self.paths.command_file
        assert command_file is not None
        deadline = time.monotonic() + self.settings.timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                self.process = None
                self._close_out()
                raise PluginError(f"Nagios exited at start (status {code}): {_tail(self.paths.stdout)}")
            if control.reader_present(command_file):
                log.info("nagios: managed Nagios started (pid %d)", self.process.pid)
                return
            time.sleep(0.05)
        self._stop_process()
        raise PluginError(f"Nagios did not open its command pipe within {self.settings.timeout:.0f} s")

    def _keep_nagios_running(self) -> None:
        if not self.settings.manage or self.process is None or self._stopping.is_set():
            return
        code = self.process.poll()
        if code is None or time.monotonic() < self._next_restart:
            return
        pid = self.process.pid
        _kill_leftovers(pid)
        self.process = None
        self._close_out()
        self._restarts += 1
        self._next_restart = time.monotonic() + min(300.0, 5.0 * self._restarts)
        self._note(
            EventLevel.ERROR,
            "plugin",
            "nagios",
            f"nagios: the managed Nagios (pid {pid}) exited with status {code}: {_tail(self.paths.stdout)}; "
            "starting it again",
        )
        try:
            self._prepare_managed()
            self._start_process()
        except QrmError as exc:
            self._note(
                EventLevel.ERROR, "plugin", "nagios", f"nagios: could not start Nagios again: {exc.message}"
            )

    def _stop_process(self) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.settings.timeout)
            except subprocess.TimeoutExpired:
                log.warning("nagios: Nagios (pid %d) ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait(timeout=10)
        _kill_leftovers(proc.pid)
        self.process = None
        self._close_out()

    def _close_out(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def prepare_managed(settings: NagiosSettings, core: Settings) -> None:
    """Directories, nagios.cfg and resource.cfg of a managed Nagios (refused while one runs there)."""
    paths = settings.paths(core)
    state = paths.state_dir
    var = state / "var"
    for directory in (
        state,
        paths.object_dir,
        var,
        var / "tmp",
        var / "spool" / "checkresults",
        var / "archives",
    ):
        directory.mkdir(parents=True, exist_ok=True)
    assert paths.command_file is not None
    paths.command_file.parent.mkdir(parents=True, exist_ok=True)
    if control.reader_present(paths.command_file):
        raise PluginError(
            f"a Nagios already reads {paths.command_file}; stop it, or set QRM_NAGIOS_MANAGE=false "
            "and QRM_NAGIOS_MAIN_CONFIG to drive it instead"
        )
    with contextlib.suppress(FileNotFoundError):
        paths.command_file.unlink()  # a pipe left by a Nagios that died: nobody reads it
    user, _group = nagioscfg.run_as(settings)
    if os.geteuid() == 0 and user != "root":
        entry = pwd.getpwnam(user)
        for directory in (var, var / "tmp", var / "spool", var / "spool" / "checkresults", var / "archives",
                          paths.command_file.parent):  # fmt: skip
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        for existing in var.iterdir():
            if existing.is_file():
                os.chown(existing, entry.pw_uid, entry.pw_gid)
    for directory in (state, paths.object_dir):
        os.chmod(directory, 0o755)
    assert paths.main_config is not None
    _write(paths.main_config, nagioscfg.managed_config(settings, paths))
    _write(state / "resource.cfg", nagioscfg.resource_config(settings))


def _session_members(sid: int) -> list[int]:
    """PIDs of the processes in session ``sid`` (from /proc)."""
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        # state ppid pgrp session ...
        if len(fields) > 3 and int(fields[3]) == sid and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def _kill_leftovers(sid: int) -> None:
    """Stop what is left of a Nagios that has exited: its workers (the check
    workers, the command-pipe reader) each have a process group of their own
    and outlive a killed main process. They all stay in the session qrm
    created for Nagios (``start_new_session``: its id is the main process's
    pid), so they are found by that session and stopped by their PIDs, never
    by name."""
    deadline = time.monotonic() + 5.0
    while True:
        members = _session_members(sid)
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            log.warning("nagios: processes %s of the stopped Nagios did not go away", members)
            return
        time.sleep(0.05)


def _write(path: Path, text: str) -> None:
    temp = path.with_name(path.name + ".new")
    temp.write_text(text)
    os.chmod(temp, 0o644)
    temp.replace(path)
