"""A stand-in for the LVM commands the iscsi driver's scripts run (``lvs``, ``vgs``,
``lvcreate``, ``lvconvert``, ``lvremove``), for machines whose kernel has no
device-mapper (no LVM snapshot, or logical volume at all, can exist there).

Run as ``python3 fake_lvm.py COMMAND ARGS...`` (test_iscsi_lvm.py puts one small
wrapper per command first on the scripts' PATH). One volume group; its state is the
JSON file ``$QRM_FAKE_LVM`` (taken under a lock for each command): the volume group's
name, extent size and size, and each logical volume's extents, origin and tags. A
logical volume's data is a file at ``/dev/<vg>/<lv>``, as LVM's device would be there.

What it models of LVM, from lvcreate(8), lvconvert(8), lvremove(8), lvs(8):

* sizes in whole extents; ``lvcreate`` refuses what does not fit ("insufficient free
  space"), and a snapshot's copy-on-write store asked bigger than the whole origin is
  cut to what covers it ("Reducing COW size ... down to maximum usable size");
* a snapshot's data is the origin's at the time it was taken (here: a copy);
* ``lvconvert --mergesnapshot`` gives the origin the snapshot's data and removes the
  snapshot, at once when neither is open (a process holds the file open: tgtd with
  the LUN, a mount's loop device), otherwise it is deferred ("Delaying merge since
  origin is open."): the snapshot is hidden (``lvs -a`` shows it in brackets) and the
  origin's data unchanged;
* ``lvremove -f`` of an origin removes its snapshots too; an open LV is "in use";
* ``lv_attr``: type (``o``/``O`` origin, ``s``/``S`` snapshot, merging in capitals)
  and open (6th character);
* an unknown option is an error, so a script using something not modelled here fails;
* a descriptor left open by the caller is warned of on standard error ("File
  descriptor 9 (...) leaked on invocation"), unless ``LVM_SUPPRESS_FD_WARNINGS``.

``"fail": {"lvconvert": "message"}`` in the state makes that command fail with the
message (and change nothing).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sys
from typing import Any

MB = 1 << 20
NAME = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*$")
RESERVED = ("_cdata", "_cmeta", "_corig", "_iorig", "_mimage", "_mlog", "_pmspare", "_rimage")
RESERVED += ("_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig")
TAG = re.compile(r"^[A-Za-z0-9._+/=!:&#-]+$")
VALUED = {"-L", "-l", "-n", "-o", "-i", "--addtag", "--units", "--separator", "--size", "--name"}
FLAGS = {
    "-q",
    "-y",
    "-s",
    "-a",
    "-f",
    "--noheadings",
    "--nosuffix",
    "--mergesnapshot",
    "--merge",
    "--snapshot",
}


class Failed(Exception):
    def __init__(self, message: str, code: int = 5) -> None:
        super().__init__(message)
        self.code = code


def parse(args: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    options: dict[str, list[str]] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in VALUED:
            if i + 1 >= len(args):
                raise Failed(f"option {arg} needs a value", 3)
            options.setdefault(arg, []).append(args[i + 1])
            i += 2
        elif arg in FLAGS:
            options.setdefault(arg, []).append("")
            i += 1
        elif arg.startswith("-"):
            raise Failed(f"fake lvm: unknown option {arg}", 3)
        else:
            rest.append(arg)
            i += 1
    return options, rest


class Lvm:
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.vg: str = state["vg"]
        self.volumes: dict[str, dict[str, Any]] = state["lvs"]
        self.extent = int(state.get("extent_mb", 4)) * MB

    # -- helpers -------------------------------------------------------------

    def device(self, name: str) -> str:
        return f"/dev/{self.vg}/{name}"

    def free_extents(self) -> int:
        return int(self.state["extents"]) - sum(int(lv["extents"]) for lv in self.volumes.values())

    def lv_arg(self, text: str) -> str:
        vg, _, name = text.removeprefix("/dev/").partition("/")
        if vg != self.vg:
            raise Failed(f'Volume group "{vg}" not found')
        if name not in self.volumes:
            raise Failed(f'Failed to find logical volume "{vg}/{name}"')
        return name

    def snapshots_of(self, name: str) -> list[str]:
        return [n for n, lv in self.volumes.items() if lv["origin"] == name]

    def is_open(self, name: str) -> bool:
        """Does any process hold the LV's device (here: its file) open?"""
        target = os.path.realpath(self.device(name))
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return True
                except OSError:
                    continue
        return False

    def size_extents(self, options: dict[str, list[str]]) -> int:
        if "-l" in options:
            raise Failed("fake lvm: sizes as extents or percentages (-l) are not modelled", 3)
        text = (options.get("-L") or options.get("--size") or [""])[-1]
        match = re.fullmatch(r"([0-9]+)([mM]?)", text)
        if not match:
            raise Failed(f"Invalid argument for --size: {text}", 3)
        size = int(match[1]) * MB
        return max(1, -(-size // self.extent))

    def cow_max_extents(self, origin: str) -> int:
        """lib/metadata/snapshot_manip.c: header, metadata and data chunks (4 KiB) for
        the whole origin, rounded up to extents."""
        chunk = 4096
        chunks = -(-int(self.volumes[origin]["extents"]) * self.extent // chunk)
        per_area = chunk // 16
        n = 1 + chunks + (chunks + per_area) // per_area
        size = (n + (n + 63) // 64) * chunk
        return -(-size // self.extent)

    def attr(self, name: str) -> str:
        lv = self.volumes[name]
        if lv["origin"]:
            kind = "S" if lv.get("merging") else "s"
        elif self.snapshots_of(name):
            kind = "O" if any(self.volumes[s].get("merging") for s in self.snapshots_of(name)) else "o"
        else:
            kind = "-"
        target = "s" if lv["origin"] else ("o" if self.snapshots_of(name) else "-")
        return f"{kind}wi-a{'o' if self.is_open(name) else '-'}{target}---"

    # -- commands --------------------------------------------------------------

    def lvs(self, args: list[str]) -> str:
        options, rest = parse(args)
        names: list[str] = []
        for arg in rest or [self.vg]:
            if arg == self.vg:
                # A snapshot whose merge is pending is hidden unless -a.
                names += [
                    n for n in sorted(self.volumes) if "-a" in options or not self.volumes[n].get("merging")
                ]
            else:
                names.append(self.lv_arg(arg))
        fields = ",".join(options.get("-o", ["lv_name"])).split(",")
        units = (options.get("--units") or ["m"])[-1]
        suffix = "" if "--nosuffix" in options else units

        def value(name: str, field: str) -> str:
            lv = self.volumes[name]
            if field == "lv_name":
                return f"[{name}]" if lv.get("merging") else name
            if field == "origin":
                return str(lv["origin"])
            if field == "lv_tags":
                return ",".join(lv["tags"])
            if field == "lv_attr":
                return self.attr(name)
            if field == "lv_size":
                size = int(lv["extents"]) * self.extent
                if units == "b":
                    return f"{size}{suffix.upper()}"
                if units == "m":
                    return f"{size / MB:.2f}{suffix}"
            raise Failed(f"fake lvm: field {field} with units {units} is not modelled", 3)

        separator = (options.get("--separator") or [" "])[-1]
        lines = [] if "--noheadings" in options else ["  " + separator.join(f.upper() for f in fields)]
        lines += ["  " + separator.join(value(n, f) for f in fields) for n in names]
        return "\n".join(lines) + "\n"

    def vgs(self, args: list[str]) -> str:
        options, rest = parse(args)
        if rest and rest != [self.vg]:
            raise Failed(f'Volume group "{rest[0]}" not found')
        fields = ",".join(options.get("-o", ["vg_name"])).split(",")
        values = {
            "vg_name": self.vg,
            "vg_size": f"{int(self.state['extents']) * self.extent / MB:.2f}",
            "vg_free": f"{self.free_extents() * self.extent / MB:.2f}",
        }
        return "  " + " ".join(values[f] for f in fields) + "\n"

    def lvcreate(self, args: list[str]) -> str:
        options, rest = parse(args)
        name = (options.get("-n") or options.get("--name") or [""])[-1]
        if not name or not NAME.match(name) or any(r in name for r in RESERVED) or name == "snapshot":
            raise Failed(f'Logical volume name "{name}" is invalid.', 3)
        for tag in options.get("--addtag", []):
            if not TAG.match(tag):
                raise Failed(f"Tag {tag} is invalid.", 3)
        if name in self.volumes:
            raise Failed(f'Logical Volume "{name}" already exists in volume group "{self.vg}"')
        extents = self.size_extents(options)
        out = ""
        snapshot = "-s" in options or "--snapshot" in options
        if snapshot:
            if len(rest) != 1:
                raise Failed("Please specify a logical volume to act as the snapshot origin.", 3)
            origin = self.lv_arg(rest[0])
            if self.volumes[origin]["origin"]:
                raise Failed("Snapshots of snapshots are not supported.")
            if any(self.volumes[s].get("merging") for s in self.snapshots_of(origin)):
                raise Failed("Snapshots of an origin that has a merging snapshot is not supported")
            most = self.cow_max_extents(origin)
            if extents > most:
                out += f"  Reducing COW size down to maximum usable size {most * self.extent / MB:.2f} MiB.\n"
                extents = most
        elif rest != [self.vg]:
            raise Failed(f'Volume group "{rest[0] if rest else ""}" not found')
        if extents > self.free_extents():
            raise Failed(
                f'Volume group "{self.vg}" has insufficient free space ({self.free_extents()} extents): '
                f"{extents} required."
            )
        os.makedirs(f"/dev/{self.vg}", exist_ok=True)
        if snapshot:
            shutil.copyfile(self.device(origin), self.device(name))
        else:
            with open(self.device(name), "wb") as data:
                data.truncate(extents * self.extent)
        self.volumes[name] = {
            "extents": extents,
            "origin": origin if snapshot else "",
            "tags": list(options.get("--addtag", [])),
        }
        return out + f'  Logical volume "{name}" created.\n'

    def lvremove(self, args: list[str]) -> str:
        options, rest = parse(args)
        out = ""
        for arg in rest:
            name = self.lv_arg(arg)
            snapshots = self.snapshots_of(name)
            if snapshots and "-f" not in options:
                raise Failed(f"Removing origin {name} will also remove {len(snapshots)} snapshots(s): no -f")
            for lv in [*snapshots, name]:
                if self.is_open(lv):
                    raise Failed(f"Logical volume {self.vg}/{lv} in use.")
            for lv in [*snapshots, name]:
                os.unlink(self.device(lv))
                del self.volumes[lv]
                out += f'  Logical volume "{lv}" successfully removed.\n'
        return out

    def lvconvert(self, args: list[str]) -> str:
        options, rest = parse(args)
        if "--mergesnapshot" not in options and "--merge" not in options:
            raise Failed("fake lvm: only lvconvert --mergesnapshot is modelled", 3)
        if self.state.get("fail", {}).get("lvconvert"):
            raise Failed(self.state["fail"]["lvconvert"])
        out = ""
        for arg in rest:
            name = self.lv_arg(arg)
            lv = self.volumes[name]
            origin = lv["origin"]
            if not origin:
                raise Failed(f"Command on LV {self.vg}/{name} does not accept LV type linear.")
            if lv.get("merging"):
                raise Failed(f"Snapshot {self.vg}/{name} is already merging.")
            if self.is_open(origin) or self.is_open(name):
                lv["merging"] = True
                out += "  Delaying merge since origin is open.\n"
                out += f"  Merging of snapshot {self.vg}/{name} will occur on next activation of {self.vg}/{origin}.\n"
                continue
            with open(self.device(name), "rb") as src, open(self.device(origin), "r+b") as dest:
                shutil.copyfileobj(src, dest, MB)
            os.unlink(self.device(name))
            del self.volumes[name]
            out += f"  Merging of volume {self.vg}/{name} started.\n  {self.vg}/{origin}: Merged: 100.00%\n"
        return out


def leaked() -> list[str]:
    """LVM's warning for each descriptor its caller left open (unless
    ``LVM_SUPPRESS_FD_WARNINGS``), on standard error before anything else."""
    if os.environ.get("LVM_SUPPRESS_FD_WARNINGS"):
        return []
    found = []
    for fd in range(3, 256):
        try:
            what = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        found.append(f"File descriptor {fd} ({what}) leaked on invocation. Parent PID {os.getppid()}: sh")
    return found


def main(argv: list[str]) -> int:
    for warning in leaked():
        print(warning, file=sys.stderr)
    command, args = argv[0], argv[1:]
    path = os.environ["QRM_FAKE_LVM"]
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(path) as handle:
            state = json.load(handle)
        lvm = Lvm(state)
        try:
            if command not in ("lvs", "vgs", "lvcreate", "lvremove", "lvconvert"):
                raise Failed(f"fake lvm: {command} is not modelled", 3)
            out = getattr(lvm, command)(args)
        except Failed as exc:
            print(f"  {exc}", file=sys.stderr)
            return exc.code
        with open(path + ".new", "w") as handle:
            json.dump(state, handle, indent=1)
        os.replace(path + ".new", path)
    if "-q" not in args:
        sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
