"""The package layout's promises: the receive-only process stays free of the model stack,
and the rooms import each other only along the arrows of docs/architecture.md."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks._common import free_port
from tests.conftest import subprocess_node_toml

REPO = Path(__file__).resolve().parents[1]


def test_receive_only_process_imports_no_torch() -> None:
    """``dicom-node receive`` (one per receiver.extra_ports) needs no model: importing what
    it runs (the CLI, the receive process, the systemd notifier) must not import torch."""
    code = ("import sys\n"
            "import dicom_node.cli\n"
            "import dicom_node.ingest.receive_process\n"
            "import dicom_node.ops.systemd_notify\n"
            "heavy = sorted(m for m in ('torch', 'highdicom', 'scipy') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, check=True)
    assert "torch" not in result.stdout.strip().split(","), result.stdout
    assert result.stdout.strip() == "", f"the receive process imports {result.stdout.strip()}"


@pytest.mark.parametrize(("role", "ready"), [("sender", "draining the outbox"),
                                              ("receiver", "listening as")])
def test_sender_and_receiver_roles_start_without_torch(tmp_path: Path, test_weights: Path,
                                                       role: str, ready: str) -> None:
    """``dicom-node serve --role sender|receiver`` started for real (``python -X
    importtime``: every module the process imported, up to the moment it says it is
    ready, is on stderr): neither imports torch, or anything else of the model."""
    config = tmp_path / "node.toml"
    config.write_text(subprocess_node_toml(tmp_path / "node", free_port(), test_weights,
                                           "STORESCU", "PACS", free_port()))
    imports = tmp_path / "imports.txt"
    with imports.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "dicom_node.cli", "serve", "--role",
             role, "--config", str(config)], cwd=REPO, stdout=subprocess.PIPE, stderr=stderr,
            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            assert proc.stdout is not None
            lines = []
            for line in proc.stdout:  # ends when the process exits without being ready
                lines.append(line)
                if ready in line:
                    break
            assert any(ready in line for line in lines), "".join(lines)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    modules = {line.rsplit("|", 1)[-1].strip().split(".")[0]
               for line in imports.read_text().splitlines() if line.startswith("import time:")}
    assert {"sqlalchemy", "pynetdicom"} <= modules  # the import log is what the role loaded
    assert not modules & {"torch", "highdicom", "scipy"}, sorted(
        modules & {"torch", "highdicom", "scipy"})
    assert proc.returncode == 0


#: Which rooms (dicom_node's packages and top-level modules, and the storage package) a
#: room may import: the arrows of docs/architecture.md. Lazy and type-only imports count.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "storage": set(),
    "net": {"errors"},
    "config": {"errors", "net", "inference.fusion_style"},
    "series": {"errors", "config", "storage"},
    "ingest": {"errors", "config", "net", "series", "storage"},
    "inference": {"errors", "config", "storage"},
    "analysis": {"errors", "config", "inference", "storage"},
    "writers": {"errors", "config", "net", "series", "analysis", "storage"},
    "outbox": {"errors", "config", "net", "analysis", "storage"},
    "ops": {"errors", "config", "storage"},
    "jobs": {"errors", "config", "series", "inference", "analysis", "writers", "outbox",
             "storage"},
    "scheduler": {"errors", "config", "jobs", "series", "outbox", "storage"},
    "send_service": {"errors", "config", "ops", "outbox", "scheduler", "storage"},
    "service": {"errors", "config", "net", "ingest", "series", "inference", "analysis",
                "writers", "outbox", "ops", "jobs", "scheduler", "storage"},
    "cli": {"errors", "config", "net", "ingest", "series", "inference", "analysis", "outbox",
            "ops", "service", "send_service", "storage"},
    "models": set(),
}


def _room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "storage":
        return "storage"
    return parts[1] if len(parts) > 1 else "dicom_node"


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "dicom_node":
                names += [f"dicom_node.{alias.name}" for alias in node.names]
            else:
                names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [n for n in names if n.split(".")[0] in ("dicom_node", "storage")]


def test_rooms_import_only_along_the_arrows() -> None:
    wrong = []
    for package in ("dicom_node", "storage"):
        for path in sorted((REPO / package).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            module = module.removesuffix(".__init__")
            if module == "dicom_node":
                continue
            room = _room(module)
            assert room in ALLOWED, f"{module}: room {room!r} is not in docs/architecture.md"
            for target in _imports(path):
                to = _room(target)
                exact = ".".join(target.split(".")[1:3])
                if to != room and to not in ALLOWED[room] and exact not in ALLOWED[room]:
                    wrong.append(f"{module} imports {target} ({room} -> {to})")
    assert not wrong, "imports against docs/architecture.md:\n" + "\n".join(wrong)
