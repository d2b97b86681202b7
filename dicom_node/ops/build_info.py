"""What is running: the installed package's version (importlib.metadata: no DICOM, no
torch), for ``dicom-node --version``, the heartbeat and ``/metrics``' build info."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed ``dicom-node`` distribution's version."""
    try:
        return version("dicom-node")
    except PackageNotFoundError:
        return "0.0.0+unknown"
