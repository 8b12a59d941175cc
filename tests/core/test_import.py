"""``qrm filesystem-image import``: root filesystem archives (tar, gzip, xz, zstd) from a
file or an http URL (served on 127.0.0.1), checksums, and hostile archives refused in one
line with nothing made; on SQLite, PostgreSQL and MariaDB. The fake storage's volume is a
real directory here, so what was unpacked is checked file by file."""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from qrm_core.errors import AlreadyExists, DriverError, InvalidInput, NotFound, QrmError
from qrm_core.models import Event, FilesystemImage
from qrm_core.services import images, service_context
from qrm_core.services import storage as storage_service
from qrm_core.testkit import make_root_tree


def ctx_for(settings: Any, plugins: Any) -> Any:
    return service_context(settings, actor="tester", plugins=plugins)


@pytest.fixture
def site(qrm_settings: Any, qrm_plugins: Any) -> tuple[Any, Any]:
    with ctx_for(qrm_settings, qrm_plugins) as ctx:
        storage_service.add_storage(ctx, name="st", type="fake", address="10.0.11.35")
    return qrm_settings, qrm_plugins


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if os.geteuid() != 0:
        pytest.skip("the archives hold files of other owners and a device node: needs root")
    work = tmp_path_factory.mktemp("archives")
    root = make_root_tree(work / "root", data_mb=1)
    os.mknod(root / "dev" / "null", 0o666 | 0o020000, os.makedev(1, 3))
    made = {}
    for suffix, flag in (("tar", ""), ("tar.gz", "z"), ("tar.xz", "J")):
        path = work / f"root.{suffix}"
        subprocess.run(
            ["tar", f"-c{flag}f", str(path), "--numeric-owner", "--xattrs", "-C", str(root), "."], check=True
        )
        made[suffix] = path
    if shutil.which("zstd"):
        path = work / "root.tar.zst"
        subprocess.run(
            ["tar", "--zstd", "-cf", str(path), "--numeric-owner", "-C", str(root), "."], check=True
        )
        made["tar.zst"] = path
    made["root"] = root

    def hostile(name: str, build: Any) -> None:
        path = work / f"{name}.tar"
        with tarfile.open(path, "w") as tar:
            build(tar)
        made[name] = path

    def entry(
        tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b"x"
    ) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = link
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    hostile("absolute", lambda t: entry(t, "/etc/passwd"))
    hostile("dotdot", lambda t: (entry(t, "etc/ok"), entry(t, "etc/../../escape")))
    hostile("device", lambda t: entry(t, "etc/sda", tarfile.BLKTYPE))
    hostile("through-link", lambda t: (entry(t, "etc", tarfile.SYMTYPE, "/etc"), entry(t, "etc/passwd")))
    hostile("hardlink-out", lambda t: entry(t, "etc/shadow", tarfile.LNKTYPE, "../../etc/shadow"))
    (work / "not-a-tar").write_bytes(os.urandom(4096))
    made["garbage"] = work / "not-a-tar"
    return made


def unpacked(settings: Any, location: str) -> Path:
    return settings.state_dir / "fake-storage" / "st.trees" / location.strip("/")


