pytest_plugins = ["qrm_core.testing"]
