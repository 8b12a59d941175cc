"""``qrm ramdisk import|list`` run in-process as a user runs them (the plugin found
through its entry point)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("QRM_RAMDISK_"):
            monkeypatch.delenv(key)


def tree(root: Path) -> Path:
    (root / "etc" / "qrm").mkdir(parents=True)
    (root / "etc" / "qrm" / "ve-start").write_text("#!/bin/sh\necho hi\n")
    return root


def test_import_and_list(qrm_cli, qrm_settings, tmp_path: Path) -> None:
    assert qrm_cli("storage", "add", "-n", "ram", "-t", "ramdisk", "-i", "10.0.0.1").exit_code == 0
    done = qrm_cli(
        "ramdisk", "import", "web", "--storage", "ram", "--from", str(tree(tmp_path / "t")), "--size", "64"
    )
    assert done.exit_code == 0, done.stderr
    archive = qrm_settings.data_dir / "ramdisk" / "ram" / "web.tar.gz"
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert f"sha256 {digest[:16]}" in done.stdout
    shown = qrm_cli("filesystem-image", "show", "web", "-o", "json").json()
    assert (shown["storage"], shown["location"], shown["origin"]) == ("ram", "web", "imported")
    listed = qrm_cli("ramdisk", "list", "-o", "json").json()
    assert listed == [
        {"storage": "ram", "volume": "web", "size_mb": 64, "exported_to": [], "filesystem_image": "web"}
    ]
    # A second import of the same tree under another name: the same bytes.
    assert qrm_cli("ramdisk", "import", "web2", "-s", "ram", "--from", str(tmp_path / "t")).exit_code == 0
    assert (archive.parent / "web2.tar.gz").read_bytes() == archive.read_bytes()


def test_bad_input_is_one_line_and_changes_nothing(qrm_cli, qrm_settings, tmp_path: Path) -> None:
    qrm_cli("storage", "add", "-n", "ram", "-t", "ramdisk", "-i", "10.0.0.1")
    qrm_cli("storage", "add", "-n", "other", "-t", "fake", "-i", "10.0.0.2")
    source = str(tree(tmp_path / "t"))
    assert qrm_cli("ramdisk", "import", "web", "-s", "ram", "--from", source).exit_code == 0
    hostile = tmp_path / "hostile.tar"
    import tarfile

    with tarfile.open(hostile, "w") as tar:
        tar.addfile(tarfile.TarInfo("../../etc/cron.d/x"))
    cases = [
        (["web", "-s", "ram", "--from", source], "already exists"),
        (["bad name", "-s", "ram", "--from", source], "invalid filesystem image name"),
        (["x", "-s", "nowhere", "--from", source], "does not exist"),
        (["x", "-s", "other", "--from", source], "is of type fake, not ramdisk"),
        (["x", "-s", "ram", "--from", str(tmp_path / "missing")], "does not exist"),
        (["x", "-s", "ram", "--from", str(hostile)], "leaves the archive root"),
        (["x", "-s", "ram", "--from", source, "--size", "0"], "positive"),
    ]
    for args, text in cases:
        done = qrm_cli("ramdisk", "import", *args)
        assert done.exit_code == 1, (args, done.stdout, done.stderr)
        assert text in done.stderr and done.stderr.count("\n") == 1, (args, done.stderr)
    names = [image["name"] for image in qrm_cli("filesystem-image", "list", "-o", "json").json()]
    assert names == ["web"]
    assert sorted(p.name for p in (qrm_settings.data_dir / "ramdisk" / "ram").iterdir()) == [
        "volumes.json",
        "volumes.json.lock",
        "web.tar.gz",
    ]
    done = qrm_cli("ramdisk", "list", "-s", "other")
    assert done.exit_code == 1 and "no ramdisk storage server 'other'" in done.stderr


@pytest.mark.qrm_backends("sqlite")
def test_no_transaction_is_open_while_the_driver_works(
    qrm_cli, qrm_settings, tmp_path: Path, monkeypatch
) -> None:
    """Building an archive can take minutes: on SQLite a transaction open meanwhile
    would hold the write lock, and no machine could register or heartbeat."""
    import sqlite3

    from sqlalchemy.engine import make_url

    from qrm_ramdisk.driver import RamdiskStorage

    path = make_url(qrm_settings.effective_database_url).database
    seen: list[str] = []

    def probing(method: str):  # type: ignore[no-untyped-def]
        original = getattr(RamdiskStorage, method)

        def call(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            other = sqlite3.connect(path, timeout=0.2, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")  # 'database is locked' while a transaction is open
                other.execute("ROLLBACK")
            finally:
                other.close()
            seen.append(method)
            return original(self, *args, **kwargs)

        return call

    for method in ("import_volume", "list_volumes", "remove_volume"):
        monkeypatch.setattr(RamdiskStorage, method, probing(method))
    assert qrm_cli("storage", "add", "-n", "ram", "-t", "ramdisk", "-i", "10.0.0.1").exit_code == 0
    done = qrm_cli("ramdisk", "import", "web", "-s", "ram", "--from", str(tree(tmp_path / "t")))
    assert done.exit_code == 0, done.stderr
    assert qrm_cli("ramdisk", "list").exit_code == 0
    assert seen == ["import_volume", "list_volumes"]
