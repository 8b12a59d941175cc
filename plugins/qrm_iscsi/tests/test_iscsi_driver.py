"""The iscsi driver against a real tgtd on a storage host reached over SSH, with libiscsi's
tools as the initiator: volumes, ACLs by initiator name, CHAP per image, read-only LUNs
for more than one initiator, batches, and bad input (one line, nothing changed)."""

from __future__ import annotations

import subprocess

import pytest
from conftest import ADDRESS, IscsiLab

from qrm_core.plugin_api import (
    AlreadyExists,
    DriverError,
    ExportClient,
    ExportRequest,
    InvalidInput,
    NotFound,
)

A = ExportClient(mac="52:54:00:00:00:0a", ip="10.231.11.50", initiator="iqn.2026-12.org.qrm:52540000000a")
B = ExportClient(mac="52:54:00:00:00:0b", ip="10.231.11.51", initiator="iqn.2026-12.org.qrm:52540000000b")


def login(lab: IscsiLab, volume: str, client: ExportClient, user: str | None, password: str | None) -> bool:
    """iscsi-inq of LUN 1 as ``client`` (a full login, CHAP when given): did it work?"""
    target = lab.driver.target_name(lab.storage(), volume)
    auth = f"{user}%{password}@" if user else ""
    done = lab.client("iscsi-inq", "-i", str(client.initiator), f"iscsi://{auth}{ADDRESS}/{target}/1")
    return done.returncode == 0 and "IET" in done.stdout


def secrets(lab: IscsiLab, volume: str) -> tuple[str, str]:
    spec = lab.driver.describe_root(lab.storage(), volume, A)
    return spec.secrets["chap_username"], spec.secrets["chap_password"]


def test_a_volume_is_an_ext4_lun_behind_chap_and_an_acl(lab: IscsiLab) -> None:
    driver, storage = lab.driver, lab.storage()
    info = lab.on(lambda: driver.create_volume(storage, "web", 64))
    assert (info.location, info.size_mb) == ("web", 64)
    image = lab.backing / "web.img"
    assert image.stat().st_size == 64 << 20
    probe = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True)
    assert "Filesystem volume name:   qrm-web" in probe.stdout
    shown = lab.tgt_show()
    target = driver.target_name(storage, "web")
    assert target == "iqn.2026-12.org.qrm.storage:st.web" and f": {target}" in shown
    assert f"Backing store path: {image}" in shown and "qrm-web" in shown
    user, password = secrets(lab, "web")
    assert user == "qrm-web" and len(password) == 24 and password.isalnum()
    # Nobody is on the ACL yet: even the right CHAP account cannot log in.
    assert not login(lab, "web", A, user, password)

    lab.on(lambda: driver.export_volume(storage, "web", A))
    assert login(lab, "web", A, user, password)
    assert not login(lab, "web", A, user, "WrongSecret1234567890abc")
    assert not login(lab, "web", A, None, None)
    assert not login(lab, "web", B, user, password)  # not on the ACL
    lab.on(lambda: driver.export_volume(storage, "web", A))  # idempotent
    assert lab.tgt_show().count(str(A.initiator)) == 1
    assert "Readonly: No" in lab.tgt_show().split("LUN: 1")[1]

    # A second initiator: the LUN is read-only first (never two machines on a writable image).
    lab.on(lambda: driver.export_volume(storage, "web", B))
    assert login(lab, "web", B, user, password)
    assert "Readonly: Yes" in lab.tgt_show().split("LUN: 1")[1]
    assert [v.exported_to for v in lab.on(lambda: driver.list_volumes(storage))] == [
        (str(A.initiator), str(B.initiator))
    ]
    lab.on(lambda: driver.unexport_volume(storage, "web", B))
    assert not login(lab, "web", B, user, password)
    assert "Readonly: No" in lab.tgt_show().split("LUN: 1")[1]
    lab.on(lambda: driver.unexport_volume(storage, "web", B))  # idempotent

    # Still exported: not removed. Then removed with its target and account.
    with pytest.raises(DriverError, match=f"volume web is still exported to {A.initiator}"):
        lab.on(lambda: driver.remove_volume(storage, "web"))
    assert image.exists()
    lab.on(lambda: driver.unexport_volume(storage, "web", A))
    lab.on(lambda: driver.remove_volume(storage, "web"))
    assert not image.exists() and target not in lab.tgt_show()
    assert "qrm-web" not in lab.host.tgtadm("--op", "show", "--mode", "account").stdout
    with pytest.raises(NotFound, match="volume web does not exist on st"):
        lab.on(lambda: driver.remove_volume(storage, "web"))


