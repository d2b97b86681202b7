"""`dicom-node --version` answers what is installed, without loading the node."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path


def test_version_is_the_installed_package() -> None:
    done = subprocess.run([sys.executable, "-m", "dicom_node.cli", "--version"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dicom-node {version('dicom-node')}"


def test_data_dir_override_moves_the_default_database_and_keeps_an_explicit_one(
        tmp_path: Path) -> None:
    from dicom_node.config import parse_config, with_data_dir

    model = {"weights_path": "dicom_node/models/demo-generator.pt"}
    default = parse_config({"node": {"data_dir": str(tmp_path / "var")}, "model": model},
                           tmp_path)
    moved = with_data_dir(default, tmp_path / "demo")
    assert moved.data_dir == tmp_path / "demo"
    assert moved.database_url == f"sqlite:///{tmp_path / 'demo' / 'dicom-node.db'}"
    assert moved.store_dir == tmp_path / "demo" / "store"
    explicit = parse_config({"node": {"data_dir": str(tmp_path / "var"),
                                      "database_url": "postgresql://node@db/node"},
                             "model": model}, tmp_path)
    assert with_data_dir(explicit, tmp_path / "x").database_url == "postgresql://node@db/node"
