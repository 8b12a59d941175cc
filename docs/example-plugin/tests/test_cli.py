"""``qrm example ...`` as a user runs it: the plugin is found through its installed entry point."""

from __future__ import annotations

import json


def test_inventory_commands(qrm_cli, qrm_settings) -> None:
    assert qrm_cli("init").exit_code == 0
    listing = {(p["kind"], p["name"]): p for p in qrm_cli("plugins", "list", "-o", "json").json()}
    assert listing[("plugin", "example")]["status"] == "enabled"
    assert listing[("storage", "example-dir")]["status"] == "enabled"

    empty = qrm_cli("example", "inventory")
    assert empty.exit_code == 0 and "(no resources in" in empty.stdout

    assert qrm_cli("resource", "add", "-m", "52:54:00:00:20:01", "--hostname", "n1").exit_code == 0
    table = qrm_cli("example", "inventory")
    assert table.exit_code == 0
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "MAC", "IP"]
    assert "52:54:00:00:20:01" in table.stdout and "n1" in table.stdout
    rows = qrm_cli("example", "inventory", "-o", "json").json()
    assert [(r["mac"], r["hostname"], r["state"]) for r in rows] == [("52:54:00:00:20:01", "n1", "new")]


def test_sync_rebuilds_and_bad_input_is_one_line(qrm_cli, qrm_settings) -> None:
    assert qrm_cli("init").exit_code == 0
    assert qrm_cli("resource", "add", "-m", "52:54:00:00:20:02").exit_code == 0
    path = qrm_settings.data_dir / "inventory" / "resources.json"
    path.write_text("garbage")
    broken = qrm_cli("example", "inventory")
    assert broken.exit_code == 1
    assert broken.stderr.count("\n") == 1 and "qrm example sync" in broken.stderr
    assert "Traceback" not in broken.stderr

    synced = qrm_cli("example", "sync")
    assert synced.exit_code == 0 and "wrote 1 resource(s)" in synced.stdout
    assert [r["mac"] for r in json.loads(path.read_text())["resources"]] == ["52:54:00:00:20:02"]

    bad = qrm_cli("example", "inventory", "-o", "yaml")
    assert bad.exit_code == 2