def test_create_refuses_what_exists_and_what_does_not_fit(lab: IscsiLab) -> None:
    driver, storage = lab.driver, lab.storage()
    lab.on(lambda: driver.create_volume(storage, "twice", 16))
    before = lab.tgt_show()
    with pytest.raises(AlreadyExists, match="volume twice already exists on st"):
        lab.on(lambda: driver.create_volume(storage, "twice", 16))
    with pytest.raises(
        DriverError, match=r"cannot create volume huge on st \(root@10.231.11.35\): only \d+ MB free"
    ):
        lab.on(lambda: driver.create_volume(storage, "huge", 1 << 30))
    assert not (lab.backing / "huge.img").exists() and lab.tgt_show() == before
    lab.on(lambda: driver.remove_volume(storage, "twice"))


def test_a_batch_reports_each_request(lab: IscsiLab) -> None:
    """Three volumes, two machines each, a request without an initiator and one for a volume
    that does not exist: one round trip; every request gets its own outcome."""
    driver, storage = lab.driver, lab.storage()
    for name in ("b1", "b2", "b3"):
        lab.on(lambda name=name: driver.create_volume(storage, name, 16))
    nobody = ExportClient(mac="52:54:00:00:00:0c", ip=None, initiator=None)
    requests = [ExportRequest(v, c) for v in ("b1", "b2", "b3") for c in (A, B)]
    requests += [ExportRequest("b1", nobody), ExportRequest("nosuch", A)]
    outcomes = lab.on(lambda: driver.export_volumes(storage, requests))
    assert [o.request for o in outcomes] == requests
    assert [o.error for o in outcomes[:6]] == [None] * 6
    assert (
        isinstance(outcomes[6].error, InvalidInput)
        and "no valid iSCSI initiator name" in outcomes[6].error.message
    )
    assert isinstance(outcomes[7].error, DriverError)
    assert (
        "cannot export iSCSI volume nosuch" in outcomes[7].error.message
        and "no volume nosuch" in outcomes[7].error.message
    )
    shown = lab.tgt_show()
    assert shown.count(str(A.initiator)) == 3 and shown.count(str(B.initiator)) == 3
    assert "nosuch" not in shown  # nothing half-exported
    back = lab.on(lambda: driver.unexport_volumes(storage, requests[:6]))
    assert [o.error for o in back] == [None] * 6
    assert str(A.initiator) not in lab.tgt_show()
    for name in ("b1", "b2", "b3"):
        lab.on(lambda name=name: driver.remove_volume(storage, name))


def test_an_imported_volume_gets_its_target_at_its_first_export(lab: IscsiLab) -> None:
    """A LUN file qrm did not create (or a tgtd that lost its targets): the export makes the
    target, LUN and account, then the ACL."""
    driver, storage = lab.driver, lab.storage()
    image = lab.backing / "imported.img"
    subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    driver.validate_location(storage, "imported")
    lab.on(lambda: driver.export_volume(storage, "imported", A))
    user, password = secrets(lab, "imported")
    assert login(lab, "imported", A, user, password)
    lab.on(lambda: driver.unexport_volume(storage, "imported", A))
    lab.on(lambda: driver.remove_volume(storage, "imported"))
    assert not image.exists()


def test_describe_root_gives_the_agent_its_arguments_and_keeps_the_secret_out(lab: IscsiLab) -> None:
    driver, storage = lab.driver, lab.storage()
    spec = driver.describe_root(storage, "web", A)
    target = "iqn.2026-12.org.qrm.storage:st.web"
    assert spec.kernel_args == (
        f"qrm.iscsi={ADDRESS}:3260:1:{target}",
        f"qrm.initiator={A.initiator}",
        "rootfstype=ext4",
        "rw",
    )
    shared = driver.describe_root(storage, "web", A, shared=True)
    assert shared.kernel_args[-2:] == ("ro", "qrm.overlay=tmpfs")
    password = spec.secrets["chap_password"]
    assert password not in " ".join(spec.kernel_args) + spec.description + repr(spec)
    # Stable for the image, different for another image or another storage server.
    assert driver.describe_root(storage, "web").secrets == spec.secrets
    assert driver.describe_root(storage, "db").secrets["chap_password"] != password
    other = type(storage)(name="st2", type="iscsi", address=ADDRESS, settings={})
    assert driver.describe_root(other, "web").secrets["chap_password"] != password


