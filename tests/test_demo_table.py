"""The demo's per-lesion table: every ground-truth lesion found or missed on the real,
synthetic (read back from the node's SEG and SR) and oracle uptake."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from pydicom import dcmread

from dicom_node.analysis.tbr import measure_tbr
from dicom_node.analysis.uncertainty import TbrInterval
from dicom_node.config import load_config
from dicom_node.inference.fusion import window_t1c
from dicom_node.series.volume import load_volume, read_header, slices_of
from dicom_node.writers.provenance import Provenance
from dicom_node.writers.sc import encode
from dicom_node.writers.seg import make_seg
from dicom_node.writers.sr import make_sr, read_tbr_report
from training.demo import lesion_table
from training.phantom import PhantomGeometry, generate_patient
from training.phantom_dicom import write_patient

GEOMETRY = PhantomGeometry(rows=128, cols=128, pixel_spacing_mm=2.0, slice_spacing_mm=4.0)
PROVENANCE = Provenance(manufacturer="dicom-node", model_name="t", model_version="t",
                        weights_sha256="0" * 64)
CONFIG = Path(__file__).resolve().parents[1] / "config.toml"


def _table(tmp_path: Path, uptake_of: str, shift_rows: int = 0) -> str:
    patient = generate_patient(4, seed=0, geometry=GEOMETRY)
    paths = write_patient(patient, tmp_path / "phantom")
    slices = [s for p in paths.t1c for s in slices_of(read_header(p), p)]
    volume = load_volume(slices)
    uptake = patient.uptake if uptake_of == "real" else np.roll(
        patient.uptake, shift_rows, axis=1)
    result = measure_tbr(uptake, volume.voxel_volume_ml, 1.6, 0.1, 0.3,
                         spacing_mm=volume.spacing_mm, t1c_grey=window_t1c(volume.pixels))
    intervals = [TbrInterval(lesion=lesion.number, tbr_max_low=1.5, tbr_max_high=3.0,
                             tbr_mean_low=1.4, tbr_mean_high=2.5, sd_model_tbr_max=0.1,
                             sd_model_tbr_mean=0.1, samples=8, level=0.9, equivocal=True)
                 for lesion in result.lesions]
    seg = make_seg(volume.datasets, result, "2.25.31", "2.25.31.1", 9903, PROVENANCE)
    sr = make_sr(volume.datasets, seg, result, "2.25.32", "2.25.32.1", 9902, PROVENANCE,
                 intervals=intervals, interval_method="test")
    (tmp_path / "seg.dcm").write_bytes(encode(seg))
    (tmp_path / "sr.dcm").write_bytes(encode(sr))
    report = read_tbr_report(dcmread(tmp_path / "sr.dcm"))
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    config = dataclasses.replace(load_config(CONFIG))
    return lesion_table(patient, config, report, dcmread(tmp_path / "seg.dcm"), uids)


def test_synthetic_equal_to_real_is_found_like_real(tmp_path: Path) -> None:
    table = _table(tmp_path, "real")
    row = next(line for line in table.splitlines() if line.startswith("1 "))
    cells = row.split("found")
    assert len(cells) == 4, row  # found on real, synthetic and oracle
    assert cells[1].split()[:3] == cells[2].split()[:3]  # same TBRs on real and synthetic
    assert "[1.50-3.00] EQUIVOCAL" in row
    assert "false foci on synthetic: 0" in table


def test_uptake_in_the_wrong_place_is_a_miss_and_a_false_focus(tmp_path: Path) -> None:
    table = _table(tmp_path, "shifted", shift_rows=40)
    row = next(line for line in table.splitlines() if line.startswith("1 "))
    assert "missed" in row
    assert "false foci on synthetic: 0" not in table
    assert "false foci on real: 0" in table
