#!/usr/bin/env python3
"""Fetch the third-party browser assets qrm vendors, from their npm packages.

    python3 scripts/fetch-assets.py            # fetch, verify, write the files
    python3 scripts/fetch-assets.py --check    # only verify the files in the tree
    python3 scripts/fetch-assets.py --pin      # after changing a version: record the new checksums

Each package in scripts/vendor-assets.json is downloaded with ``npm pack`` at
its pinned version; the tarball must match the pinned ``integrity`` (the
registry's sha512) before anything is extracted. Only the listed files are
written, and each must match its pinned sha256 (``--pin`` records them once
for a new version, after the tarball's integrity was checked). Nothing is
copied by hand and nothing is fetched at run time: the files are committed,
and tests/console/test_assets.py checks them against the same checksums.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "scripts" / "vendor-assets.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_tree(manifest: dict) -> list[str]:
    """Problems with the vendored files as they are in the tree (empty: all good)."""
    problems = []
    for pkg in manifest["packages"]:
        dest = ROOT / pkg["dest"]
        for name, digest in pkg["files"].items():
            path = dest / name
            if not path.is_file():
                problems.append(f"{path.relative_to(ROOT)} is missing (run scripts/fetch-assets.py)")
            elif sha256(path.read_bytes()) != digest:
                problems.append(f"{path.relative_to(ROOT)} does not match {pkg['package']}@{pkg['version']}")
    return problems


def fetch(pkg: dict, pin: bool) -> None:
    spec = f"{pkg['package']}@{pkg['version']}"
    with tempfile.TemporaryDirectory(prefix="qrm-assets-") as tmp:
        out = subprocess.run(
            ["npm", "pack", spec, "--pack-destination", tmp, "--json", "--ignore-scripts"],
            check=True,
            capture_output=True,
            text=True,
        )
        tarball = Path(tmp) / json.loads(out.stdout)[0]["filename"]
        data = tarball.read_bytes()
        integrity = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
        if integrity != pkg["integrity"]:
            sys.exit(f"{spec}: the tarball's integrity {integrity} is not the pinned {pkg['integrity']}")
        dest = ROOT / pkg["dest"]
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball) as archive:
            for name in pkg["files"]:
                member = archive.extractfile(f"package/{name}")
                if member is None:
                    sys.exit(f"{spec} has no file {name}")
                content = member.read()
                if pin:
                    pkg["files"][name] = sha256(content)
                elif sha256(content) != pkg["files"][name]:
                    sys.exit(f"{spec}: {name} does not match its pinned sha256 (use --pin for a new version)")
                (dest / name).write_bytes(content)
        print(f"{spec} ({pkg['license']}): {len(pkg['files'])} files in {pkg['dest']}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="verify the vendored files only")
    parser.add_argument("--pin", action="store_true", help="record the checksums of a new version")
    args = parser.parse_args()
    manifest = json.loads(MANIFEST.read_text())
    if not args.check:
        for pkg in manifest["packages"]:
            fetch(pkg, args.pin)
        if args.pin:
            MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    problems = check_tree(manifest)
    for problem in problems:
        print(problem, file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
