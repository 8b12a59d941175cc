"""The plugin system with real pluggy and stevedore: registration, isolation, drivers."""

from types import SimpleNamespace

import pytest
import typer
from sqlmodel import select

from qrm_core import hookimpl
from qrm_core.errors import DriverNotFound, PluginError
from qrm_core.models import Event
from qrm_core.plugins import PluginSystem
from qrm_core.services import resources


class Recorder:
    """A well-behaved plugin that records what it was told."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.configured = False

    @hookimpl
    def qrm_configure(self, settings) -> None:
        self.configured = True

    @hookimpl
    def qrm_resource_added(self, resource) -> None:  # takes a subset of the arguments
        self.added.append(resource.mac)

    @hookimpl
    def qrm_boot_kernel_args(self, resource, ve, boot_image, ctx):
        return ["console=ttyS0"]


class Exploding:
    @hookimpl
    def qrm_resource_added(self, resource, ctx) -> None:
        raise RuntimeError("kaboom")

    @hookimpl
    def qrm_boot_kernel_args(self, resource):
        return ["quiet"]


def test_event_hook_failures_are_isolated_and_recorded(qrm_ctx, qrm_plugins: PluginSystem) -> None:
    recorder = Recorder()
    qrm_plugins.register(recorder, "recorder")
    qrm_plugins.register(Exploding(), "exploding")
    assert recorder.configured  # qrm_configure is historic
    resources.add_resource(qrm_ctx, mac="52:54:00:00:00:01")
    assert recorder.added == ["52:54:00:00:00:01"]
    errors = qrm_ctx.session.exec(select(Event).where(Event.level == "error")).all()
    assert [(e.object_name, "kaboom" in e.message) for e in errors] == [("exploding", True)]
    # The change itself stands.
    assert resources.show_resource(qrm_ctx, "52:54:00:00:00:01").state == "new"


def test_collecting_hooks_concatenate_and_name_the_failing_plugin(qrm_ctx, qrm_plugins) -> None:
    qrm_plugins.register(Recorder(), "recorder")
    qrm_plugins.register(Exploding(), "exploding")
    r = resources.add_resource(qrm_ctx, mac="52:54:00:00:00:02")
    args = qrm_plugins.hooks.boot_kernel_args(r, None, SimpleNamespace(name="b"), qrm_ctx.hook_ctx)
    assert sorted(args) == ["console=ttyS0", "quiet"]

    class Bad:
        @hookimpl
        def qrm_boot_kernel_args(self):
            return "not-a-list"

    qrm_plugins.register(Bad(), "bad")
    with pytest.raises(PluginError, match=r"plugin 'bad'.*a list is required"):
        qrm_plugins.hooks.boot_kernel_args(r, None, SimpleNamespace(name="b"), qrm_ctx.hook_ctx)


def test_invalid_hook_implementations_are_rejected(qrm_plugins) -> None:
    class Misspelt:
        @hookimpl
        def qrm_resource_adedd(self, resource) -> None:
            pass

    class WrongArgs:
        @hookimpl
        def qrm_resource_added(self, resource, nonsense) -> None:
            pass

    assert not qrm_plugins.register(Misspelt(), "misspelt")
    assert not qrm_plugins.register(WrongArgs(), "wrongargs")
    records = {r.name: r for r in qrm_plugins.entries()}
    assert "unknown hook(s): qrm_resource_adedd" in records["misspelt"].error
    assert "nonsense" in records["wrongargs"].error
    assert qrm_plugins.pm.get_plugin("misspelt") is None


def test_drivers_are_loaded_by_name_only(qrm_plugins) -> None:
    driver = qrm_plugins.storage_driver("FAKE")
    assert driver.name == "fake" and qrm_plugins.storage_driver("fake") is driver
    assert qrm_plugins.hypervisor_driver("fake").name == "fake"
    with pytest.raises(DriverNotFound, match="unknown storage type 'iscsi'; installed: fake"):
        qrm_plugins.storage_driver("iscsi")
    with pytest.raises(DriverNotFound, match="unknown hypervisor 'xen'"):
        qrm_plugins.hypervisor_driver("xen")


def test_enabled_driver_lists_restrict_drivers(qrm_settings) -> None:
    settings = qrm_settings.model_copy(update={"enabled_storage": []})
    system = PluginSystem(settings, discover_plugins=False).load()
    with pytest.raises(DriverNotFound):
        system.storage_driver("fake")
    assert system.hypervisor_driver("fake").name == "fake"


def test_disabled_names_are_not_loaded(qrm_settings) -> None:
    system = PluginSystem(qrm_settings, disabled={"fake"}, discover_plugins=False).load()
    with pytest.raises(PluginError, match="disabled"):
        system.storage_driver("fake")


def test_plugin_commands_are_mounted_and_a_failing_plugin_is_contained(
    qrm_cli, qrm_settings, monkeypatch
) -> None:
    from qrm_core import plugins as plugins_module

    class Commands:
        @hookimpl
        def qrm_register_commands(self, app: typer.Typer) -> None:
            sub = typer.Typer()

            @sub.command("hello")
            def hello() -> None:
                typer.echo("hello from a plugin")

            app.add_typer(sub, name="greet")

    class Broken:
        @hookimpl
        def qrm_register_commands(self, app: typer.Typer) -> None:
            raise RuntimeError("cannot build my commands")

    real_load = PluginSystem.load

    def load_with_test_plugins(self):
        real_load(self)
        if self.pm.get_plugin("commands") is None:
            self.register(Commands(), "commands")
            self.register(Broken(), "broken")
        return self

    monkeypatch.setattr(plugins_module.PluginSystem, "load", load_with_test_plugins)
    assert qrm_cli("init").exit_code == 0
    result = qrm_cli("greet", "hello")
    assert result.exit_code == 0 and "hello from a plugin" in result.stdout
    listing = {p["name"]: p for p in qrm_cli("plugins", "list", "-o", "json").json()}
    assert listing["broken"]["status"] == "broken"
    assert "cannot build my commands" in listing["broken"]["error"]
    assert qrm_cli("storage", "list").exit_code == 0


def test_comma_separated_settings_from_the_environment(monkeypatch) -> None:
    from qrm_core.config import Settings

    monkeypatch.setenv("QRM_DISABLE_PLUGINS", "a, b")
    monkeypatch.setenv("QRM_ENABLED_STORAGE", "fake,nfs")
    settings = Settings()
    assert settings.disable_plugins == ["a", "b"]
    assert settings.enabled_storage == ["fake", "nfs"] and settings.enabled_hypervisors is None


def test_a_failing_console_plugin_gets_an_error_panel_and_spoils_nothing(qrm_ctx, qrm_plugins) -> None:
    from qrm_core.context import ConsoleLink, ConsolePanel

    class Good:
        @hookimpl
        def qrm_console_links(self, object_type):
            return [ConsoleLink("Nagios", "/nagios/")]

        @hookimpl
        def qrm_console_panels(self, object_type):
            return [ConsolePanel("Nagios", rows=(("PING", "OK"),), status="ok")]

    class Bad:
        @hookimpl
        def qrm_console_panels(self, object_type):
            raise RuntimeError("rack database unreachable")

    qrm_plugins.register(Good(), "good")
    qrm_plugins.register(Bad(), "bad")
    links, panels = qrm_plugins.hooks.console_contributions("resource", "52:54:00:00:00:01", qrm_ctx.hook_ctx)
    assert links == [ConsoleLink("Nagios", "/nagios/")]
    assert ConsolePanel("Nagios", rows=(("PING", "OK"),), status="ok") in panels
    [error] = [p for p in panels if p.title == "Plugin bad"]
    assert error.rows == (("error", "failed in qrm_console_panels: rack database unreachable"),)
    with pytest.raises(PluginError, match="'bad'"):
        qrm_plugins.hooks.console_panels("resource", "52:54:00:00:00:01", qrm_ctx.hook_ctx)
