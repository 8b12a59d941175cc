"""The kernel NFS server (nfsd) as the ``nfs`` driver's server: an exports file applied by ``exportfs -ra``.

A storage server with the setting ``server=kernel`` is served by the kernel's
nfsd instead of nfs-ganesha. qrm owns one exports file (the storage setting
``exports_file``, default ``/etc/exports.d/qrm.exports``; never the admin's
``/etc/exports``). The export record and its rules are the driver's (one
record, RW for a single machine, RO for all when a volume is shared); this
module only turns those :class:`qrm_nfs.ganesha.Export` values into lines::

    /srv/qrm/nfs/web 10.0.0.5(rw,sync,no_subtree_check,no_root_squash,fsid=1000)

``fsid=`` is the volume's stable Export_Id, so file handles survive a restart
or a move of the export. The text comes from a closed grammar: every path is
held to the safe alphabet of volume locations (no whitespace, quotes,
``#``, parentheses or commas), every client is an IPv4 address, and the
rendered file is read back by :func:`parse_exports` and must give exactly the
intended exports before it is written anywhere (so a line, an option or a
second export cannot be injected).

Applying (:func:`apply_script`, run through the storage runner: this machine
or the server over SSH): the candidate is written next to the file, the old
file kept, the candidate renamed over it and ``exportfs -ra`` run. If
exportfs exits non-zero, the old file comes back (or the file goes away if
there was none), ``exportfs -ra`` runs again and the caller raises one line
with exportfs's own message.

What exportfs checks (nfs-utils 2.6, measured on a kernel without nfsd):
``exportfs -ra`` parses every exports file with no ``/proc/fs/nfsd`` at all,
exits 1 and names file and line for a bad option (``unknown keyword``), a
bad ``fsid``, a broken option list (``syntax error``) or a path that does not
exist (``Failed to stat``), and writes ``/var/lib/nfs/etab`` (what mountd
serves) when the file is good. Serving a mount needs the kernel's nfsd.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Iterable

from qrm_core.plugin_api import DriverError, InvalidInput
from qrm_core.plugin_api import shell_quote as q
from qrm_nfs.ganesha import Export
from qrm_nfs.settings import check_safe_path

SERVERS = ("ganesha", "kernel")
DEFAULT_EXPORTS_FILE = "/etc/exports.d/qrm.exports"
OPTIONS = ("sync", "no_subtree_check", "no_root_squash")
_PATH = re.compile(r"^(/[A-Za-z0-9_][A-Za-z0-9._-]*)+$")
_CLIENT = re.compile(r"^([0-9.]+)\((rw|ro),sync,no_subtree_check,no_root_squash,fsid=([0-9]+)\)$")


def server_kind(settings: object) -> str:
    """``ganesha`` (default) or ``kernel``, from a storage server's settings."""
    get = getattr(settings, "get", None)
    value = str(get("server", "ganesha") if get else "ganesha").strip() or "ganesha"
    if value not in SERVERS:
        raise InvalidInput(f"nfs storage setting server={value!r}: give ganesha or kernel")
    return value


def exports_file(settings: object) -> str:
    """The exports file qrm owns (``exports_file``), checked: a safe absolute path
    ending in ``.exports`` (exportfs reads only those in /etc/exports.d), never /etc/exports."""
    get = getattr(settings, "get", None)
    value = str(get("exports_file", "") if get else "") or DEFAULT_EXPORTS_FILE
    try:
        path = str(check_safe_path(value, "exports_file"))
    except ValueError as exc:
        raise InvalidInput(f"nfs storage setting: {exc}") from None
    if path == "/etc/exports" or not path.endswith(".exports") or path.rsplit("/", 1)[1] == ".exports":
        raise InvalidInput(
            f"nfs storage setting exports_file={value!r}: give a file of its own ending in .exports "
            f"(default {DEFAULT_EXPORTS_FILE}); qrm never writes /etc/exports"
        )
    return path


def _check(export: Export) -> None:
    if not _PATH.match(export.path) or len(export.path) > 1024:
        raise InvalidInput(f"cannot export {export.path!r}: not a safe absolute path for an exports file")
    if export.access not in ("RW", "RO"):
        raise InvalidInput(f"cannot export {export.path}: access {export.access!r} is not RW or RO")
    if not isinstance(export.export_id, int) or not 1 <= export.export_id <= 65535:
        raise InvalidInput(f"cannot export {export.path}: fsid {export.export_id!r} out of range")
    if not export.clients:
        raise InvalidInput(f"cannot export {export.path} to nobody")
    for client in export.clients:
        try:
            ip = ipaddress.ip_address(client)
        except ValueError:
            raise InvalidInput(f"cannot export {export.path} to {client!r}: not an IP address") from None
        if not isinstance(ip, ipaddress.IPv4Address) or str(ip) != client:
            raise InvalidInput(f"cannot export {export.path} to {client!r}: not an IPv4 address")


