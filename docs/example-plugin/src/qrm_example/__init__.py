"""qrm-example: the plugin that docs/plugins.md walks through.

* :mod:`qrm_example.plugin` - hook implementations (the ``example`` entry point);
* :mod:`qrm_example.inventory` - the inventory file they keep;
* :mod:`qrm_example.cli` - ``qrm example inventory`` and ``qrm example sync``;
* :mod:`qrm_example.driver` - the ``example-dir`` storage driver;
* :mod:`qrm_example.settings` - ``QRM_EXAMPLE_*`` settings.
"""

__version__ = "0.1.0"