def test_check_server(lab: IscsiLab) -> None:
    driver = lab.driver
    lab.on(lambda: driver.check_server(lab.storage()))
    with pytest.raises(DriverError, match=r"^tgtd is not running on st \(root@10.231.11.35\)"):
        lab.on(lambda: driver.check_server(lab.storage(tgt_control_port="18")))
    with pytest.raises(DriverError, match=r"has no writable directory /nonexistent/luns$"):
        lab.on(lambda: driver.check_server(lab.storage(backing_dir="/nonexistent/luns")))
    with pytest.raises(DriverError, match=r"has no volume group qrmtestvg$"):
        lab.on(lambda: driver.check_server(lab.storage(volume_group="qrmtestvg")))
    with pytest.raises(
        DriverError, match=r"^cannot reach storage server st \(root@10.231.11.35:2222\): nothing listens"
    ):
        lab.on(lambda: driver.check_server(lab.storage(ssh_port="2222")))
    unreachable = type(lab.storage())(
        name="st", type="iscsi", address="10.231.11.99", settings={"ssh_user": "root"}
    )
    with pytest.raises(DriverError, match=r"^cannot reach storage server st \(root@10.231.11.99\)"):
        lab.on(lambda: driver.check_server(unreachable))


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda d, s: d.create_volume(s, "a;reboot", 16), "invalid iSCSI volume name 'a;reboot'"),
        (lambda d, s: d.create_volume(s, "../etc", 16), "invalid iSCSI volume name '../etc'"),
        (lambda d, s: d.create_volume(s, "Web", 16), "invalid iSCSI volume name 'Web'"),
        (lambda d, s: d.create_volume(s, "ok", 0), "volume size must be a positive number of MB"),
        (lambda d, s: d.validate_location(s, "x y"), "invalid iSCSI volume name 'x y'"),
        (lambda d, s: d.remove_volume(s, "$(reboot)"), "invalid iSCSI volume name '$(reboot)'"),
        (
            lambda d, s: d.export_volume(
                s, "web", ExportClient(mac="m", ip=None, initiator="iqn.2026-12.org.qrm:x;reboot")
            ),
            "cannot export web to m: no valid iSCSI initiator name",
        ),
        (
            lambda d, s: d.create_volume(
                s.__class__(**{**s.__dict__, "settings": {**s.settings, "backing_dir": "/tmp/$(reboot)"}}),
                "ok",
                16,
            ),
            "iscsi storage setting: backing_dir '/tmp/$(reboot)' must be an absolute path",
        ),
        (
            lambda d, s: d.validate_server(
                s.__class__(**{**s.__dict__, "settings": {"volume_group": "vg;x"}})
            ),
            "iscsi storage setting: volume_group 'vg;x' is not an LVM volume group name",
        ),
        (
            lambda d, s: d.validate_server(s.__class__(**{**s.__dict__, "settings": {"portal": "3260"}})),
            "unknown iscsi storage setting(s) portal",
        ),
        (
            lambda d, s: d.validate_server(s.__class__(**{**s.__dict__, "address": "fe80::1"})),
            "iSCSI storage address fe80::1 must be an IPv4 address",
        ),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(lab: IscsiLab, call: object, says: str) -> None:
    before = (lab.tgt_show(), sorted(p.name for p in lab.backing.iterdir()))
    with pytest.raises((InvalidInput, DriverError)) as caught:
        lab.on(lambda: call(lab.driver, lab.storage()))  # type: ignore[operator]
    assert caught.value.message.startswith(says), caught.value.message
    assert "\n" not in caught.value.message
    assert (lab.tgt_show(), sorted(p.name for p in lab.backing.iterdir())) == before


def test_a_storage_server_without_ssh_settings_is_this_machine(lab: IscsiLab) -> None:
    """The same driver run on the storage server itself (a process in the host's namespaces):
    no SSH settings, the scripts run locally."""
    import sys

    code = (
        "import sys\n"
        "from qrm_core.plugin_api import ExportClient, Settings, StorageTarget\n"
        "from qrm_iscsi.driver import IscsiStorage\n"
        "from qrm_iscsi.settings import IscsiSettings\n"
        f"d = IscsiStorage(Settings(data_dir={str(lab.core.data_dir)!r}), IscsiSettings(backing_dir={lab.iscsi.backing_dir!r}, "
        f"tgt_control_port=17, state_dir={lab.iscsi.state_dir!r}))\n"
        f"s = StorageTarget(name='st', type='iscsi', address={ADDRESS!r})\n"
        "d.check_server(s)\n"
        "d.create_volume(s, 'local', 16)\n"
        f"d.export_volume(s, 'local', ExportClient(mac='m', ip=None, initiator={A.initiator!r}))\n"
        "print([v.exported_to for v in d.list_volumes(s)], d.capacity(s).volumes)\n"
    )
    done = subprocess.run(
        lab.host.argv([sys.executable, "-c", code]), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"[('{A.initiator}',)] 1"
    user, password = secrets(lab, "local")
    assert login(lab, "local", A, user, password)
    lab.on(lambda: lab.driver.unexport_volume(lab.storage(), "local", A))
    lab.on(lambda: lab.driver.remove_volume(lab.storage(), "local"))
