"""qrm-nagios: TODO one line saying what it adds to qrm."""

__version__ = "0.1.0"
