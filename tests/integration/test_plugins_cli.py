"""``qrm plugins ...`` with the example plugin and the broken plugin, through the real CLI.

Every test here runs on SQLite, PostgreSQL and MariaDB (``qrm_cli`` uses
``qrm_settings``): the enable/disable state is stored in the database.
"""

from __future__ import annotations

import json

from integration_support import BROKEN_DRIVER, BROKEN_PLUGIN, EXAMPLE_DISTRIBUTION, run_python, run_qrm

import qrm_core

MAC = "52:54:00:00:40:01"
LATER_MAC = "52:54:00:00:40:02"


def listing(qrm_cli) -> dict[tuple[str, str], dict]:
    result = qrm_cli("plugins", "list", "-o", "json")
    assert result.exit_code == 0, result.stderr
    return {(p["kind"], p["name"]): p for p in result.json()}


def one_line_error(result, *fragments: str) -> None:
    """A user's mistake: exit 1, one line on stderr, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def inventory_macs(settings) -> list[str]:
    path = settings.data_dir / "inventory" / "resources.json"
    return [r["mac"] for r in json.loads(path.read_text())["resources"]] if path.exists() else []


def test_the_example_plugin_is_found_and_works(qrm_cli, qrm_settings) -> None:
    assert qrm_cli("init").exit_code == 0
    plugins = listing(qrm_cli)
    example = plugins[("plugin", "example")]
    assert example["distribution"] == EXAMPLE_DISTRIBUTION
    assert (example["version"], example["enabled"], example["status"], example["error"]) == (
        qrm_core.__version__,
        True,
        "enabled",
        None,
    )
    assert example["description"].startswith("Keep a machine-readable inventory")
    assert plugins[("storage", "example-dir")]["status"] == "enabled"

    # Its hooks run on a real resource add, its command shows the result.
    assert qrm_cli("resource", "add", "-m", MAC, "--hostname", "node1").exit_code == 0
    assert inventory_macs(qrm_settings) == [MAC]
    shown = qrm_cli("example", "inventory", "-o", "json")
    assert shown.exit_code == 0 and [r["hostname"] for r in shown.json()] == ["node1"]
    # ...and its driver serves a storage server.
    assert qrm_cli("storage", "add", "-n", "local", "-t", "example-dir", "-i", "10.0.0.1").exit_code == 0
    assert qrm_cli("filesystem-image", "add", "-n", "web", "-s", "local", "--size", "8").exit_code == 0
    assert (qrm_settings.data_dir / "example-dir" / "local" / "web").is_dir()


def test_disable_persists_across_processes_and_enable_restores(qrm_cli, qrm_settings) -> None:
    assert qrm_cli("init").exit_code == 0
    disabled = qrm_cli("plugins", "disable", "example")
    assert disabled.exit_code == 0 and "disabled example" in disabled.stdout
    assert qrm_cli("plugins", "disable", "example").stdout.strip() == "example is already disabled"

    plugins = listing(qrm_cli)
    assert plugins[("plugin", "example")]["status"] == "disabled"
    # Disabling a plugin disables the drivers of its distribution.
    assert plugins[("storage", "example-dir")]["status"] == "disabled"

    # Its command is gone, its hooks do not run, its driver cannot be used.
    gone = qrm_cli("example", "inventory")
    assert gone.exit_code == 2 and "No such command 'example'" in gone.stderr
    assert qrm_cli("resource", "add", "-m", MAC).exit_code == 0
    assert inventory_macs(qrm_settings) == []
    one_line_error(
        qrm_cli("storage", "add", "-n", "local", "-t", "example-dir", "-i", "10.0.0.1"),
        "'example-dir'",
        "disabled",
    )

    # A new process reads the state from the database and never imports the plugin.
    code = (
        "import sys\n"
        "from qrm_core.cli.main import main\n"
        "code = main(['resource', 'add', '-m', sys.argv[1]])\n"
        "print('imported' if 'qrm_example.plugin' in sys.modules else 'not imported')\n"
        "sys.exit(code)\n"
    )
    fresh = run_python(code, LATER_MAC)
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.splitlines()[-1] == "not imported"
    assert inventory_macs(qrm_settings) == []

    # Enabling brings everything back; sync catches up with what was missed.
    enabled = qrm_cli("plugins", "enable", "example")
    assert enabled.exit_code == 0 and "enabled example" in enabled.stdout
    assert listing(qrm_cli)[("storage", "example-dir")]["status"] == "enabled"
    assert qrm_cli("example", "sync").exit_code == 0
    assert inventory_macs(qrm_settings) == [MAC, LATER_MAC]
    assert qrm_cli("storage", "add", "-n", "local", "-t", "example-dir", "-i", "10.0.0.1").exit_code == 0
    fresh = run_qrm("example", "inventory", "-o", "json")
    assert fresh.returncode == 0, fresh.stderr
    assert [r["mac"] for r in json.loads(fresh.stdout)] == [MAC, LATER_MAC]


def test_the_hint_for_a_driver_disabled_with_its_plugin_works(qrm_cli) -> None:
    assert qrm_cli("init").exit_code == 0
    assert qrm_cli("plugins", "disable", "example").exit_code == 0
    refused = qrm_cli("storage", "add", "-n", "local", "-t", "example-dir", "-i", "10.0.0.1")
    hint = refused.stderr.rsplit("'qrm ", 1)[-1].rstrip("'\n").split()
    assert qrm_cli(*hint).exit_code == 0  # follow the advice...
    assert qrm_cli("storage", "add", "-n", "local", "-t", "example-dir", "-i", "10.0.0.1").exit_code == 0


def test_a_broken_plugin_is_reported_and_breaks_nothing_else(qrm_cli) -> None:
    init = qrm_cli("init")
    assert init.exit_code == 0 and "Traceback" not in init.stderr
    plugins = listing(qrm_cli)
    plugin = plugins[("plugin", BROKEN_PLUGIN)]
    assert plugin["status"] == "broken"
    assert "ModuleNotFoundError" in plugin["error"]
    assert "qrm_broken_example_missing_dependency" in plugin["error"]
    driver = plugins[("storage", BROKEN_DRIVER)]
    assert driver["status"] == "broken" and "qrm_broken_example_missing_sdk" in driver["error"]
    # Everything else is unaffected.
    assert all(
        p["status"] != "broken" for key, p in plugins.items() if p["distribution"] != "qrm-broken-example"
    )

    for args in (("storage", "list"), ("resource", "list"), ("plugins", "list"), ("init",)):
        result = qrm_cli(*args)
        assert result.exit_code == 0 and "Traceback" not in result.stderr, (args, result.stderr)

    # Using the broken storage type: one line naming it, nothing changed.
    one_line_error(
        qrm_cli("storage", "add", "-n", "s1", "-t", BROKEN_DRIVER, "-i", "10.0.0.1"),
        f"driver '{BROKEN_DRIVER}'",
        "failed to load",
        "qrm_broken_example_missing_sdk",
    )
    assert qrm_cli("storage", "list", "-o", "json").json() == []

    # The same from a new process, with the installed command.
    table = run_qrm("plugins", "list")
    assert table.returncode == 0 and "Traceback" not in table.stderr
    assert BROKEN_PLUGIN in table.stdout and "broken" in table.stdout


def test_names_that_are_not_installed_are_refused_by_name(qrm_cli) -> None:
    assert qrm_cli("init").exit_code == 0
    one_line_error(qrm_cli("plugins", "disable", "no-such-plugin"), "'no-such-plugin'", "installed:")
    one_line_error(qrm_cli("plugins", "enable", "no-such-plugin"), "'no-such-plugin'")
    one_line_error(
        qrm_cli("storage", "add", "-n", "s1", "-t", "no-such-type", "-i", "10.0.0.1"), "'no-such-type'"
    )
    # The broken plugin can be disabled like any other (and is then not reported broken).
    assert qrm_cli("plugins", "disable", BROKEN_PLUGIN).exit_code == 0
    plugins = listing(qrm_cli)
    assert plugins[("plugin", BROKEN_PLUGIN)]["status"] == "disabled"
    assert plugins[("storage", BROKEN_DRIVER)]["status"] == "disabled"