def render(exports: Iterable[Export]) -> str:
    """The exports file: a header and one line per exported volume."""
    lines = ["# Written by qrm (the nfs storage driver, server=kernel). Do not edit: qrm rewrites it."]
    for export in sorted(exports, key=lambda e: e.path):
        _check(export)
        mode = export.access.lower()
        grants = " ".join(
            f"{client}({mode},{','.join(OPTIONS)},fsid={export.export_id})" for client in export.clients
        )
        lines.append(f"{export.path} {grants}")
    return "\n".join(lines) + "\n"


def parse_exports(text: str) -> list[Export]:
    """Read back a file :func:`render` wrote; anything else is a DriverError."""
    exports = []
    for number, line in enumerate(text.split("\n"), 1):
        if line == "" or (line.startswith("# ") and number == 1):
            continue
        parts = line.split(" ")
        if len(parts) < 2 or not _PATH.match(parts[0]):
            raise DriverError(f"exports file line {number} is not qrm's: {line[:80]!r}")
        clients, modes, fsids = [], set(), set()
        for grant in parts[1:]:
            match = _CLIENT.match(grant)
            if match is None:
                raise DriverError(f"exports file line {number} has a foreign grant {grant[:80]!r}")
            clients.append(match.group(1))
            modes.add(match.group(2))
            fsids.add(int(match.group(3)))
        if len(modes) != 1 or len(fsids) != 1:
            raise DriverError(f"exports file line {number} mixes modes or fsids")
        exports.append(Export(fsids.pop(), parts[0], tuple(clients), modes.pop().upper()))
    return exports


def verify_rendered(text: str, exports: Iterable[Export]) -> None:
    """The rendered text parses back to exactly ``exports`` (one line per volume, nothing more)."""
    want = sorted((e.path, e.export_id, e.access, e.clients) for e in exports)
    got = sorted((e.path, e.export_id, e.access, e.clients) for e in parse_exports(text))
    if want != got or text.count("\n") != len(want) + 1:
        raise DriverError("the generated exports file does not say what was intended; nothing was changed")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def apply_script(path: str, text: str) -> str:
    """Shell: write ``text`` to ``path`` atomically and run ``exportfs -ra``; restore on refusal.

    Prints ``qrm-missing exportfs``, ``qrm-applied`` or ``qrm-rejected`` followed by
    exportfs's messages (base64 on one line)."""
    new, old, err = f"{path}.qrm-new", f"{path}.qrm-old", f"{path}.qrm-err"
    # No "exit": the script also runs inside a longer session (a remote server's batch).
    return (
        "if ! command -v exportfs >/dev/null; then echo 'qrm-missing exportfs'\n"
        f"elif ! {{ printf '%s' {q(_b64(text))} | base64 -d > {q(new)} && chmod 0644 {q(new)}; }}; then\n"
        f"  rm -f {q(new)}; echo qrm-write-failed >&2\n"
        f"else\n  rm -f {q(old)}; if [ -e {q(path)} ]; then cp -p {q(path)} {q(old)}; fi\n"
        f"  mv -f {q(new)} {q(path)}\n"
        f"  if exportfs -ra 2>{q(err)}; then rm -f {q(old)} {q(err)}; echo qrm-applied\n"
        f"  else\n    if [ -e {q(old)} ]; then mv -f {q(old)} {q(path)}; else rm -f {q(path)}; fi\n"
        "    exportfs -ra 2>/dev/null\n"
        f"    echo qrm-rejected; base64 -w0 {q(err)}; echo; rm -f {q(err)}\n  fi\nfi\n"
    )


def exportfs_message(stderr_b64: str) -> str:
    """exportfs's most telling line (an error rather than a warning about defaults)."""
    text = base64.b64decode("".join(stderr_b64.split()) or b"").decode(errors="replace")
    lines = [" ".join(line.split()) for line in text.splitlines() if line.startswith("exportfs:")]
    serious = [
        line
        for line in lines
        if "Neither 'subtree_check'" not in line and "suggest" not in line and "NOTE:" not in line
    ]
    chosen = serious or lines or [" ".join(text.split())]
    return (chosen[0] or "exportfs failed without a message")[:300]


def outcome(stdout: str, stderr: str, where: str) -> None:
    """Raise one line unless :func:`apply_script` printed ``qrm-applied``."""
    lines = stdout.splitlines()
    if "qrm-applied" in lines:
        return
    if "qrm-missing exportfs" in lines:
        raise DriverError(f"NFS storage server {where} lacks exportfs (install nfs-kernel-server there)")
    if "qrm-rejected" in lines:
        after = lines[lines.index("qrm-rejected") + 1 :]
        raise DriverError(
            f"exportfs on {where} refused the new exports (the previous file is back): "
            f"{exportfs_message(after[0] if after else '')}"
        )
    last = [line for line in stderr.splitlines() if line.strip()]
    raise DriverError(f"cannot write the exports file on {where}: {last[-1] if last else 'no answer'}")
