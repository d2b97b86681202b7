"""`dicom-node --version` answers what is installed, without loading the node."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version


def test_version_is_the_installed_package() -> None:
    done = subprocess.run([sys.executable, "-m", "dicom_node.cli", "--version"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dicom-node {version('dicom-node')}"
