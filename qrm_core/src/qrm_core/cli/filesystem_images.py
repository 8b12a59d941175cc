"""``qrm filesystem-image``: root filesystems on storage servers."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from qrm_core.cli.common import CommentOpt, OutputOpt, client, done, object_command, sub_app
from qrm_core.cli.output import Output, columns, show_list

app = sub_app("Filesystem images on storage servers.")

COLUMNS = columns("name", "storage", "location", "origin", "state", "size_mb", "source", "used_by")


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("-n", "--name", help="name of the filesystem image")],
    storage: Annotated[str, typer.Option("-s", "--storage", help="storage server holding it")],
    location: Annotated[
        str | None, typer.Option("-l", "--location", help="existing volume (export path, target)")
    ] = None,
    size: Annotated[
        int | None, typer.Option("--size", help="create a new empty volume of this many MB instead")
    ] = None,
    auto: Annotated[
        bool, typer.Option("--auto", help="fill the new volume on the first start of a VE that uses it")
    ] = False,
    fill_from: Annotated[
        str | None,
        typer.Option(
            "--fill-from",
            help="with --auto: another image, a root filesystem archive (file or URL), or "
            "local-disk[:/dev/DEVICE] (the local disk of the machine that first boots it)",
        ),
    ] = None,
    sha256: Annotated[
        str | None, typer.Option("--sha256", help="with --auto from an archive: its sha256")
    ] = None,
    comment: CommentOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Add a filesystem image: an existing volume (-l), a new empty one (--size), or a new
    one filled on the first start of a VE that uses it (--size --auto --fill-from SOURCE)."""
    from qrm_core.errors import InvalidInput

    if auto != (fill_from is not None):
        raise InvalidInput(
            "--auto and --fill-from go together: an auto image is filled from a source named now"
        )
    if sha256 is not None and not auto:
        raise InvalidInput("--sha256 is for --auto images filled from an archive")
    options = {"fill_from": fill_from, "sha256": sha256} if auto else {}
    result = client(ctx).fs_image_add(
        name=name, storage=storage, location=location, size_mb=size, comment=comment, **options
    )
    said = f" (filled from {fill_from} on the first start of a VE)" if auto else ""
    done(result, f"added filesystem image {result.name} ({result.storage}:{result.location}){said}", output)


@app.command("list")
def list_(
    ctx: typer.Context,
    storage: Annotated[str | None, typer.Option("-s", "--storage", help="only this storage server")] = None,
    output: OutputOpt = Output.table,
) -> None:
    """List filesystem images."""
    show_list(client(ctx).fs_image_list(storage), COLUMNS, output, "Filesystem images")


object_command(app, "show", "Show one filesystem image.", lambda c, name: c.fs_image_show(name))


@app.command("remove")
def remove(
    ctx: typer.Context,
    name: str,
    purge: Annotated[bool, typer.Option("--purge", help="also destroy the volume and its data")] = False,
    output: OutputOpt = Output.table,
) -> None:
    """Remove a filesystem image no virtual environment uses."""
    result = client(ctx).fs_image_remove(name, purge)
    done(result, f"removed filesystem image {result.name}" + (" and its volume" if purge else ""), output)


# ---------------------------------------------------------------------------
# Capture, clone, snapshots
# ---------------------------------------------------------------------------

IdentityOpt = Annotated[
    Path | None,
    typer.Option(
        "--identity",
        "-i",
        help="private key that logs in to the machine (default ~/.ssh/id_ed25519, then id_ecdsa, id_rsa)",
    ),
]
PasswordFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--password-file",
        help="log in with the password in this file's first line (mode 600: no one else may read it)",
    ),
]
AskPasswordOpt = Annotated[
    bool,
    typer.Option(
        "--ask-password",
        help="log in with a password asked on the terminal (not echoed), even if you have a key",
    ),
]
HostKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--host-key",
        help="the machine's SSH host key ('TYPE BASE64' or a .pub file); default: pinned at first login",
    ),
]


def _password_file(path: Path) -> str:
    """The first line of a file no one but its owner may read (like qrm's other secret files)."""
    import stat

    from qrm_core.errors import InvalidInput

    path = path.expanduser()
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(
            f"cannot read the password file {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidInput(
            f"the password file {path} can be read by others (mode {stat.S_IMODE(mode):o}); chmod 600 it"
        )
    password = text.split("\n", 1)[0].rstrip("\r")
    if not password:
        raise InvalidInput(f"the password file {path} is empty")
    return password


def _ask_password(prompt: str) -> str:
    import getpass

    from qrm_core.errors import InvalidInput

    if not sys.stdin.isatty():
        raise InvalidInput("no terminal to ask the password on: give it with --password-file FILE")
    password = getpass.getpass(prompt)
    if not password:
        raise InvalidInput("no password given")
    return password


