"""The ``xen`` hypervisor driver: Xen guests on hosts reached through libvirt's libxl driver.

Everything but what is Xen's own is the shared libvirt driver
(:class:`qrm_libvirt.driver.LibvirtHypervisor`):

* **HVM** (default): a fully virtualised PC whose emulated NIC (e1000) boots
  from the network (``<boot dev='network'/>``), like any machine qrm manages.
* **PV**: a paravirtualised guest started from a kernel, initrd and command
  line on the host (host settings ``pv_kernel``, ``pv_ramdisk``,
  ``pv_cmdline``: qrm's idle boot image and what its iPXE script would pass).
* **xl config files**: beside the libvirt definition, ``<config_dir>/<name>``
  on the host (``/etc/xen`` by default), rewritten after every persistent
  change, moved with a migration, removed with the partition; with autostart,
  a link in ``<config_dir>/auto/`` for xendomains and libvirt's autostart.
  Each file is checked with Xen's own parser (libxlutil) where it is
  installed (:mod:`qrm_xen.xlparse`).

Xen cannot run on the machines qrm is developed on: the driver is tested
against libvirt's test driver with domain type ``xen`` (the XML validated by
libvirt's RelaxNG schema) and its config files against libxlutil; see
docs/hypervisors.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from qrm_core.plugin_api import DriverError, HostTarget, InvalidInput, PartitionSpec
from qrm_libvirt import domxml
from qrm_libvirt.binding import libvirt
from qrm_libvirt.domxml import DomainDefinition, Nic
from qrm_libvirt.driver import LibvirtHypervisor
from qrm_xen import xlparse
from qrm_xen.hostfiles import HostFiles, files_for
from qrm_xen.settings import XenSettings
from qrm_xen.xlcfg import KERNEL_ARGS_RE, NIC_MODELS, XlConfig, check_value

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


class XenHypervisor(LibvirtHypervisor):
    name = "xen"
    description = "Xen PV and HVM guests on hosts reached through libvirt (xen+ssh://root@HOST/system)"
    family = "xen"
    default_uri = "xen+ssh://root@{address}/system"
    mac_prefix = "00:16:3e"
    settings_class = XenSettings
    default_bridge = "xenbr0"
    undefine_flags = ("VIR_DOMAIN_UNDEFINE_MANAGED_SAVE",)
    flavour_host_settings: ClassVar[dict[str, str]] = {
        "xen_mode": "hvm or pv",
        "pv_kernel": "PV: the kernel on the host",
        "pv_ramdisk": "PV: the initrd on the host",
        "pv_cmdline": "PV: the kernel command line",
        "xl_config_dir": "where xl config files go on the host (default /etc/xen)",
        "autostart": "true or false: start partitions with the host",
        "nic_model": "HVM NIC: e1000, rtl8139 or virtio-net",
    }

    def own_settings(self) -> XenSettings:
        own = super().own_settings()
        assert isinstance(own, XenSettings)
        return own

    def check_host_setting(self, key: str, value: str) -> None:
        if key == "xen_mode" and value not in ("hvm", "pv"):
            raise InvalidInput(f"host setting xen_mode={value!r}: use hvm or pv")
        if key in ("pv_kernel", "pv_ramdisk", "xl_config_dir"):
            check_value(f"host setting {key}", value, domxml.PATH_RE)
            if "/../" in f"{value}/":
                raise InvalidInput(f"host setting {key}={value!r} must not contain '..'")
        if key == "pv_cmdline":
            check_value("host setting pv_cmdline", value, KERNEL_ARGS_RE)
        if key == "autostart" and value.lower() not in (*TRUE, *FALSE):
            raise InvalidInput(f"host setting autostart={value!r}: use true or false")
        if key == "nic_model" and value not in NIC_MODELS:
            raise InvalidInput(f"host setting nic_model={value!r}: use {', '.join(NIC_MODELS)}")

    # -- per-host choices -----------------------------------------------------

    def mode(self, host: HostTarget) -> str:
        return self.host_setting(host, "xen_mode") or self.own_settings().mode

    def config_dir(self, host: HostTarget) -> str:
        return (self.host_setting(host, "xl_config_dir") or self.own_settings().config_dir).rstrip("/")

    def autostart(self, host: HostTarget) -> bool:
        value = self.host_setting(host, "autostart")
        return self.own_settings().autostart if value is None else value.lower() in TRUE

    def files(self, host: HostTarget) -> HostFiles:
        return files_for(self.uri(host), host.label)

    def validate_host(self, host: HostTarget) -> None:
        super().validate_host(host)
        if self.mode(host) == "pv":
            own = self.own_settings()
            kernel = self.host_setting(host, "pv_kernel") or own.pv_kernel
            if not kernel:
                raise InvalidInput(
                    f"host {host.label} runs PV guests but names no kernel: set pv_kernel "
                    f"('qrm resource set {host.label} --host-setting pv_kernel=/path') or QRM_XEN_PV_KERNEL"
                )
            for key, value in (
                ("pv_kernel", kernel),
                ("pv_ramdisk", self.host_setting(host, "pv_ramdisk") or own.pv_ramdisk),
                ("pv_cmdline", self.host_setting(host, "pv_cmdline") or own.pv_cmdline),
            ):
                if value is not None:
                    self.check_host_setting(key, value)

    # -- the domain -----------------------------------------------------------

    def definition(self, host: HostTarget, conn: Any, spec: PartitionSpec) -> DomainDefinition:
        own = self.own_settings()
        mac, bridge = self.mac(spec), self.bridge(host, spec)
        hvm = DomainDefinition(
            name=spec.name,
            domain_type="xen",
            memory_kib=spec.memory_mb * 1024,
            max_memory_kib=(spec.max_memory_mb or spec.memory_mb) * 1024,
            vcpus=spec.cpus,
            max_vcpus=spec.max_cpus or spec.cpus,
            os_type="hvm",
            machine="xenfv",
            boot_dev="network",
            nic=Nic(
                mac=mac,
                bridge=bridge,
                model=self.host_setting(host, "nic_model") or own.nic_model,
                boot_order=None,
                script="vif-bridge",
            ),
            features=("acpi", "apic", "pae"),
            console="serial",
            console_log=self.console_log(host, spec.name),
            balloon=None,
        )
        if self.mode(host) == "hvm":
            return hvm
        return dataclasses.replace(
            hvm,
            os_type="linux",
            machine="xenpv",
            boot_dev=None,
            kernel=self.host_setting(host, "pv_kernel") or own.pv_kernel,
            initrd=self.host_setting(host, "pv_ramdisk") or own.pv_ramdisk,
            cmdline=self.host_setting(host, "pv_cmdline") or own.pv_cmdline,
            nic=Nic(mac=mac, bridge=bridge, model=None, boot_order=None, script="vif-bridge"),
            features=(),
            console="xen",
            console_log=None,
        )

    # -- the xl config files --------------------------------------------------

    def check_config(self, config: XlConfig, text: str) -> None:
        """Parse ``text`` with libxlutil and compare every setting with what qrm meant."""
        when = self.own_settings().check_config
        if when == "never":
            return
        parser = xlparse.parser()
        if parser is None:
            if when == "always":
                raise DriverError(
                    f"cannot check xl configs: Xen's parser libxlutil is missing (apt-get install "
                    f"{xlparse.PACKAGE}), and QRM_XEN_CHECK_CONFIG=always"
                )
            return
        expected = dict(config.settings())
        parsed = parser.parse(text, {k: type(v) for k, v in expected.items()}, f"{config.name}.cfg")
        if not parsed.ok:
            raise DriverError(f"xl config of {config.name} rejected by Xen's parser: {parsed.report.strip()}")
        wrong = [k for k, v in expected.items() if parsed.values.get(k) != v]
        if wrong:
            raise DriverError(
                f"xl config of {config.name}: Xen's parser reads {wrong[0]} as "
                f"{parsed.values.get(wrong[0])!r}, qrm wrote {expected[wrong[0]]!r}"
            )

    def defined(self, host: HostTarget, conn: Any, dom: Any) -> None:
        """Write the partition's xl config (and its autostart link) from its definition."""
        autostart = self.autostart(host)
        if bool(dom.autostart()) != autostart:
            dom.setAutostart(1 if autostart else 0)
        if not self.own_settings().write_config:
            return
        facts = domxml.parse(dom.XMLDesc(libvirt().VIR_DOMAIN_XML_INACTIVE))
        config = XlConfig.from_facts(facts)
        text = config.render()
        self.check_config(config, text)
        files, directory = self.files(host), self.config_dir(host)
        path = f"{directory}/{config.name}"
        files.write(path, text)
        if autostart:
            files.symlink(path, f"{directory}/auto/{config.name}")
        else:
            files.remove(f"{directory}/auto/{config.name}")

    def removed(self, host: HostTarget, name: str) -> None:
        if not self.own_settings().write_config:
            return
        files, directory = self.files(host), self.config_dir(host)
        files.remove(f"{directory}/auto/{name}")
        files.remove(f"{directory}/{name}")

    def moved(self, host: HostTarget, destination: HostTarget, name: str, dest_conn: Any) -> None:
        self.defined(destination, dest_conn, dest_conn.lookupByName(name))
        self.removed(host, name)
