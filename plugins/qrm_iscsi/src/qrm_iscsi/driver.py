"""The ``iscsi`` storage driver: filesystem images are LUNs on a tgt target.

One volume is one target ``<iqn_prefix>:<storage>.<volume>`` with LUN 1, whose
backing store is a file ``<backing_dir>/<volume>.img`` or, where the storage
server has a volume group, the logical volume ``/dev/<vg>/<volume>``. A new
volume holds an empty ext4 filesystem (the node agent brings what it needs to
boot, so an empty image boots).

* **Exports are ACLs.** Exporting a volume to a machine binds the machine's
  initiator name (the stable ``iqn.2026-12.org.qrm:<mac>`` qrm gives each
  resource) to the target; unexporting unbinds it and closes that machine's
  sessions. A target without ACLs lets nobody in.
* **CHAP per image.** Every target has its own incoming account
  ``qrm-<volume>``; its secret is derived from a key qrm keeps
  (``<data_dir>/state/iscsi/chap-<storage>.key``) and the target's name, so
  ``describe_root`` knows it without asking the server. The secret goes to
  the booting machine's agent over its authenticated channel
  (``RootSpec.secrets``), to tgtadm inside a script on standard input, and
  nowhere else: not into logs, events, errors or JSON.
* **Never two machines on a read-write image.** A LUN exported to more than
  one initiator is made read-only (``readonly=1``) before the second one is
  let in, and read-write again when one is left: shared pools mount it
  read-only below an overlay anyway, and a single machine's image can never
  be written by two.
* **Batches.** :meth:`export_volumes` reads tgt's whole state once and applies
  every change in one script (one round trip to the server), each change
  reported on its own line: 1,000 exports take seconds, not minutes.
* **Snapshots as cheap as the backend allows, and saying which.** LUN files:
  copies of the file (copy-on-write where the backing directory reflinks).
  LVM volumes: LVM snapshots, ``<volume>_snap<N>`` tagged ``qrm-label=<label>``,
  their copy-on-write store as big as the volume (they never overflow); a revert
  merges the snapshot (the LUN out of tgt meanwhile) and takes it again. A clone
  of an LVM volume is a new logical volume with a full ``dd`` copy.
* **Here or over SSH.** A storage server with SSH settings is managed on its
  own machine (:mod:`qrm_core.remote`); without, on this one.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets as random
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qrm_core.plugin_api import (
    AlreadyExists,
    CapacityInfo,
    DriverError,
    ExportClient,
    ExportOutcome,
    ExportRequest,
    InvalidInput,
    NotFound,
    QrmError,
    RootSpec,
    Runner,
    RunResult,
    StorageDriver,
    StorageTarget,
    VolumeInfo,
    cow_probe,
    storage_runner,
)
from qrm_core.plugin_api import shell_quote as quote
from qrm_iscsi import tgt
from qrm_iscsi.settings import IscsiSettings, ServerConfig, load, server_config

VOLUME_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")
INITIATOR = re.compile(r"^iqn\.[0-9]{4}-[0-9]{2}\.[a-z0-9][a-z0-9.-]*(:[A-Za-z0-9.:_-]+)?$")
LUN = 1
FSTYPE = "ext4"
#: CHAP secrets: 24 characters of [A-Za-z0-9] (within every initiator's 12-16+ limits).
SECRET_LEN = 24
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Snapshots of a LUN file ``<backing_dir>/<vol>.img``: ``<backing_dir>/.qrm-snapshots/<vol>/<label>.img``.
SNAPSHOTS = ".qrm-snapshots"
#: Where ``read_tree`` mounts a LUN file's filesystem: ``<backing_dir>/.qrm-read/<vol>``.
READING = ".qrm-read"
#: An LVM snapshot of volume ``<vol>`` is the logical volume ``<vol>_snap<N>`` (``_`` is never in
#: a volume's name, so it cannot clash with one; ``N`` grows, so the order is the age) tagged
#: ``qrm-label=<label>`` (a label's characters are all allowed in LVM tags).
LVM_SNAPSHOT = "_snap"
LVM_LABEL_TAG = "qrm-label="


def check_volume_name(name: str) -> str:
    if not isinstance(name, str) or not VOLUME_NAME.match(name) or name.endswith(".img"):
        raise InvalidInput(
            f"invalid iSCSI volume name {name!r}: use 1-63 lower-case letters, digits, '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_initiator(client: ExportClient, location: str) -> str:
    initiator = client.initiator
    if not initiator or len(initiator) > 223 or not INITIATOR.match(initiator):
        raise InvalidInput(f"cannot export {location} to {client.mac}: no valid iSCSI initiator name")
    return initiator


def _ipv4(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise InvalidInput(f"iSCSI storage address {address!r} is not an IP address") from None
    if not isinstance(ip, ipaddress.IPv4Address) or ip.is_unspecified or ip.is_multicast:
        raise InvalidInput(
            f"iSCSI storage address {address} must be an IPv4 address booting machines can reach"
        )
    return str(ip)


def _base62(data: bytes, length: int) -> str:
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    number = int.from_bytes(data, "big")
    out = []
    for _ in range(length):
        number, digit = divmod(number, 62)
        out.append(alphabet[digit])
    return "".join(out)


class IscsiStorage(StorageDriver):
    """iSCSI LUNs served by tgt (file- or LVM-backed), here or on a server reached over SSH."""

    name = "iscsi"
    description = "iSCSI LUNs on a tgt target (files or LVM), on this machine or over SSH"

    def __init__(self, settings: Any, iscsi: IscsiSettings | None = None) -> None:
        """``iscsi`` overrides the plugin settings read from the environment (tests)."""
        super().__init__(settings)
        self._iscsi = iscsi

    # -- configuration -----------------------------------------------------

    @property
    def iscsi(self) -> IscsiSettings:
        if self._iscsi is None:
            self._iscsi = load()
        return self._iscsi

    def _config(self, storage: StorageTarget) -> ServerConfig:
        return server_config(self.iscsi, storage.settings)

    def _runner(self, storage: StorageTarget) -> Runner:
        return storage_runner(self.settings, storage)

    def _where(self, storage: StorageTarget) -> str:
        runner = self._runner(storage)
        return storage.name if runner.where == "this machine" else f"{storage.name} ({runner.where})"

    @staticmethod
    def _storage_id(storage: StorageTarget) -> str:
        return re.sub(r"[^a-z0-9.-]", "-", storage.name.lower()).strip("-.") or "storage"

    def target_name(self, storage: StorageTarget, volume: str) -> str:
        """The IQN of a volume's target."""
        return f"{self._config(storage).iqn_prefix}:{self._storage_id(storage)}.{check_volume_name(volume)}"

    @staticmethod
    def account(volume: str) -> str:
        return f"qrm-{volume}"

    def _backing(self, config: ServerConfig, volume: str, doing: str) -> str:
        if config.volume_group:
            return f"/dev/{config.volume_group}/{volume}"
        if config.backing_dir:
            return f"{config.backing_dir}/{volume}.img"
        raise DriverError(
            f"cannot {doing}: the iSCSI storage server has no backing_dir or volume_group; set one with "
            "'qrm storage set NAME --setting backing_dir=/srv/iscsi' (or QRM_ISCSI_BACKING_DIR)"
        )

    def _lock(self, config: ServerConfig) -> str:
        return f"{config.state_dir}/lock"

    # -- CHAP --------------------------------------------------------------

    def _chap_key(self, storage: StorageTarget) -> bytes:
        """The key CHAP secrets of this storage server derive from (made on first use)."""
        directory = Path(self.settings.state_dir) / "iscsi"
        path = directory / f"chap-{storage.name}.key"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes()  # another process made it meanwhile
        with os.fdopen(fd, "wb") as handle:
            handle.write(random.token_bytes(32))
        return path.read_bytes()

    def chap_secret(self, storage: StorageTarget, volume: str) -> str:
        digest = hmac.new(self._chap_key(storage), self.target_name(storage, volume).encode(), hashlib.sha256)
        return _base62(digest.digest(), SECRET_LEN)

    # -- pure operations ---------------------------------------------------

    def validate_server(self, storage: StorageTarget) -> None:
        _ipv4(storage.address)
        self._config(storage)

    def validate_location(self, storage: StorageTarget, location: str) -> None:
        check_volume_name(location)

    def describe_root(
        self,
        storage: StorageTarget,
        location: str,
        client: ExportClient | None = None,
        *,
        shared: bool = False,
    ) -> RootSpec:
        """``qrm.iscsi=ADDR:PORT:1:TARGET qrm.initiator=IQN rootfstype=ext4 rw`` (``ro
        qrm.overlay=tmpfs`` when shared); the CHAP account in ``secrets``."""
        address = _ipv4(storage.address)
        target = self.target_name(storage, location)
        args = [f"qrm.iscsi={address}:{self._config(storage).portal_port}:{LUN}:{target}"]
        if client is not None and client.initiator:
            args.append(f"qrm.initiator={check_initiator(client, location)}")
        args += [f"rootfstype={FSTYPE}", *(("ro", "qrm.overlay=tmpfs") if shared else ("rw",))]
        return RootSpec(
            kernel_args=tuple(args),
            description=f"iscsi {target} on {address} LUN {LUN}"
            + (" (read-only, overlay)" if shared else ""),
            kind="iscsi",
            options={"target": target, "lun": str(LUN), "fstype": FSTYPE},
            secrets={
                "chap_username": self.account(location),
                "chap_password": self.chap_secret(storage, location),
            },
        )

    def detect_missing_dependencies(self) -> list[str]:
        return [] if shutil.which("sh") else ["sh"]

    # -- reading the server --------------------------------------------------

    def _run(
        self, storage: StorageTarget, script: str, *, secrets: Sequence[str] = (), timeout: float = 300
    ) -> RunResult:
        return self._runner(storage).script(script, timeout=timeout, secrets=secrets)

    def _show(self, storage: StorageTarget, config: ServerConfig) -> dict[str, tgt.Target]:
        done = self._run(
            storage, f"tgtadm -C {config.tgt_control_port} --lld iscsi --op show --mode target\n"
        )
        if not done.ok:
            raise DriverError(f"tgt on {self._where(storage)} does not answer: {done.last_error()}")
        return tgt.parse_targets(done.stdout)

    def check_server(self, storage: StorageTarget) -> None:
        """tgtd answers, the backing directory or volume group exists, mkfs.ext4 and flock are there."""
        config = self._config(storage)
        lines = [
            "set -u",
            "for c in tgtadm mkfs.ext4 flock; do command -v $c >/dev/null || "
            '{ echo "qrm-missing $c"; exit 0; }; done',
        ]
        lines.append(
            f"tgtadm -C {config.tgt_control_port} --lld iscsi --op show --mode target >/dev/null 2>&1 "
            "|| { echo qrm-no-tgtd; exit 0; }"
        )
        if config.volume_group:
            lines.append(f"vgs {quote(config.volume_group)} >/dev/null 2>&1 || {{ echo qrm-no-vg; exit 0; }}")
        elif config.backing_dir:
            lines.append(
                f"test -d {quote(config.backing_dir)} -a -w {quote(config.backing_dir)} || {{ echo qrm-no-dir; exit 0; }}"
            )
        else:
            self._backing(config, "x", "use it")
        lines.append("echo qrm-ready")
        done = self._run(storage, "\n".join(lines) + "\n", timeout=60)
        out = done.stdout.strip().splitlines()
        said = out[-1] if out else ""
        where = self._where(storage)
        if said.startswith("qrm-missing "):
            program = said.split()[1]
            package = {"tgtadm": "tgt", "mkfs.ext4": "e2fsprogs", "flock": "util-linux"}[program]
            raise DriverError(f"iSCSI storage server {where} lacks {program} (install {package} there)")
        if said == "qrm-no-tgtd":
            raise DriverError(
                f"tgtd is not running on {where} (tgtadm -C {config.tgt_control_port} gets no answer)"
            )
        if said == "qrm-no-vg":
            raise DriverError(f"iSCSI storage server {where} has no volume group {config.volume_group}")
        if said == "qrm-no-dir":
            raise DriverError(f"iSCSI storage server {where} has no writable directory {config.backing_dir}")
        if said != "qrm-ready":
            raise DriverError(f"cannot check iSCSI storage server {where}: {done.last_error()}")

    # -- volumes -----------------------------------------------------------

    def _target_steps(
        self, script: tgt.Script, storage: StorageTarget, config: ServerConfig, volume: str, path: str
    ) -> list[str]:
        """Commands that create a volume's target, LUN and CHAP account (``$tid``: a free id)."""
        target = self.target_name(storage, volume)
        user = self.account(volume)
        show = f"tgtadm -C {config.tgt_control_port} --lld iscsi --op show"
        return [
            f"tid=$({show} --mode target | sed -n 's/^Target \\([0-9]*\\):.*/\\1/p' | sort -n | tail -n 1)",
            "tid=$((${tid:-0} + 1))",
            script.tgtadm("--op", "new", "--mode", "target", "--tid", tgt.Raw('"$tid"'), "-T", target),
            script.tgtadm(
                "--op", "new", "--mode", "logicalunit", "--tid", tgt.Raw('"$tid"'), "--lun", LUN, "-b", path
            ),
            f"{{ {show} --mode account | grep -qx {quote('    ' + user)} || "
            + script.tgtadm(
                "--op",
                "new",
                "--mode",
                "account",
                "--user",
                user,
                "--password",
                self.chap_secret(storage, volume),
            )
            + "; }",
            script.tgtadm("--op", "bind", "--mode", "account", "--tid", tgt.Raw('"$tid"'), "--user", user),
        ]

    def create_volume(self, storage: StorageTarget, name: str, size_mb: int) -> VolumeInfo:
        """A LUN of ``size_mb`` holding an empty ext4 filesystem, with its target and account
        (no ACL: nobody may log in until it is exported)."""
        check_volume_name(name)
        if not isinstance(size_mb, int) or size_mb <= 0:
            raise InvalidInput("volume size must be a positive number of MB")
        config = self._config(storage)
        path = self._backing(config, name, "create a volume")
        target = self.target_name(storage, name)
        script = tgt.Script(config.tgt_control_port, self._lock(config))
        if config.volume_group:
            # LVM warns of the lock's descriptor on every call; that is no error.
            script.raw("export LVM_SUPPRESS_FD_WARNINGS=1")
        label = f"qrm-{name}"[:16]
        if config.volume_group:
            vg = config.volume_group
            make = [
                f"! lvs {quote(vg + '/' + name)} >/dev/null 2>&1 || {{ echo 'qrm-exists'; false; }}",
                f"lvcreate -q -y -n {quote(name)} -L {size_mb}m {quote(vg)} >/dev/null",
                f"mkfs.ext4 -q -F -L {quote(label)} {quote(path)}",
            ]
            undo = [f"lvremove -q -f {quote(vg + '/' + name)} >/dev/null 2>&1"]
        else:
            directory = config.backing_dir
            assert directory is not None
            make = [
                f"test -d {quote(directory)} || {{ echo 'no directory {directory}'; false; }}",
                f"! test -e {quote(path)} || {{ echo 'qrm-exists'; false; }}",
                f"free=$(df -Pk {quote(directory)} | awk 'NR == 2 {{ print int($4 / 1024) }}')",
                f'test "${{free:-0}}" -ge {size_mb} || {{ echo "only $free MB free in {directory}"; false; }}',
                f"truncate -s {size_mb}M {quote(path)}",
                f"mkfs.ext4 -q -F -L {quote(label)} {quote(path)}",
            ]
            undo = [f"rm -f {quote(path)}"]
        unused = (
            f"! tgtadm -C {config.tgt_control_port} --lld iscsi --op show --mode target "
            f"| grep -q -- {quote(': ' + target + '$')} || {{ echo 'qrm-target-exists'; false; }}"
        )
        script.step("volume", [unused, *make])
        script.step(
            "target", self._target_steps(script, storage, config, name, path), requires=["volume"], undo=undo
        )
        done = self._run(storage, script.text(), secrets=[self.chap_secret(storage, name)])
        found = tgt.outcomes(done.stdout)
        where = self._where(storage)
        problem = script.problem(found, "target")
        if problem is not None:
            if "qrm-exists" in problem or "qrm-target-exists" in problem:
                raise AlreadyExists(f"volume {name} already exists on {storage.name}")
            raise DriverError(f"cannot create volume {name} on {where}: {problem}")
        return VolumeInfo(location=name, size_mb=size_mb)

    def remove_volume(self, storage: StorageTarget, location: str) -> None:
        """Delete the target, its account and the LUN's data, with the volume's snapshots.
        Refused while exported."""
        check_volume_name(location)
        config = self._config(storage)
        path = self._backing(config, location, "remove a volume")
        live = self._show(storage, config).get(self.target_name(storage, location))
        if live is not None and live.acl:
            raise DriverError(f"volume {location} is still exported to {', '.join(live.acl)}")
        script = tgt.Script(config.tgt_control_port, self._lock(config))
        if config.volume_group:
            # LVM warns of the lock's descriptor on every call; that is no error.
            script.raw("export LVM_SUPPRESS_FD_WARNINGS=1")
        exists = (
            f"test -e {quote(path)}"
            if not config.volume_group
            else f"lvs {quote(config.volume_group + '/' + location)} >/dev/null 2>&1"
        )
        script.step("exists", [f"{exists} || {{ echo qrm-missing; false; }}"])
        steps = []
        if live is not None:
            steps.append(script.tgtadm("--op", "delete", "--mode", "target", "--tid", live.tid))
        user = self.account(location)
        steps.append(
            f"{{ ! tgtadm -C {config.tgt_control_port} --lld iscsi --op show --mode account | grep -qx {quote('    ' + user)} || "
            + script.tgtadm("--op", "delete", "--mode", "account", "--user", user)
            + "; }"
        )
        # A read-only mount a clone left behind (read_tree without release_tree: a crash).
        reading = quote(self._reading(config, location))
        steps.append(
            f"while mountpoint -q {reading}; do umount {reading} || break; done; "
            f"! mountpoint -q {reading} && {{ rmdir {reading} 2>/dev/null || true; }}"
        )
        if config.volume_group:
            # Its snapshots first (every LV whose origin it is), each by name: none is left behind.
            vg = quote(config.volume_group)
            steps.append(
                f"snaps=$(lvs -a --noheadings --separator '|' -o lv_name,origin {vg}"
                f" | awk -F'|' -v o={quote(location)} "
                + quote('$2 == o { sub(/^ +/, "", $1); gsub(/[][]/, "", $1); print $1 }')
                + ") && ok=1 && for s in $snaps; do "
                f'lvremove -q -f {vg}/"$s" >/dev/null </dev/null || ok=0; done && [ "$ok" = 1 ]'
            )
            steps.append(
                f"lvremove -q -f {quote(config.volume_group + '/' + location)} >/dev/null </dev/null"
            )
        else:
            steps.append(f"rm -f {quote(path)}")
        script.step("remove", steps, requires=["exists"])
        done = self._run(storage, script.text())
        found = tgt.outcomes(done.stdout)
        problem = script.problem(found, "remove")
        if problem is not None and "qrm-missing" in problem:
            raise NotFound(f"volume {location} does not exist on {storage.name}")
        if problem is not None:
            raise DriverError(f"cannot remove volume {location} on {self._where(storage)}: {problem}")
        extra = [self._staging(config, location)]
        if config.backing_dir:
            extra.append(f"{config.backing_dir}/{SNAPSHOTS}/{location}")
        self._run(storage, "".join(f"rm -rf -- {quote(path)}\n" for path in extra))

    def list_volumes(self, storage: StorageTarget) -> list[VolumeInfo]:
        config = self._config(storage)
        if config.volume_group:
            lister = (
                f"lvs --noheadings --units m --nosuffix -o lv_name,lv_size {quote(config.volume_group)} 2>&1"
            )
        else:
            directory = self._backing(config, "x", "list volumes").rsplit("/", 1)[0]
            lister = (
                f'cd {quote(directory)} && for f in *.img; do if [ -f "$f" ]; then '
                'echo "${f%.img} $(( $(stat -c %s "$f") / 1048576 ))"; fi; done'
            )
        done = self._run(storage, lister + "\n")
        if not done.ok:
            raise DriverError(f"cannot list the volumes of {self._where(storage)}: {done.last_error()}")
        live = self._show(storage, config)
        volumes = []
        for line in done.stdout.splitlines():
            parts = line.split()
            if len(parts) != 2 or not VOLUME_NAME.match(parts[0]):
                continue
            size = int(float(parts[1]))
            target = live.get(self.target_name(storage, parts[0]))
            volumes.append(
                VolumeInfo(location=parts[0], size_mb=size, exported_to=tuple(target.acl if target else ()))
            )
        return sorted(volumes, key=lambda v: v.location)

    def capacity(self, storage: StorageTarget) -> CapacityInfo:
        """A volume group's size and free space; for files, the filesystem's, with the room
        the LUN files may still grow into (they are sparse) not counted as free."""
        config = self._config(storage)
        if config.volume_group:
            probe = f"vgs --noheadings --units m --nosuffix -o vg_size,vg_free {quote(config.volume_group)}"
        else:
            directory = self._backing(config, "x", "report capacity").rsplit("/", 1)[0]
            probe = (
                f"cd {quote(directory)} || exit 3\n"
                "promised=0\n"
                'for f in *.img; do if [ -f "$f" ]; then set -- $(stat -c "%s %b %B" "$f"); '
                "promised=$((promised + $1 - $2 * $3)); fi; done\n"
                'df -Pk . | awk -v p="$promised" \'NR == 2 { f = int(($4 * 1024 - p) / 1048576); '
                "print int($2 / 1024), (f < 0 ? 0 : f) }'"
            )
        done = self._run(storage, probe + "\n")
        parts = done.stdout.split()
        if not done.ok or len(parts) != 2:
            raise DriverError(f"cannot read the capacity of {self._where(storage)}: {done.last_error()}")
        total, free = (int(float(p)) for p in parts)
        return CapacityInfo(total_mb=total, free_mb=free, volumes=len(self.list_volumes(storage)))

    # -- exports -----------------------------------------------------------

    def export_volume(self, storage: StorageTarget, location: str, client: ExportClient) -> None:
        (outcome,) = self.export_volumes(storage, [ExportRequest(location, client)])
        if outcome.error is not None:
            raise outcome.error

    def unexport_volume(self, storage: StorageTarget, location: str, client: ExportClient) -> None:
        (outcome,) = self.unexport_volumes(storage, [ExportRequest(location, client)])
        if outcome.error is not None:
            raise outcome.error

    def export_volumes(
        self, storage: StorageTarget, requests: Sequence[ExportRequest]
    ) -> list[ExportOutcome]:
        """Let each request's machine log in to its volume's target: its initiator bound to the
        target's ACL; a LUN with more than one initiator is read-only first. One round trip
        to read tgt's state, one to change it."""
        return self._batch(storage, requests, grant=True)

    def unexport_volumes(
        self, storage: StorageTarget, requests: Sequence[ExportRequest]
    ) -> list[ExportOutcome]:
        """Take each request's machine off its volume's ACL and close its sessions there."""
        return self._batch(storage, requests, grant=False)

    def _batch(
        self, storage: StorageTarget, requests: Sequence[ExportRequest], *, grant: bool
    ) -> list[ExportOutcome]:
        errors: dict[int, Exception] = {}
        by_volume: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for index, request in enumerate(requests):
            try:
                check_volume_name(request.location)
                by_volume[request.location].append((index, check_initiator(request.client, request.location)))
            except InvalidInput as exc:
                errors[index] = exc
        if by_volume:
            try:
                config = self._config(storage)
                live = self._show(storage, config)
                found = self._apply(storage, config, live, by_volume, grant)
            except (DriverError, InvalidInput) as exc:
                for members in by_volume.values():
                    for index, _ in members:
                        errors[index] = exc
            else:
                for members in by_volume.values():
                    for index, _ in members:
                        if found.get(index) is not None:
                            errors[index] = found[index]  # type: ignore[assignment]
        return [
            ExportOutcome(request, errors.get(i))  # type: ignore[arg-type]
            for i, request in enumerate(requests)
        ]

    def _apply(
        self,
        storage: StorageTarget,
        config: ServerConfig,
        live: dict[str, tgt.Target],
        by_volume: dict[str, list[tuple[int, str]]],
        grant: bool,
    ) -> dict[int, DriverError | None]:
        script = tgt.Script(config.tgt_control_port, self._lock(config))
        keys: dict[int, str] = {}  # request index -> step key (or "" when nothing to do)
        secrets: list[str] = []
        for number, (volume, members) in enumerate(sorted(by_volume.items())):
            target = live.get(self.target_name(storage, volume))
            acl = set(target.acl) if target else set()
            wanted = {initiator for _, initiator in members}
            requires: list[str] = []
            tid: tgt.Raw | int
            if grant:
                if target is None:
                    # A volume qrm did not create (imported), or a tgtd that restarted: make its target.
                    path = self._backing(config, volume, "export a volume")
                    check = f"test -e {quote(path)} || {{ echo 'no volume {volume} (no {path})'; false; }}"
                    script.step(
                        f"t{number}",
                        [
                            check,
                            *self._target_steps(script, storage, config, volume, path),
                            f"tid{number}=$tid",
                        ],
                    )
                    secrets.append(self.chap_secret(storage, volume))
                    requires.append(f"t{number}")
                    tid = tgt.Raw(f'"$tid{number}"')
                    readonly = False
                else:
                    tid = target.tid
                    readonly = bool(target.luns.get(LUN) and target.luns[LUN].readonly)
                if len(acl | wanted) > 1 and not readonly:
                    script.step(
                        f"ro{number}",
                        [
                            script.tgtadm(
                                "--op",
                                "update",
                                "--mode",
                                "logicalunit",
                                "--tid",
                                tid,
                                "--lun",
                                LUN,
                                "--params",
                                "readonly=1",
                            )
                        ],
                        requires=requires,
                    )
                    requires = [*requires, f"ro{number}"]
                done_here: set[str] = set()
                for index, initiator in members:
                    if initiator in acl or initiator in done_here:
                        keys[index] = ""  # already allowed: idempotent
                        continue
                    done_here.add(initiator)
                    key = f"b{index}"
                    script.step(
                        key,
                        [script.tgtadm("--op", "bind", "--mode", "target", "--tid", tid, "-Q", initiator)],
                        requires=requires,
                    )
                    keys[index] = key
            else:
                if target is None:
                    for index, _ in members:
                        keys[index] = ""
                    continue
                for index, initiator in members:
                    commands = []
                    if initiator in acl:
                        commands.append(
                            script.tgtadm(
                                "--op", "unbind", "--mode", "target", "--tid", target.tid, "-Q", initiator
                            )
                        )
                    for session in target.sessions:
                        if session.initiator == initiator:
                            for cid in session.connections:
                                commands.append(
                                    script.tgtadm(
                                        "--op",
                                        "delete",
                                        "--mode",
                                        "conn",
                                        "--tid",
                                        target.tid,
                                        "--sid",
                                        session.sid,
                                        "--cid",
                                        cid,
                                    )
                                    + " || true"
                                )
                    if not commands:
                        keys[index] = ""
                        continue
                    key = f"u{index}"
                    script.step(key, commands)
                    keys[index] = key
                left = acl - wanted
                lun = target.luns.get(LUN)
                if len(left) <= 1 and lun is not None and lun.readonly:
                    script.step(
                        f"rw{number}",
                        [
                            script.tgtadm(
                                "--op",
                                "update",
                                "--mode",
                                "logicalunit",
                                "--tid",
                                target.tid,
                                "--lun",
                                LUN,
                                "--params",
                                "readonly=0",
                            )
                        ],
                        requires=[keys[i] for i, _ in members if keys.get(i)],
                    )
        if not any(keys.values()):
            return {index: None for index in keys}
        script.raw(
            f"mkdir -p {quote(config.state_dir)} && tgtadm -C {config.tgt_control_port} --lld iscsi "
            f"--op show --mode target > {quote(config.state_dir + '/targets.show')} 2>/dev/null || true"
        )
        done = self._run(storage, script.text(), secrets=secrets)
        found = tgt.outcomes(done.stdout)
        where = self._where(storage)
        result: dict[int, DriverError | None] = {}
        verb = "export" if grant else "withdraw"
        for volume, members in by_volume.items():
            for index, initiator in members:
                step = keys.get(index)
                if step is None:
                    continue
                if step == "":
                    result[index] = None
                    continue
                problem: str | None = script.problem(found, step)
                if problem == "the storage server did not say" and not done.ok:
                    problem = done.last_error()
                if problem is None:
                    result[index] = None
                else:
                    result[index] = DriverError(
                        f"cannot {verb} iSCSI volume {volume} to {initiator} on {where}: {problem}"
                    )
        return result

    # -- filling, cloning, snapshots -----------------------------------------

    def _volume(self, storage: StorageTarget, location: str) -> tuple[ServerConfig, str]:
        check_volume_name(location)
        config = self._config(storage)
        return config, self._backing(config, location, "use a volume")

    @staticmethod
    def _label(label: str) -> str:
        if not isinstance(label, str) or not LABEL.match(label):
            raise InvalidInput(f"snapshot label {label!r} must be 1-64 letters, digits, '.', '_' or '-'")
        return label

    @staticmethod
    def _staging(config: ServerConfig, volume: str) -> str:
        base = f"{config.backing_dir}/.qrm-fill" if config.backing_dir else f"{config.state_dir}/fill"
        return f"{base}/{volume}"

    @staticmethod
    def _reading(config: ServerConfig, volume: str) -> str:
        """Where :meth:`read_tree` mounts a volume's filesystem read-only."""
        base = f"{config.backing_dir}/{READING}" if config.backing_dir else f"{config.state_dir}/read"
        return f"{base}/{volume}"

    @staticmethod
    def _unmount(mountpoint: str) -> str:
        """Shell: unmount whatever is mounted on ``mountpoint`` (stacked mounts too) and
        remove the directory; a failure prints ``qrm-failed`` and ends the script."""
        q = quote(mountpoint)
        return (
            f"while mountpoint -q {q} 2>/dev/null; do\n"
            f"  if ! err=$(umount {q} 2>&1); then "
            f'echo "qrm-failed cannot unmount {mountpoint}: $(printf %s "$err" | head -n 1)"; exit 0; fi\n'
            "done\n"
            f"rmdir {q} 2>/dev/null || ! test -e {q} || "
            f"{{ echo 'qrm-failed cannot remove the directory {mountpoint}'; exit 0; }}\n"
        )

    def _said(self, storage: StorageTarget, script: str, location: str, label: str | None = None) -> str:
        done = self._run(storage, "set -u\n" + script, timeout=6 * 3600)
        lines = [line for line in done.stdout.splitlines() if line.startswith("qrm-")]
        said = lines[-1] if lines else ""
        if said == "qrm-missing":
            raise NotFound(f"volume {location} does not exist on {storage.name}")
        if said == "qrm-no-snapshot":
            raise NotFound(f"volume {location} has no snapshot {label!r}")
        if said == "qrm-exists":
            raise DriverError(f"volume {location} already has a snapshot {label!r}")
        if said.startswith("qrm-failed"):
            raise DriverError(f"iSCSI storage {self._where(storage)}: {said[11:] or 'the operation failed'}")
        if not said.startswith("qrm-done"):
            raise DriverError(f"iSCSI storage {self._where(storage)}: {done.last_error()}")
        return said[9:].strip()

    @staticmethod
    def _copy_file(src: str, dest: str) -> str:
        """Copy a LUN file (copy-on-write or sparse; ``$cpopt`` from ``cow_probe``)."""
        return (
            f"if ! err=$(cp $cpopt -- {quote(src)} {quote(dest)} 2>&1); then "
            'echo "qrm-failed $(printf %s "$err" | tail -n 1)"; exit 0; fi\n'
        )

    def open_tree(self, storage: StorageTarget, location: str) -> str:
        """A staging directory on the server, kept until :meth:`close_tree` (a capture
        that was interrupted goes on in it)."""
        check_volume_name(location)
        config = self._config(storage)
        path = self._backing(config, location, "fill a volume")
        staging = self._staging(config, location)
        exists = f"test -e {quote(path)}"
        self._said(
            storage,
            f"{exists} || {{ echo qrm-missing; exit 0; }}\nmkdir -p -m 0755 -- {quote(staging)} || exit 3\necho qrm-done\n",
            location,
        )
        return staging

    def read_tree(self, storage: StorageTarget, location: str) -> str:
        """The volume's ext4 filesystem mounted read-only on the storage server (a LUN file
        through a loop device, an LVM volume directly; ``noload``: no journal replay, so
        nothing is written to the volume; ``nosuid,nodev,noexec``: what is inside only
        shows, it never runs), under ``<backing_dir>/.qrm-read/<volume>`` (or
        ``<state_dir>/read/<volume>``). Owners, modes, setuid bits, hard links and device
        nodes are there as they are in the volume. A mount left there by an earlier clone
        that was interrupted is unmounted first. :meth:`release_tree` unmounts it."""
        check_volume_name(location)
        config = self._config(storage)
        path = self._backing(config, location, "read a volume")
        mountpoint = self._reading(config, location)
        exists = f"test -b {quote(path)}" if config.volume_group else f"test -f {quote(path)}"
        options = "ro,noload,nosuid,nodev,noexec" + ("" if config.volume_group else ",loop")
        script = (
            f"{exists} || {{ echo qrm-missing; exit 0; }}\n"
            + self._unmount(mountpoint)
            + f"mkdir -p -m 0700 -- {quote(mountpoint)} || "
            f"{{ echo 'qrm-failed cannot make the directory {mountpoint}'; exit 0; }}\n"
            f"if ! err=$(mount -t {FSTYPE} -o {options} {quote(path)} {quote(mountpoint)} 2>&1 </dev/null); then\n"
            f"  rmdir {quote(mountpoint)} 2>/dev/null\n"
            f'  echo "qrm-failed cannot mount volume {location} read-only: $(printf %s "$err" | head -n 1)"; exit 0\n'
            "fi\n"
            "echo qrm-done\n"
        )
        self._said(storage, script, location)
        return mountpoint

    def release_tree(self, storage: StorageTarget, location: str, tree: str) -> None:
        """Unmount what :meth:`read_tree` mounted (the loop device goes with it: mount
        made it with autoclear) and remove the mountpoint. Nothing mounted: nothing to do."""
        check_volume_name(location)
        config = self._config(storage)
        mountpoint = self._reading(config, location)
        if tree != mountpoint:
            raise InvalidInput(f"{tree} is not where iSCSI volume {location} is read")
        self._said(storage, self._unmount(mountpoint) + "echo qrm-done\n", location)

    def close_tree(self, storage: StorageTarget, location: str, tree: str) -> str:
        """An ext4 filesystem made from the staged files (``mkfs.ext4 -d``: owners, modes,
        hard links and extended attributes kept) over the LUN; the staging goes."""
        check_volume_name(location)
        config = self._config(storage)
        path = self._backing(config, location, "fill a volume")
        staging = self._staging(config, location)
        if tree != staging:
            raise InvalidInput(f"{tree} is not the staging directory of iSCSI volume {location}")
        label = f"qrm-{location}"[:16]
        size = f"blockdev --getsize64 {quote(path)}" if config.volume_group else f"stat -c %s {quote(path)}"
        script = (
            f"test -d {quote(staging)} || {{ echo qrm-missing; exit 0; }}\n"
            f"used=$(du -sm -- {quote(staging)} | cut -f1); size=$(( $({size}) / 1048576 ))\n"
            f"if ! err=$(mkfs.ext4 -q -F -L {quote(label)} -d {quote(staging)} {quote(path)} 2>&1); then\n"
            f"  mkfs.ext4 -q -F -L {quote(label)} {quote(path)} >/dev/null 2>&1\n"
            '  case "$err" in *"allocate"*|*"No space"*|*"too small"*|*"Could not"*) '
            'echo "qrm-failed the $size MB volume is too small for the files ($used MB)";; '
            '*) echo "qrm-failed mkfs.ext4: $(printf %s "$err" | tail -n 1)";; esac; exit 0\n'
            "fi\n"
            f"rm -rf -- {quote(staging)}\n"
            'echo "qrm-done $used $size"\n'
        )
        used, size_mb = self._said(storage, script, location).split()
        return f"an ext4 filesystem of {size_mb} MB made from the files ({used} MB)"

    def clone_volume(self, storage: StorageTarget, location: str, name: str) -> VolumeInfo:
        """A new volume (its own target and CHAP account) holding a copy of ``location``'s
        data: for LUN files a copy of the file, copy-on-write where the backing directory's
        filesystem can; for LVM volumes a new logical volume that ``dd`` fills with the
        whole of the source (an LVM snapshot is not a volume of its own: it goes when its
        origin goes, and every write to either costs a copy)."""
        check_volume_name(name)
        config, path = self._volume(storage, location)
        if config.volume_group:
            vg = config.volume_group
            probe = f"lvs --noheadings --units b --nosuffix -o lv_size {quote(vg + '/' + location)} 2>/dev/null || echo missing\n"
        else:
            probe = f"stat -c %s {quote(path)} 2>/dev/null || echo missing\n"
        found = self._run(storage, probe).stdout.strip()
        if not found.isdigit():
            raise NotFound(f"volume {location} does not exist on {storage.name}")
        size_mb = max(1, -(-int(found) // (1 << 20)))
        try:
            info = self.create_volume(storage, name, size_mb)
        except AlreadyExists:
            raise DriverError(f"a volume named {name} already exists on {storage.name}") from None
        new = self._backing(config, name, "clone a volume")
        if config.volume_group:
            copy = (
                f"if ! err=$(dd if={quote(path)} of={quote(new)} bs=4M conv=notrunc,fsync status=none 2>&1); then "
                'echo "qrm-failed dd: $(printf %s "$err" | tail -n 1)"; exit 0; fi\n'
                "echo 'qrm-done full copy (dd)'\n"
            )
        else:
            copy = (
                cow_probe(config.backing_dir or "/tmp")
                + "\n"
                + self._copy_file(path, new)
                + 'echo "qrm-done $how"\n'
            )
        try:
            how = self._said(storage, copy, location)
        except QrmError:
            self.remove_volume(storage, name)
            raise
        return VolumeInfo(location=info.location, size_mb=size_mb, how=how)

    # -- LVM snapshots ---------------------------------------------------------

    def _lvm_head(self, config: ServerConfig) -> str:
        """Shell: what every LVM snapshot script starts with: C messages, no file
        descriptor warnings, and the storage server's lock (tgt changes take it too)."""
        lock = self._lock(config)
        return (
            "export LC_ALL=C LVM_SUPPRESS_FD_WARNINGS=1\n"
            # The last line of a message, without the indent LVM gives its messages.
            "last() { printf %s \"$1\" | tail -n 1 | sed 's/^ *//'; }\n"
            f"mkdir -p {quote(config.state_dir)} 2>/dev/null\n"
            f"exec 9>>{quote(lock)} || {{ echo 'qrm-failed cannot open the lock file {lock}'; exit 0; }}\n"
            "flock -w 60 9 || { echo 'qrm-failed cannot lock the storage server (flock)'; exit 0; }\n"
        )

    @staticmethod
    def _lvm_exists(vg: str, volume: str) -> str:
        return f"lvs {quote(vg + '/' + volume)} >/dev/null 2>&1 || {{ echo qrm-missing; exit 0; }}\n"

    @staticmethod
    def _lvm_find(vg: str, volume: str, label: str) -> str:
        """Shell: ``snap`` set to the name of ``volume``'s snapshot labelled ``label``
        (empty without one). ``-a``: a snapshot whose merge is pending is hidden otherwise."""
        program = (
            '{ sub(/^ +/, "", $1); gsub(/[][]/, "", $1) } '
            '$2 == o { n = split($3, t, ","); for (i = 1; i <= n; i++) if (t[i] == l) { print $1; exit } }'
        )
        return (
            f"snap=$(lvs -a --noheadings --separator '|' -o lv_name,origin,lv_tags {quote(vg)} 2>/dev/null "
            f"| awk -F'|' -v o={quote(volume)} -v l={quote(LVM_LABEL_TAG + label)} {quote(program)})\n"
        )

    @staticmethod
    def _lvm_snapshot(vg: str, volume: str, label: str, what: str) -> str:
        """Shell: take the snapshot ``$snap`` of ``volume`` labelled ``label``; on failure
        call ``fail`` with a line that starts with ``what``. Its copy-on-write store is
        asked for more than the volume's size and lvcreate cuts it to what holds every
        block of the volume ("Reducing COW size ... down to maximum usable size"): the
        snapshot can never fill up and be invalidated. A fixed size, not ``100%ORIGIN``:
        a percentage is an upper limit that lvcreate lowers to the space there is."""
        lv = quote(vg + "/" + volume)
        return (
            f"bytes=$(lvs --noheadings --units b --nosuffix -o lv_size {lv} | tr -d ' ')\n"
            "mb=$(( (${bytes:-0} + 1048575) / 1048576 ))\n"
            f'if ! err=$(lvcreate -q -y -s -L "$(( mb + mb / 16 + 16 ))m" -n "$snap" '
            f"--addtag {quote(LVM_LABEL_TAG + label)} {lv} 2>&1 </dev/null); then\n"
            f'  lvs {quote(vg)}/"$snap" >/dev/null 2>&1 && lvremove -q -f {quote(vg)}/"$snap" >/dev/null 2>&1\n'
            f'  fail "{what}: $(last "$err")"\n'
            "fi\n"
        )

    def _lvm_snapshot_volume(
        self, storage: StorageTarget, config: ServerConfig, location: str, label: str
    ) -> str:
        vg = config.volume_group
        assert vg is not None
        prefix = location + LVM_SNAPSHOT
        number = (
            '{ sub(/^ +/, "", $1); gsub(/[][]/, "", $1) } '
            "index($1, p) == 1 { s = substr($1, length(p) + 1); if (s ~ /^[0-9]+$/ && s + 1 > m) m = s + 1 } "
            "END { print m }"
        )
        script = (
            self._lvm_head(config)
            + 'fail() { echo "qrm-failed $1"; exit 0; }\n'
            + self._lvm_exists(vg, location)
            + self._lvm_find(vg, location, label)
            + '[ -z "$snap" ] || { echo qrm-exists; exit 0; }\n'
            + f"n=$(lvs -a --noheadings -o lv_name {quote(vg)} | awk -v p={quote(prefix)} -v m=1 {quote(number)})\n"
            + f'snap={quote(prefix)}"$n"\n'
            + self._lvm_snapshot(vg, location, label, f"cannot take an LVM snapshot of volume {location}")
            + "echo 'qrm-done LVM snapshot'\n"
        )
        return self._said(storage, script, location, label)

    def _lvm_list_snapshots(self, storage: StorageTarget, config: ServerConfig, location: str) -> list[str]:
        vg = config.volume_group
        assert vg is not None
        done = self._run(
            storage,
            "export LC_ALL=C LVM_SUPPRESS_FD_WARNINGS=1\n"
            + self._lvm_exists(vg, location)
            + f"if out=$(lvs -a --noheadings --separator '|' -o lv_name,origin,lv_tags {quote(vg)} 2>&1); then "
            """printf '%s\\n' "$out" | sed 's/^/lv /'; echo qrm-done; else printf '%s\\n' "$out" >&2; fi\n""",
        )
        if "qrm-missing" in done.stdout.splitlines():
            raise NotFound(f"volume {location} does not exist on {storage.name}")
        if "qrm-done" not in done.stdout.splitlines():
            raise DriverError(f"cannot list the snapshots of volume {location}: {done.last_error()}")
        found: list[tuple[int, str]] = []
        prefix = location + LVM_SNAPSHOT
        for line in done.stdout.splitlines():
            parts = line[3:].strip().split("|") if line.startswith("lv ") else []
            if len(parts) != 3 or parts[1] != location:
                continue
            name = parts[0].strip("[]")
            number = name.removeprefix(prefix)
            if not name.startswith(prefix) or not number.isdigit():
                continue
            for tag in parts[2].split(","):
                label = tag.removeprefix(LVM_LABEL_TAG)
                if tag.startswith(LVM_LABEL_TAG) and LABEL.match(label):
                    found.append((int(number), label))
        return [label for _, label in sorted(found)]

    def _lvm_revert_volume(
        self, storage: StorageTarget, config: ServerConfig, location: str, label: str
    ) -> str:
        """Merge the snapshot into the volume, then take it again under the same name and label.

        ``lvconvert --mergesnapshot`` gives the origin the snapshot's data and removes
        the snapshot. It starts at once only when neither the origin nor the snapshot is
        open; otherwise it is deferred to the origin's next activation (lvconvert(8)),
        and tgtd holds the volume open while it is a LUN. So, under the storage server's
        lock:

        1. the volume exists and has the snapshot (else NotFound, nothing changed);
        2. its LUN is taken out of its target (``tgtadm --op delete --mode
           logicalunit``: tgtd closes the volume; the target, its ACL and CHAP account
           stay, so nobody has to export it again); a LUN tgt will not let go of stops
           here, nothing changed;
        3. neither the volume nor the snapshot is open (``lv_attr``: a mount, another
           program): else the LUN goes back and the revert is refused, nothing changed;
        4. ``lvconvert -y -i 1 --mergesnapshot VG/SNAP``: the merge starts at once and
           lvconvert waits until it is done (it copies back only the blocks written
           since the snapshot); the snapshot LV must then be gone (not a merge left
           pending);
        5. the snapshot is taken again under the same name (so its place in the order)
           and label, so a pristine VE can be reset again and again;
        6. the LUN goes back into its target with the same number, backing device and
           read-only setting.

        Any step failing after 2 puts the LUN back before it says why in one line.
        """
        vg = config.volume_group
        assert vg is not None
        path = self._backing(config, location, "revert a volume")
        live = self._show(storage, config).get(self.target_name(storage, location))
        lun = live.luns.get(LUN) if live is not None else None
        script = tgt.Script(config.tgt_control_port, None)
        if live is not None and lun is not None:
            release = script.tgtadm(
                "--op", "delete", "--mode", "logicalunit", "--tid", live.tid, "--lun", LUN
            )
            back = script.tgtadm(
                "--op", "new", "--mode", "logicalunit", "--tid", live.tid, "--lun", LUN, "-b", path
            )
            if lun.readonly:
                back += " && " + script.tgtadm(
                    "--op", "update", "--mode", "logicalunit", "--tid", live.tid, "--lun", LUN,
                    "--params", "readonly=1",
                )  # fmt: skip
        else:
            release = back = "true"
        lv = quote(vg + "/" + location)
        text = (
            self._lvm_head(config)
            + f"back() {{ {back}; }}\n"
            + 'fail() { if e=$(back 2>&1); then echo "qrm-failed $1"; else '
            'echo "qrm-failed $1 (and tgt did not take the LUN back: $(last "$e"))"; fi; exit 0; }\n'
            + self._lvm_exists(vg, location)
            + self._lvm_find(vg, location, label)
            + '[ -n "$snap" ] || { echo qrm-no-snapshot; exit 0; }\n'
            + f"if ! err=$({release} 2>&1); then "
            f'echo "qrm-failed tgt would not let go of the LUN of volume {location}: '
            '$(last "$err")"; exit 0; fi\n'
            # Nothing else may hold the volume or the snapshot open, or the merge is only deferred.
             + f'for x in {lv} {quote(vg)}/"$snap"; do\n'
            '  attr=$(lvs --noheadings -o lv_attr "$x" 2>/dev/null | tr -d " ")\n'
            f'  case "$attr" in ?????o*) fail "$x is open on the storage server (mounted, or used by '
            f'a program other than tgt): volume {location} not reverted";; esac\n'
            "done\n"
            + f'if ! err=$(lvconvert -y -i 1 --mergesnapshot {quote(vg)}/"$snap" 2>&1 </dev/null); then\n'
            f'  fail "cannot merge snapshot {label} into volume {location}: lvconvert: $(last "$err")"\n'
            "fi\n"
            + f'if lvs -a --noheadings -o lv_name {quote(vg)} | tr -d " []" | grep -qx -- "$snap"; then\n'
            f'  fail "the merge of snapshot {label} into volume {location} is pending, not done '
            '(lvconvert: $(last "$err"))"\n'
            "fi\n"
            + self._lvm_snapshot(
                vg,
                location,
                label,
                f"volume {location} was reverted to {label}, but the snapshot was not taken again",
            )
            + f'if ! err=$(back 2>&1); then echo "qrm-failed volume {location} was reverted to {label}, '
            'but tgt did not take its LUN back: $(last "$err")"; exit 0; fi\n'
            "echo 'qrm-done LVM snapshot merge'\n"
        )
        return self._said(storage, text, location, label)

    def _lvm_remove_snapshot(
        self, storage: StorageTarget, config: ServerConfig, location: str, label: str
    ) -> None:
        vg = config.volume_group
        assert vg is not None
        script = (
            self._lvm_head(config)
            + self._lvm_find(vg, location, label)
            + '[ -n "$snap" ] || { echo qrm-no-snapshot; exit 0; }\n'
            + f'if ! err=$(lvremove -q -f {quote(vg)}/"$snap" 2>&1 </dev/null); then '
            'echo "qrm-failed lvremove: $(last "$err")"; exit 0; fi\n'
            "echo qrm-done\n"
        )
        self._said(storage, script, location, label)

    # -- snapshots -------------------------------------------------------------

    def snapshot_volume(self, storage: StorageTarget, location: str, label: str) -> str:
        """LUN files: a copy of the file (copy-on-write where the backing directory can).
        LVM volumes: an LVM snapshot (copy-on-write blocks, as big as the volume so it
        never overflows), the logical volume ``<volume>_snap<N>`` tagged ``qrm-label=<label>``."""
        self._label(label)
        config, path = self._volume(storage, location)
        if config.volume_group:
            return self._lvm_snapshot_volume(storage, config, location, label)
        snaps = f"{config.backing_dir}/{SNAPSHOTS}/{location}"
        dest = f"{snaps}/{label}.img"
        script = (
            f"test -f {quote(path)} || {{ echo qrm-missing; exit 0; }}\n"
            f"test -e {quote(dest)} && {{ echo qrm-exists; exit 0; }}\n"
            f"mkdir -p -- {quote(snaps)} || exit 3\n"
            + cow_probe(snaps)
            + "\n"
            + self._copy_file(path, dest + ".partial")
            + f"mv -- {quote(dest + '.partial')} {quote(dest)} && echo {quote(label)} >> {quote(snaps + '/.order')}\n"
            'echo "qrm-done $how"\n'
        )
        return self._said(storage, script, location, label)

    def list_snapshots(self, storage: StorageTarget, location: str) -> list[str]:
        config, path = self._volume(storage, location)
        if config.volume_group:
            return self._lvm_list_snapshots(storage, config, location)
        snaps = f"{config.backing_dir}/{SNAPSHOTS}/{location}"
        done = self._run(
            storage,
            f"test -f {quote(path)} || {{ echo qrm-missing; exit 0; }}\n"
            f"cd {quote(snaps)} 2>/dev/null && [ -f .order ] && "
            'while read -r l; do [ -f "$l.img" ] && echo "snap $l"; done < .order\n'
            "echo qrm-done\n",
        )
        if "qrm-missing" in done.stdout:
            raise NotFound(f"volume {location} does not exist on {storage.name}")
        labels = [line[5:] for line in done.stdout.splitlines() if line.startswith("snap ")]
        return [label for label in dict.fromkeys(labels) if LABEL.match(label)]

    def revert_volume(self, storage: StorageTarget, location: str, label: str) -> str:
        """LUN files: the snapshot copied back into the LUN file itself (tgt keeps it
        open: the same file, new data), copy-on-write where it can be. LVM volumes: the
        snapshot merged into the volume and taken again (:meth:`_lvm_revert_volume`)."""
        self._label(label)
        config, path = self._volume(storage, location)
        if config.volume_group:
            return self._lvm_revert_volume(storage, config, location, label)
        snap = f"{config.backing_dir}/{SNAPSHOTS}/{location}/{label}.img"
        script = (
            f"test -f {quote(path)} || {{ echo qrm-missing; exit 0; }}\n"
            f"test -f {quote(snap)} || {{ echo qrm-no-snapshot; exit 0; }}\n"
            + cow_probe(config.backing_dir or "/tmp")
            + "\n"
            + self._copy_file(snap, path)
            + 'echo "qrm-done $how"\n'
        )
        return self._said(storage, script, location, label)

    def remove_snapshot(self, storage: StorageTarget, location: str, label: str) -> None:
        self._label(label)
        config, _path = self._volume(storage, location)
        if config.volume_group:
            self._lvm_remove_snapshot(storage, config, location, label)
            return
        snaps = f"{config.backing_dir}/{SNAPSHOTS}/{location}"
        script = (
            f"test -f {quote(snaps + '/' + label + '.img')} || {{ echo qrm-no-snapshot; exit 0; }}\n"
            f"rm -f -- {quote(snaps + '/' + label + '.img')} || exit 4\n"
            f"grep -vx -- {quote(label)} {quote(snaps + '/.order')} > {quote(snaps + '/.order.new')}; "
            f"mv -- {quote(snaps + '/.order.new')} {quote(snaps + '/.order')}\n"
            "echo qrm-done\n"
        )
        self._said(storage, script, location, label)