def _login(
    identity: Path | None, password_file: Path | None, ask: bool, prompt: str
) -> tuple[str | None, str | None]:
    """(the key, the password) that log in to the machine: ``--identity``, ``--password-file``,
    ``--ask-password``; none given: the default key, else (on a terminal) a password prompt."""
    from qrm_core.errors import InvalidInput

    if sum((identity is not None, password_file is not None, ask)) > 1:
        raise InvalidInput("give one of --identity, --password-file and --ask-password")
    if password_file is not None:
        return None, _password_file(password_file)
    if ask:
        return None, _ask_password(prompt)
    if identity is None and _default_key() is None:
        if sys.stdin.isatty():
            return None, _ask_password(prompt)
        raise InvalidInput(
            "give the key that logs in to the machine with --identity FILE, or its password "
            "with --password-file FILE"
        )
    return _identity(identity), None


def _default_key() -> Path | None:
    for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
        candidate = Path.home() / ".ssh" / name
        if candidate.is_file():
            return candidate
    return None


def _identity(path: Path | None) -> str:
    from qrm_core.errors import InvalidInput

    if path is None:
        path = _default_key()
        if path is None:
            raise InvalidInput(
                "give the key that logs in to the machine with --identity FILE (or a password "
                "with --password-file FILE)"
            )
    try:
        return path.expanduser().read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(
            f"cannot read the identity {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


def _host_key(text: str | None) -> str | None:
    if text is None:
        return None
    candidate = Path(text).expanduser()
    if "/" in text or text.endswith(".pub"):
        try:
            return candidate.read_text().strip()
        except OSError as exc:
            from qrm_core.errors import InvalidInput

            raise InvalidInput(f"cannot read the host key {text}: {exc.strerror}") from None
    return text


def _progress(output: Output) -> Callable[[str], None]:
    """One line per change of what the job says (on a terminal: the same line rewritten)."""
    terminal = sys.stderr.isatty()
    last = [""]

    def show(line: str) -> None:
        if output is not Output.table or line == last[0]:
            return
        last[0] = line
        if terminal:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return show


def _end_progress() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")


@app.command("create")
def create(
    ctx: typer.Context,
    source: Annotated[
        str | None,
        typer.Option(
            "--from",
            "-l",
            help="the running machine to capture: [user@]host:/path (root@10.0.11.172:/)",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option("-n", "--name", help="name of the new filesystem image")] = None,
    storage: Annotated[
        str | None, typer.Option("-s", "--storage", help="storage server to put it on")
    ] = None,
    target: Annotated[
        str | None,
        typer.Option("-t", "--target", help="openQRM's target path (/vhosts/NAME): names the image NAME"),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude", help="rsync pattern not to copy, besides /proc, /sys, /dev, /run, /tmp, ..."
        ),
    ] = None,
    identity: IdentityOpt = None,
    password_file: PasswordFileOpt = None,
    ask_password: AskPasswordOpt = False,
    host_key: HostKeyOpt = None,
    port: Annotated[int | None, typer.Option("--port", help="the machine's SSH port (22)")] = None,
    size: Annotated[int | None, typer.Option("--size", help="size of the new volume in MB (8192)")] = None,
    bwlimit: Annotated[
        int | None,
        typer.Option("--bwlimit", help="copy at most this many KB/s (spare the machine's network)"),
    ] = None,
    comment: CommentOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Capture a running machine into a new filesystem image over SSH + rsync.

    qrm logs in to the machine as root with a key (--identity, default
    ~/.ssh/id_ed25519...) or with root's password (asked on the terminal, not
    echoed, when you have no key or give --ask-password; --password-file FILE
    otherwise) and rsyncs its root filesystem into a new volume on the storage
    server (from the storage server itself when qrm manages it over SSH). /proc, /sys, /dev, /run, /tmp and the machine's SSH
    host keys are not copied; its machine-id is reset. Interrupted? Run
    'qrm filesystem-image capture NAME' to go on where it stopped.

        qrm filesystem-image create -n FC6INSTALL -s NFS --from root@10.0.11.172:/
        qrm filesystem-image create -s NFS -l 10.0.11.172:/ -t /vhosts/FC6INSTALL
    """
    from qrm_core.errors import InvalidInput

    if source is None:
        raise InvalidInput("give the machine to capture with --from [user@]host:/path (or -l)")
    if target is not None:
        base = target.rstrip("/").rsplit("/", 1)[-1]
        if name is not None and name != base:
            raise InvalidInput(f"-n {name} and -t {target} name different images")
        name = base
    if name is None:
        raise InvalidInput("give the new image's name with -n NAME (or -t /vhosts/NAME)")
    if storage is None:
        raise InvalidInput("give the storage server with -s STORAGE")
    who = source.rsplit(":", 1)[0]
    who = who if "@" in who else f"root@{who}"
    key, password = _login(identity, password_file, ask_password, f"{who}'s password: ")
    try:
        result = client(ctx).fs_image_capture(
            _progress(output),
            name=name,
            storage=storage,
            source=source,
            identity=key,
            password=password,
            host_key=_host_key(host_key),
            port=port,
            excludes=exclude or [],
            size_mb=size,
            bwlimit=bwlimit,
            comment=comment,
        )
    finally:
        _end_progress()
    done(
        result,
        f"captured {source} into filesystem image {result.name} ({result.storage}:{result.location})",
        output,
    )


@app.command("import")
def import_(
    ctx: typer.Context,
    archive: Annotated[str, typer.Argument(help="a root filesystem archive: a file or an http(s) URL")],
    name: Annotated[str, typer.Option("-n", "--name", help="name of the new filesystem image")],
    storage: Annotated[str, typer.Option("-s", "--storage", help="storage server to put it on")],
    sha256: Annotated[str | None, typer.Option("--sha256", help="the archive's expected sha256")] = None,
    size: Annotated[
        int | None, typer.Option("--size", help="size of the new volume in MB (default: what the files need)")
    ] = None,
    comment: CommentOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """A new filesystem image from a root filesystem archive (tar, .tar.gz/.bz2/.xz/.zst).

    The checksum is verified (--sha256) and every entry checked before anything is
    made: absolute paths, '..' parts, device nodes outside /dev and entries under a
    symbolic link are refused.
    """
    try:
        result = client(ctx).fs_image_import(
            _progress(output), name=name, storage=storage, archive=archive, sha256=sha256, size_mb=size,
            comment=comment,
        )  # fmt: skip
    finally:
        _end_progress()
    done(
        result,
        f"imported {archive} into filesystem image {result.name} ({result.storage}:{result.location})",
        output,
    )


@app.command("capture")
def capture_again(
    ctx: typer.Context,
    name: str,
    identity: IdentityOpt = None,
    password_file: PasswordFileOpt = None,
    ask_password: AskPasswordOpt = False,
    host_key: HostKeyOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Capture again into a captured image: go on after an interruption, or update it.

    Only what is missing or changed on the machine is copied (rsync). It logs in
    as 'create' does: a key, or a password (asked, or --password-file)."""
    key, password = _login(
        identity, password_file, ask_password, f"password of the machine {name} was captured from: "
    )
    try:
        result = client(ctx).fs_image_resume(
            name, key, _host_key(host_key), _progress(output), password=password
        )
    finally:
        _end_progress()
    done(result, f"filesystem image {result.name} captured from {result.source}", output)


@app.command("clone")
def clone(
    ctx: typer.Context,
    source: str,
    name: Annotated[str, typer.Option("-n", "--name", help="name of the new filesystem image")],
    storage: Annotated[
        str | None,
        typer.Option(
            "-s",
            "--storage",
            "--to-storage",
            help="storage server of the copy (default: the source's; another one gets the files copied over)",
        ),
    ] = None,
    comment: CommentOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """A new filesystem image with a copy of SOURCE's data (copy-on-write where the storage can).

    Onto another storage server (-s), the files are copied through qrm's machine,
    with progress, into a volume of SOURCE's size there."""
    try:
        result = client(ctx).fs_image_clone(source, name, storage, comment, _progress(output))
    finally:
        _end_progress()
    done(
        result,
        f"cloned {source} into filesystem image {result.name} ({result.storage}:{result.location})",
        output,
    )


@app.command("snapshot")
def snapshot(
    ctx: typer.Context,
    name: str,
    label: Annotated[
        str | None, typer.Option("--label", help="the snapshot's name (default: the time)")
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Keep the image's data as it is now (list with 'snapshots', go back with 'revert')."""
    result = client(ctx).fs_image_snapshot(name, label)
    done(result, f"snapshot {result.label} of {result.image} taken ({result.how or 'done'})", output)


@app.command("snapshots")
def snapshots(ctx: typer.Context, name: str, output: OutputOpt = Output.table) -> None:
    """List an image's snapshots, oldest first."""
    show_list(client(ctx).fs_image_snapshots(name), columns("image", "label"), output, "Snapshots")


@app.command("snapshot-remove")
def snapshot_remove(ctx: typer.Context, name: str, label: str, output: OutputOpt = Output.table) -> None:
    """Forget one snapshot of an image."""
    result = client(ctx).fs_image_snapshot_remove(name, label)
    done(result, f"removed snapshot {result.label} of {result.image}", output)


@app.command("revert")
def revert(
    ctx: typer.Context,
    name: str,
    to: Annotated[str, typer.Option("--to", help="the snapshot to go back to")],
    output: OutputOpt = Output.table,
) -> None:
    """Put the image's data back as it was at a snapshot (refused while a VE runs on it)."""
    result = client(ctx).fs_image_revert(name, to)
    done(result, f"reverted {result.image} to {result.label} ({result.how or 'done'})", output)
