"""An NFS storage server on another machine, managed over SSH: nfs-ganesha there.

Everything the local driver does to this machine's files and ganesha, done on
the storage server through one shell session per change (``storage_runner``:
``ssh ... sh -s``), so the server's lock is held from the read of the export
record to the reload:

1. take ``flock <export_root>/.qrm-nfs.lock``; print the export record and
   which of the requested volumes exist (as real directories);
2. qrm computes the new record and renders the EXPORT file (the same closed
   grammar, proven by the strict parser as for a local server);
3. the candidate file is loaded by a throwaway ganesha.nfsd on the server
   (``unshare --net --mount`` with an empty ``/run``, as locally), whose log
   comes back and must show exactly the intended exports;
4. the candidate is renamed over the EXPORT file, the record saved, the
   running ganesha (its PID file, its process name checked) sent SIGHUP, and
   its log followed until "Reread exports complete" (and no refusal).

Files travel base64-encoded inside the script; every path is a validated
setting or location and is quoted. Nothing changes on the server unless step
3 passed. Per-server settings (``qrm storage set NAME --setting KEY=VALUE``):

* ``export_root`` - directory holding the volumes (required to create, list,
  remove, export);
* ``ganesha_config`` - the EXPORT file qrm owns, ``%include``d by the server's
  ganesha.conf (required to export);
* ``ganesha_pid_file`` - the running ganesha's PID file (required to export:
  the reload);
* ``ganesha_log_file`` - its log; when set, every reload is confirmed from it;
* ``check_config`` - ``false`` to skip the throwaway check (default ``true``);
* ``first_export_id``, ``reload_timeout`` - as for a local server;
* ``server`` - ``ganesha`` (default) or ``kernel``: the server's kernel nfsd,
  through an exports file qrm owns (``exports_file``, default
  ``/etc/exports.d/qrm.exports``) applied with ``exportfs -ra`` in the same
  locked session (steps 2-4 become :func:`qrm_nfs.kernel.apply_script`; the
  ganesha settings are not used).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qrm_core.plugin_api import (
    AlreadyExists,
    DriverError,
    ExportRequest,
    InvalidInput,
    NotFound,
    QrmError,
    Runner,
    StorageTarget,
    VolumeInfo,
)
from qrm_core.plugin_api import shell_quote as q
from qrm_nfs import ganesha, kernel
from qrm_nfs.settings import check_safe_path

STATE_FILE = ".qrm-nfs.json"
LOCK_FILE = ".qrm-nfs.lock"
CHECK_DIR = ".qrm-nfs-check"
KEYS = (
    "export_root",
    "ganesha_config",
    "ganesha_pid_file",
    "ganesha_log_file",
    "check_config",
    "first_export_id",
    "reload_timeout",
    "server",
    "exports_file",
)
_VOLUME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class RemoteConfig:
    export_root: str | None
    ganesha_config: str | None
    ganesha_pid_file: str | None
    ganesha_log_file: str | None
    check_config: bool
    first_export_id: int
    reload_timeout: float
    server: str = "ganesha"
    exports_file: str = kernel.DEFAULT_EXPORTS_FILE


def remote_config(settings: dict[str, str] | Any) -> RemoteConfig:
    """A remote NFS server's settings, each checked (safe absolute paths, numbers)."""
    unknown = sorted(k for k in settings if k not in KEYS and not k.startswith("ssh_"))
    if unknown:
        raise InvalidInput(f"unknown nfs storage setting(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    paths: dict[str, str | None] = {}
    for key in ("export_root", "ganesha_config", "ganesha_pid_file", "ganesha_log_file"):
        value = settings.get(key)
        try:
            paths[key] = str(check_safe_path(value, key)) if value else None
        except ValueError as exc:
            raise InvalidInput(f"nfs storage setting: {exc}") from None
    check = str(settings.get("check_config", "true")).lower()
    if check not in ("true", "false", "yes", "no", "1", "0"):
        raise InvalidInput(f"nfs storage setting check_config={check!r}: give true or false")
    try:
        first = int(settings.get("first_export_id", "1000"))
        timeout = float(settings.get("reload_timeout", "15"))
    except ValueError:
        raise InvalidInput("nfs storage settings first_export_id and reload_timeout are numbers") from None
    if not 1 <= first <= 60000 or not 0 < timeout <= 600:
        raise InvalidInput("nfs storage setting first_export_id is 1-60000, reload_timeout 0-600 s")
    return RemoteConfig(
        export_root=paths["export_root"],
        ganesha_config=paths["ganesha_config"],
        ganesha_pid_file=paths["ganesha_pid_file"],
        ganesha_log_file=paths["ganesha_log_file"],
        check_config=check in ("true", "yes", "1"),
        first_export_id=first,
        reload_timeout=timeout,
        server=kernel.server_kind(settings),
        exports_file=kernel.exports_file(settings),
    )


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode("".join(text.split())).decode(errors="replace")


class RemoteNfs:
    """The operations of :class:`qrm_nfs.driver.NfsStorage` on a server reached over SSH."""

    def __init__(self, storage: StorageTarget, runner: Runner) -> None:
        self.storage = storage
        self.runner = runner
        self.config = remote_config(storage.settings)
        self.where = f"{storage.name} ({runner.where})"

    # -- settings ------------------------------------------------------------

    def _root(self, doing: str) -> str:
        if self.config.export_root is None:
            raise DriverError(
                f"cannot {doing}: NFS storage server {self.storage.name} has no export_root; set it with "
                f"'qrm storage set {self.storage.name} --setting export_root=/srv/qrm/nfs'"
            )
        return self.config.export_root

    def _exports_file(self) -> str:
        if self.config.ganesha_config is None:
            raise DriverError(
                f"cannot export: NFS storage server {self.storage.name} has no ganesha_config "
                "(the EXPORT file its ganesha.conf includes); set it with --setting ganesha_config=PATH"
            )
        return self.config.ganesha_config

    def volume_path(self, location: str, doing: str) -> str:
        root = self._root(doing)
        parent, _, name = location.rpartition("/")
        if parent != root or not _VOLUME.match(name):
            raise InvalidInput(
                f"NFS location {location} is not a volume directly under the export root {root}"
            )
        return location

    # -- the server ------------------------------------------------------------

    def check(self) -> None:
        """ganesha.nfsd is there and runs (its PID file), the export root and the EXPORT file's
        directory exist, the tools of the check are there."""
        c = self.config
        if c.server == "kernel":
            return self._check_kernel()
        lines = ["set -u", "for p in ganesha.nfsd unshare flock base64; do command -v $p >/dev/null || "
                 "{ echo \"qrm-missing $p\"; exit 0; }; done"]  # fmt: skip
        if c.export_root:
            lines.append(f"test -d {q(c.export_root)} || {{ echo 'qrm-no {c.export_root}'; exit 0; }}")
        if c.ganesha_config:
            parent = c.ganesha_config.rsplit("/", 1)[0] or "/"
            lines.append(f"test -d {q(parent)} || {{ echo 'qrm-no {parent}'; exit 0; }}")
        if c.ganesha_pid_file:
            lines.append(
                f"pid=$(cat {q(c.ganesha_pid_file)} 2>/dev/null); "
                '[ -n "$pid" ] && [ "$(cat /proc/$pid/comm 2>/dev/null)" = ganesha.nfsd ] '
                "|| { echo qrm-not-running; exit 0; }"
            )
        lines.append("echo qrm-ready")
        done = self.runner.script("\n".join(lines) + "\n", timeout=60)
        said = (done.stdout.strip().splitlines() or [""])[-1]
        if said.startswith("qrm-missing "):
            program = said.split()[1]
            package = {"ganesha.nfsd": "nfs-ganesha nfs-ganesha-vfs", "unshare": "util-linux",
                       "flock": "util-linux", "base64": "coreutils"}[program]  # fmt: skip
            raise DriverError(f"NFS storage server {self.where} lacks {program} (install {package} there)")
        if said.startswith("qrm-no "):
            raise DriverError(f"NFS storage server {self.where} has no directory {said[7:]}")
        if said == "qrm-not-running":
            raise DriverError(
                f"nfs-ganesha is not running on {self.where} (no live ganesha.nfsd in {c.ganesha_pid_file})"
            )
        if said != "qrm-ready":
            raise DriverError(f"cannot check NFS storage server {self.where}: {done.last_error()}")

    def _check_kernel(self) -> None:
        """``server=kernel``: exportfs (and the tools of a change) there, the export root
        and the exports file's directory there."""
        c = self.config
        parent = c.exports_file.rsplit("/", 1)[0] or "/"
        lines = ["set -u", "for p in exportfs flock base64; do command -v $p >/dev/null || "
                 "{ echo \"qrm-missing $p\"; exit 0; }; done",
                 f"test -d {q(parent)} || {{ echo {q('qrm-no ' + parent)}; exit 0; }}"]  # fmt: skip
        if c.export_root:
            lines.append(f"test -d {q(c.export_root)} || {{ echo {q('qrm-no ' + c.export_root)}; exit 0; }}")
        lines.append("echo qrm-ready")
        done = self.runner.script("\n".join(lines) + "\n", timeout=60)
        said = (done.stdout.strip().splitlines() or [""])[-1]
        if said.startswith("qrm-missing "):
            program = said.split()[1]
            package = {"exportfs": "nfs-kernel-server", "flock": "util-linux", "base64": "coreutils"}[program]
            raise DriverError(f"NFS storage server {self.where} lacks {program} (install {package} there)")
        if said.startswith("qrm-no "):
            raise DriverError(f"NFS storage server {self.where} has no directory {said[7:]}")
        if said != "qrm-ready":
            raise DriverError(f"cannot check NFS storage server {self.where}: {done.last_error()}")

    # -- volumes -------------------------------------------------------------

    def create_volume(self, name: str, size_mb: int) -> VolumeInfo:
        root = self._root("create a volume")
        path = f"{root}/{name}"
        script = (
            f"set -u\nexec 9>>{q(root + '/' + LOCK_FILE)} && flock -w 60 9 || exit 3\n"
            f"test -d {q(root)} || {{ echo 'qrm-no-root'; exit 0; }}\n"
            f"test -e {q(path)} && {{ echo 'qrm-exists'; exit 0; }}\n"
            f"free=$(df -Pk {q(root)} | awk 'NR == 2 {{ print int($4 / 1024) }}')\n"
            f'test "${{free:-0}}" -ge {size_mb} || {{ echo "qrm-full ${{free:-0}}"; exit 0; }}\n'
            f"mkdir -m 0755 {q(path)} && echo qrm-made\n"
        )
        done = self.runner.script(script)
        said = done.stdout.strip()
        if said == "qrm-exists":
            raise AlreadyExists(f"volume {path} already exists on {self.storage.name}")
        if said == "qrm-no-root":
            raise DriverError(f"cannot create {path}: the export root {root} does not exist on {self.where}")
        if said.startswith("qrm-full"):
            raise DriverError(
                f"cannot create {path} of {size_mb} MB: {root} has only {said.split()[1]} MB free"
            )
        if said != "qrm-made":
            raise DriverError(f"cannot create {path} on {self.where}: {done.last_error()}")
        return VolumeInfo(location=path, size_mb=size_mb)

    def remove_volume(self, location: str) -> None:
        path = self.volume_path(location, "remove a volume")
        root = self._root("remove a volume")
        record_path = f"{root}/{STATE_FILE}"
        script = (
            f"set -u\nexec 9>>{q(root + '/' + LOCK_FILE)} && flock -w 60 9 || exit 3\n"
            f"cat {q(record_path)} 2>/dev/null | base64 -w0; echo; echo qrm-record\n"
            f"if test -d {q(path)} -a ! -L {q(path)}; then echo qrm-present; else echo qrm-missing; fi\n"
            "echo qrm-probed\n"
        )
        with self.runner.session() as session:
            session.send(script)
            state = self._state(session.until("qrm-record"))
            if "qrm-missing" in session.until("qrm-probed"):
                session.abort()
                raise NotFound(f"volume {location} does not exist on {self.storage.name}")
            entry = state["volumes"].get(location, {})
            if entry.get("clients"):
                session.abort()
                raise DriverError(f"volume {location} is still exported to {', '.join(entry['clients'])}")
            state["volumes"].pop(location, None)
            session.send(
                f"rm -rf -- {q(path)} || exit 4\n"
                f"printf '%s' {q(_b64(json.dumps(state, indent=1, sort_keys=True) + chr(10)))} | base64 -d "
                f"> {q(record_path + '.new')} && mv {q(record_path + '.new')} {q(record_path)}\n"
                "echo qrm-removed\n"
            )
            done = session.close()
        if "qrm-removed" not in done.stdout:
            raise DriverError(f"cannot remove {location} on {self.where}: {done.last_error()}")

    def list_volumes(self) -> list[VolumeInfo]:
        root = self._root("list volumes")
        script = (
            f"cd {q(root)} || exit 3\n"
            f"cat {q(STATE_FILE)} 2>/dev/null | base64 -w0; echo; echo qrm-record\n"
            'for d in *; do if [ -d "$d" ] && [ ! -L "$d" ]; then echo "$d"; fi; done\n'
        )
        done = self.runner.script(script)
        if not done.ok or "qrm-record" not in done.stdout:
            raise DriverError(f"cannot list the volumes of {self.where}: {done.last_error()}")
        record, _, names = done.stdout.partition("qrm-record\n")
        state = self._state(record)
        volumes = []
        for name in sorted(names.split()):
            if not _VOLUME.match(name):
                continue
            entry = state["volumes"].get(f"{root}/{name}", {})
            volumes.append(
                VolumeInfo(
                    location=f"{root}/{name}",
                    size_mb=entry.get("size_mb"),
                    exported_to=tuple(entry.get("clients", ())),
                )
            )
        return volumes

    @staticmethod
    def _state(encoded: str) -> dict[str, Any]:
        text = _unb64(encoded).strip()
        try:
            state: dict[str, Any] = json.loads(text) if text else {}
        except ValueError as exc:
            raise DriverError(
                f"the NFS export record ({STATE_FILE}) on the server is damaged: {exc}"
            ) from None
        state.setdefault("version", 1)
        state.setdefault("volumes", {})
        return state

    # -- exports -------------------------------------------------------------

    def batch(
        self, requests: Sequence[ExportRequest], wanted: list[tuple[int, str, str]], *, grant: bool
    ) -> dict[int, QrmError]:
        """Apply ``wanted`` (request index, location, client address) in one session;
        errors by request index."""
        from qrm_nfs.driver import NfsStorage

        errors: dict[int, QrmError] = {}
        root = self._root("export a volume" if grant else "unexport a volume")
        c = self.config
        exports_file = c.exports_file if c.server == "kernel" else self._exports_file()
        record_path = f"{root}/{STATE_FILE}"
        candidate = f"{exports_file}.qrm-candidate"
        locations = sorted({location for _, location, _ in wanted})
        probe = "".join(
            f'if [ -d {q(p)} ] && [ ! -L {q(p)} ] && [ "$(realpath {q(p)})" = {q(p)} ]; then echo {q("qrm-dir " + p)}; fi\n'
            for p in locations
        )
        with self.runner.session(timeout=max(60.0, c.reload_timeout * 4)) as session:
            session.send(
                f"set -u\nexec 9>>{q(root + '/' + LOCK_FILE)} && flock -w 60 9 || exit 3\n"
                f"cat {q(record_path)} 2>/dev/null | base64 -w0; echo; echo qrm-record\n"
                f"{probe}{self._running_probe()}echo qrm-probed\n"
            )
            state = self._state(session.until("qrm-record"))
            probed = session.until("qrm-probed").splitlines()
            present = {line[8:] for line in probed if line.startswith("qrm-dir ")}
            if grant and c.server == "ganesha" and "qrm-running" not in probed:
                # As for a local server: no running ganesha, no change at all.
                session.abort()
                raise DriverError(
                    f"cannot export: nfs-ganesha is not running on {self.where} "
                    f"(no live ganesha.nfsd in {self.config.ganesha_pid_file or '(ganesha_pid_file not set)'})"
                )
            changed = False
            for index, location, ip in wanted:
                if grant:
                    if location not in present:
                        errors[index] = NotFound(f"volume {location} does not exist on {self.storage.name}")
                        continue
                    entry = state["volumes"].setdefault(location, {"clients": []})
                    if "export_id" not in entry:
                        taken = {v.get("export_id") for v in state["volumes"].values()}
                        export_id = c.first_export_id
                        while export_id in taken:
                            export_id += 1
                        entry["export_id"] = export_id
                    if ip not in entry["clients"]:
                        entry["clients"] = sorted([*entry["clients"], ip], key=ipaddress.ip_address)
                        changed = True
                else:
                    entry = state["volumes"].get(location)
                    if entry is not None and ip in entry.get("clients", []):
                        entry["clients"] = [x for x in entry["clients"] if x != ip]
                        changed = True
            if not changed:
                session.abort()
                return errors
            exports = NfsStorage._exports(state)
            if c.server == "kernel":
                self._kernel_apply(session, exports_file, record_path, state, exports)
                return errors
            text = ganesha.render(exports)
            ganesha.verify_rendered(text, exports)
            session.send(
                f"printf '%s' {q(_b64(text))} | base64 -d > {q(candidate)} || exit 4\necho qrm-written\n"
            )
            session.until("qrm-written")
            if c.check_config:
                session.send(self._check_script(root, candidate) + "echo qrm-checked\n")
                out = session.until("qrm-checked")
                log_text, _, stderr = out.partition("qrm-log-end\n")
                try:
                    ganesha.analyze_check(_unb64(log_text), stderr, exports)
                except QrmError:
                    session.send(f"rm -f {q(candidate)}\n")
                    session.close()
                    raise
            session.send(
                self._swap_script(candidate, exports_file, record_path, state, grant) + "echo qrm-done\n"
            )
            out = session.until("qrm-done")
            session.close()
        self._reload_outcome(out, grant)
        return errors

    def _kernel_apply(
        self, session: Any, path: str, record_path: str, state: dict[str, Any], exports: list[ganesha.Export]
    ) -> None:
        """``server=kernel``, in the locked session: the exports file swapped in and applied
        by ``exportfs -ra`` (restored if refused); the record saved only once it was accepted."""
        text = kernel.render(exports)
        kernel.verify_rendered(text, exports)
        session.send(kernel.apply_script(path, text) + "echo qrm-kernel-end\n")
        out = session.until("qrm-kernel-end")
        try:
            kernel.outcome(out, "", self.where)
        except QrmError:
            session.close()
            raise
        record = _b64(json.dumps(state, indent=1, sort_keys=True) + "\n")
        session.send(
            f"printf '%s' {q(record)} | base64 -d > {q(record_path + '.new')} && "
            f"mv {q(record_path + '.new')} {q(record_path)} && echo qrm-saved; echo qrm-save-end\n"
        )
        saved = session.until("qrm-save-end")
        session.close()
        if "qrm-saved" not in saved.splitlines():
            raise DriverError(f"the exports of {self.where} are applied but its export record was not saved")

    def _running_probe(self) -> str:
        if self.config.ganesha_pid_file is None:
            return ""
        return (
            f"pid=$(cat {q(self.config.ganesha_pid_file)} 2>/dev/null); "
            'if [ -n "$pid" ] && [ "$(cat /proc/$pid/comm 2>/dev/null)" = ganesha.nfsd ]; then echo qrm-running; fi\n'
        )

    @staticmethod
    def _check_script(root: str, candidate: str) -> str:
        work = f"{root}/{CHECK_DIR}"
        conf = ganesha.check_config_text(candidate, work)
        return (
            f"rm -rf {q(work)} && mkdir -p {q(work + '/recovery')} || exit 5\n"
            f"printf '%s' {q(_b64(conf))} | base64 -d > {q(work + '/check.conf')}\n"
            "unshare --net --mount --propagation private -- sh -c "
            '\'mount -t tmpfs qrm-nfs-check /run && exec "$0" "$@"\' '
            f"ganesha.nfsd -F -f {q(work + '/check.conf')} -L {q(work + '/check.log')} -p {q(work + '/check.pid')} "
            f"2>{q(work + '/check.err')} &\n"
            "cpid=$!; n=0\n"
            "while kill -0 $cpid 2>/dev/null; do\n"
            f"  grep -q 'NFS SERVER INITIALIZED' {q(work + '/check.log')} 2>/dev/null && {{ kill $cpid; break; }}\n"
            "  n=$((n + 1)); [ $n -gt 300 ] && { kill -9 $cpid; break; }; sleep 0.05\n"
            "done; wait $cpid 2>/dev/null\n"
            f"base64 -w0 {q(work + '/check.log')} 2>/dev/null; echo; echo qrm-log-end\n"
            f"tail -n 3 {q(work + '/check.err')} 2>/dev/null; rm -rf {q(work)}\n"
        )

    def _swap_script(
        self, candidate: str, exports_file: str, record_path: str, state: dict[str, Any], grant: bool
    ) -> str:
        c = self.config
        record = _b64(json.dumps(state, indent=1, sort_keys=True) + "\n")
        lines = [
            f"mv {q(candidate)} {q(exports_file)} || exit 6",
            f"printf '%s' {q(record)} | base64 -d > {q(record_path + '.new')} && mv {q(record_path + '.new')} {q(record_path)}",
            f"pid=$(cat {q(c.ganesha_pid_file)} 2>/dev/null)" if c.ganesha_pid_file else "pid=",
            'if [ -z "$pid" ] || [ "$(cat /proc/$pid/comm 2>/dev/null)" != ganesha.nfsd ]; then echo qrm-not-running',
            "else",
        ]
        if c.ganesha_log_file:
            log = q(c.ganesha_log_file)
            steps = int(c.reload_timeout * 10)
            lines += [
                f"  off=$(stat -c %s {log} 2>/dev/null || echo 0)",
                "  kill -HUP $pid && echo qrm-signalled",
                "  n=0",
                f"  while [ $n -lt {steps} ]; do",
                f"    tail -c +$((off + 1)) {log} | grep -q -e 'Reread exports complete' -e 'Error while parsing new configuration file' && break",
                "    n=$((n + 1)); sleep 0.1",
                "  done",
                "  sleep 0.1",
                f"  echo qrm-reload-log; tail -c +$((off + 1)) {log} | base64 -w0; echo",
            ]
        else:
            lines.append("  kill -HUP $pid && echo qrm-signalled")
        lines.append("fi")
        return "\n".join(lines) + "\n"

    def _reload_outcome(self, out: str, grant: bool) -> None:
        if "qrm-not-running" in out:
            if grant:
                raise DriverError(
                    f"the exports of {self.where} are written, but nfs-ganesha is not running there "
                    f"(no live ganesha.nfsd in {self.config.ganesha_pid_file}); they take effect when it starts"
                )
            return
        if "qrm-signalled" not in out:
            raise DriverError(
                f"cannot reload nfs-ganesha on {self.where}: {out.strip()[-200:] or 'no answer'}"
            )
        if "qrm-reload-log" in out:
            text = _unb64(out.split("qrm-reload-log", 1)[1])
            if "Error while parsing new configuration file" in text or "Reread exports complete" not in text:
                problems = ganesha.log_problems(text)
                why = problems[0] if problems else "no confirmation in its log"
                raise DriverError(f"nfs-ganesha on {self.where} could not reload its exports: {why}")
            problems = ganesha.log_problems(text)
            if problems:
                raise DriverError(f"nfs-ganesha on {self.where} could not reload its exports: {problems[0]}")
