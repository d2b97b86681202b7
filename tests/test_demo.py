"""The README's main job: `dicom-node-train demo` end to end, on its own ports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pydicom import dcmread

from dicom_node.config import embedded_config_path
from tests.conftest import free_port, validate_dicom

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def test_demo_runs_the_main_job(tmp_path: Path) -> None:
    # the embedded config with free ports and a data folder of its own
    text = embedded_config_path().read_text()
    node_port, return_port = free_port(), free_port()
    text = text.replace("port = 11112", f"port = {node_port}")
    text = text.replace("return_port = 11113", f"return_port = {return_port}")
    text = text.replace('data_dir = "var"', f'data_dir = "{tmp_path / "var"}"')
    text = text.replace('weights_path = "dicom_node/models/demo-generator.pt"',
                        f'weights_path = "{embedded_config_path().parent}/dicom_node/models/'
                        'demo-generator.pt"')
    config = tmp_path / "config.toml"
    config.write_text(text)
    out = tmp_path / "demo-output"
    result = subprocess.run([sys.executable, "-m", "training.cli", "demo", "--config",
                             str(config), "--out", str(out), "--slice-spacing-mm", "4"],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # every ground-truth lesion with its fate on real, synthetic and oracle uptake
    assert "Ground-truth lesions: found or missed by the node's TBR method" in result.stdout
    rows = [line for line in result.stdout.splitlines() if re.match(r"^\d+\s+\w+_enhancing", line)]
    assert rows and all(("found" in row or "missed" in row) for row in rows)
    assert "false foci on synthetic:" in result.stdout
    assert (out / "previews.png").stat().st_size > 10_000
    received = sorted((out / "received").glob("*.dcm"))
    t1c = list((out / "phantom").rglob("T1C/*.dcm"))
    sc = [p for p in received if dcmread(p, stop_before_pixels=True).SOPClassUID == SC_CLASS]
    # SC per slice, SEG, SR, KOS, and the image-anchored SR when the node found a lesion
    image_srs = [p for p in received
                 if dcmread(p, stop_before_pixels=True).get("SeriesNumber") == 9904]
    assert len(sc) == len(t1c) and len(received) == len(t1c) + 3 + len(image_srs)
    assert len(image_srs) <= 1
    assert re.search(r"Results back in PACS [0-9.]+ s", result.stdout)
    check = validate_dicom(out / "received")
    assert check.returncode == 0, check.stdout