def entries(root: Path) -> dict[str, tuple[int, int, int, bytes | str]]:
    found = {}
    for entry in sorted(root.rglob("*")):
        st = entry.lstat()
        data: bytes | str = (
            os.readlink(entry) if entry.is_symlink() else entry.read_bytes() if entry.is_file() else b""
        )
        found[str(entry.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, data)
    return found


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tar.xz", "tar.zst"])
def test_import_unpacks_every_kind(
    site: tuple[Any, Any], archives: dict[str, Path], kind: str, qrm_backend: str
) -> None:
    settings, plugins = site
    if kind != "tar.gz" and qrm_backend != "sqlite":
        pytest.skip("the kinds of archive are the same on every database: tar.gz shows the databases")
    if kind not in archives:
        pytest.skip("zstd is not installed")
    import hashlib

    digest = hashlib.sha256(archives[kind].read_bytes()).hexdigest()
    lines: list[str] = []
    with ctx_for(settings, plugins) as ctx:
        image = images.import_filesystem_image(
            ctx,
            name="jail",
            storage="st",
            archive=str(archives[kind]),
            sha256=digest.upper(),
            progress=lines.append,
        )
    assert (image.origin, image.state, image.source) == ("imported", "ready", archives[kind].name)
    assert entries(unpacked(settings, image.location)) == entries(archives["root"])
    assert any("unpacking" in line for line in lines)
    with ctx_for(settings, plugins) as ctx:
        event = ctx.session.exec(select(Event).where(Event.object_name == "jail")).all()[-1]
    assert f"sha256 {digest[:16]}" in event.message


def test_bad_archives_are_one_line_and_nothing_is_made(
    site: tuple[Any, Any], archives: dict[str, Path]
) -> None:
    settings, plugins = site

    def state() -> tuple[Any, ...]:
        with ctx_for(settings, plugins) as ctx:
            names = ctx.session.exec(select(FilesystemImage.name)).all()
            count = len(ctx.session.exec(select(Event)).all())
        fake = settings.state_dir / "fake-storage" / "st.json"
        return tuple(names), count, fake.read_text() if fake.exists() else ""

    before = state()
    cases: list[tuple[dict[str, Any], type[QrmError], str]] = [
        (
            {"archive": str(archives["absolute"])},
            InvalidInput,
            "refused: entry /etc/passwd has an absolute path",
        ),
        ({"archive": str(archives["dotdot"])}, InvalidInput, "has a '..' part"),
        ({"archive": str(archives["device"])}, InvalidInput, "refused: device node etc/sda outside /dev"),
        ({"archive": str(archives["through-link"])}, InvalidInput, "lies under the symbolic link etc"),
        ({"archive": str(archives["hardlink-out"])}, InvalidInput, "hard link etc/shadow ->"),
        ({"archive": str(archives["garbage"])}, InvalidInput, "is not a tar archive"),
        ({"archive": str(archives["tar"]), "sha256": "0" * 64}, InvalidInput, "sha256 is"),
        ({"archive": str(archives["tar"]), "sha256": "xyz"}, InvalidInput, "64 hexadecimal digits"),
        ({"archive": str(archives["tar"]), "size_mb": 1}, InvalidInput, "more than 1 MB"),
        ({"archive": "/no/such/file.tar"}, InvalidInput, "is not a file here"),
        ({"archive": "ftp://example.org/x.tar"}, InvalidInput, "is not a file here"),
        ({"archive": "http://127.0.0.1:9/x.tar"}, DriverError, "cannot download"),
        ({"archive": str(archives["tar"]), "storage": "nosuch"}, NotFound, "storage server"),
        ({"archive": str(archives["tar"]), "name": "a b"}, InvalidInput, "name"),
    ]
    for change, error, said in cases:
        options: dict[str, Any] = {"name": "jail", "storage": "st"}
        options.update(change)
        with ctx_for(settings, plugins) as ctx, pytest.raises(error) as info:
            images.import_filesystem_image(ctx, **options)
        assert said in str(info.value) and "\n" not in str(info.value), (change, str(info.value))
        assert state() == before, change
    assert not list(Path("/var/tmp").glob("qrm-import.*"))
    with ctx_for(settings, plugins) as ctx:
        images.import_filesystem_image(ctx, name="jail", storage="st", archive=str(archives["tar"]))
    with ctx_for(settings, plugins) as ctx, pytest.raises(AlreadyExists):
        images.import_filesystem_image(ctx, name="jail", storage="st", archive=str(archives["tar"]))


@pytest.fixture
def served(archives: dict[str, Path]) -> Iterator[str]:
    """The archives over HTTP on 127.0.0.1 (an ephemeral port)."""
    directory = archives["tar"].parent

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.qrm_backends("sqlite")  # the database plays no part beyond the others
def test_import_from_a_url_through_the_command_and_the_api(
    qrm_server: Any, qrm_cli: Any, archives: dict[str, Path], served: str
) -> None:
    with qrm_server.client() as api:
        assert (
            api.post(
                "/api/v1/storage", json={"name": "st", "type": "fake", "address": "10.0.11.35"}
            ).status_code
            == 201
        )
        made = api.post(
            "/api/v1/filesystem-images/import",
            json={"name": "jail", "storage": "st", "archive": f"{served}/root.tar.gz"},
        )
        assert made.status_code == 201, made.text
        assert made.json()["source"] == f"{served}/root.tar.gz"
        bad = api.post(
            "/api/v1/filesystem-images/import",
            json={"name": "evil", "storage": "st", "archive": f"{served}/absolute.tar"},
        )
        assert bad.status_code == 422 and "absolute path" in bad.json()["error"]["message"]
        local = api.post(
            "/api/v1/filesystem-images/import", json={"name": "x", "storage": "st", "archive": "/etc/passwd"}
        )
        assert local.status_code == 422 and "http(s) URL" in local.text
    server = ["--server", qrm_server.url, "-u", "qrm", "-p", "qrm"]
    done = qrm_cli(*server, "filesystem-image", "import", f"{served}/root.tar.xz", "-n", "jail2", "-s", "st")
    assert done.exit_code == 0 and "imported" in done.stdout, done.stderr
    refused = qrm_cli(*server, "filesystem-image", "import", str(archives["tar"]), "-n", "jail3", "-s", "st")
    assert refused.exit_code != 0 and "http(s) URL" in refused.stderr
    here = qrm_cli(
        "filesystem-image", "import", str(archives["tar"]), "-n", "jail4", "-s", "st", "-o", "json"
    )
    assert here.exit_code == 0, here.stderr
    assert json.loads(here.stdout)["origin"] == "imported"
