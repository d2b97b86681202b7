"""Pairing that refuses what it cannot trust, and ``dataset --check``, the dry run that says
so before anything is written. Studies are scanner-layout phantoms, damaged on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from scipy.spatial.transform import Rotation

from dicom_node.config import load_config
from dicom_node.series.selection import select_series
from dicom_node.writers.image_source import new_instance
from training.cli import main as train_main
from training.dataset import build_dataset, check_studies
from training.dataset_io import load_pairs
from training.phantom import PhantomGeometry, generate_patient
from training.phantom_dicom import write_patient
from training.study_plan import PairingRules

SMALL = PhantomGeometry(rows=96, cols=128, pixel_spacing_mm=2.0, slice_spacing_mm=4.0,
                        n_slices=30)
SIZE = 32
SPATIAL_REGISTRATION = "1.2.840.10008.5.1.4.1.1.66.1"


def _edit(folder: Path, **values: object) -> None:
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for key, value in values.items():
            setattr(ds, key, value)
        ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PH0001 good; PH0002 PET in another frame of reference; PH0003 the same plus a REG;
    PH0004 T1C 2 h after the PET; PH0005 a PET slice missing over the brain; PH0006 a
    bare fusion export (no PET) with a slice missing; PH0007 a bare fusion renumbered;
    PH0008 PET without weight; PH0009 T1C without FrameOfReferenceUID."""
    root = tmp_path_factory.mktemp("refusals")
    for i in range(9):
        fusion = "bare" if i in (5, 6) else "none"
        write_patient(generate_patient(i, 21, SMALL), root, pet_layout="scanner", fusion=fusion)
    _edit(root / "PH0002" / "DICOM" / "PET", FrameOfReferenceUID=generate_uid())
    _edit(root / "PH0003" / "DICOM" / "PET", FrameOfReferenceUID=generate_uid())
    first = pydicom.dcmread(root / "PH0003" / "DICOM" / "T1C" / "IM0001.dcm")
    reg = new_instance(SPATIAL_REGISTRATION, generate_uid())
    for key in ("PatientID", "PatientName", "StudyInstanceUID"):
        setattr(reg, key, first.get(key))
    reg.Modality, reg.SeriesInstanceUID = "REG", generate_uid()
    (root / "PH0003" / "DICOM" / "REG").mkdir()
    reg.save_as(root / "PH0003" / "DICOM" / "REG" / "RE0001.dcm", enforce_file_format=True)
    _edit(root / "PH0004" / "DICOM" / "T1C", AcquisitionTime="141500")
    (root / "PH0005" / "DICOM" / "PET" / "IM0030.dcm").unlink()
    for pid in ("PH0006", "PH0007"):
        for path in (root / pid / "DICOM" / "PET").iterdir():
            path.unlink()
    (root / "PH0006" / "DICOM" / "FUSION" / "IM0012.dcm").unlink()
    for path in sorted((root / "PH0007" / "DICOM" / "FUSION").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = int(ds.InstanceNumber) + 100
        ds.save_as(path, enforce_file_format=True)
    _edit(root / "PH0008" / "DICOM" / "PET", PatientWeight=None)
    for path in sorted((root / "PH0009" / "DICOM" / "T1C").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path, enforce_file_format=True)
    return root


EXPECTED = {
    "PH0002": "different frames of reference",
    "PH0003": "spatial registration cannot be applied: no registration relates",
    "PH0004": "min outside the PET acquisition (limit 30 min): not simultaneous",
    "PH0005": "PET slices missing between",
    "PH0006": "fusion export has 29 slices, the T1C 30",
    "PH0007": "InstanceNumbers are not the T1C's",
    "PH0008": "PatientWeight missing",
    "PH0009": "FrameOfReferenceUID missing in the T1C series",
}


def _tree(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*"))


def test_check_lists_found_paired_and_refused_and_writes_nothing(
        studies: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _tree(studies)
    rows = {r["patient_id"]: r for r in check_studies(studies)}
    assert set(rows) == {f"PH{i:04d}" for i in range(1, 10)}
    good = rows["PH0001"]
    assert "refused" not in good and good["target"] == "pet" and good["pairs"] == 30
    assert good["pairing"] == "geometry"
    series = good["series"]
    assert isinstance(series, list)
    roles = {s["modality"]: s["role"] for s in series}
    assert roles == {"MR": "T1C", "PT": "target (pet)"}
    refused = rows["PH0004"]["series"]
    assert isinstance(refused, list)
    assert {s["role"] for s in refused} == {"T1C (study refused)", "target (study refused)"}
    for pid, reason in EXPECTED.items():
        assert reason in str(rows[pid].get("refused")), (pid, rows[pid].get("refused"))
    rc = train_main(["dataset", "--studies", str(studies), "--check"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "9 studies found: 1 would be used, 8 refused" in out
    for reason in EXPECTED.values():
        assert reason in out
    assert _tree(studies) == before and not any(tmp_path.iterdir())


def test_refusals_reach_dataset_json_and_console(studies: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc = train_main(["dataset", "--studies", str(studies), "--out", str(tmp_path / "ds"),
                     "--size", str(SIZE)])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    skipped = {s["patient_id"]: s["reason"] for s in report["skipped_studies"]}
    assert set(skipped) == set(EXPECTED)
    for pid, reason in EXPECTED.items():
        assert reason in skipped[pid]
        assert f"(patient {pid}): " in out
    assert report["counts"]["studies_used"] == 1


def test_time_limit_is_configurable(studies: Path, tmp_path: Path) -> None:
    summary = build_dataset(studies, tmp_path / "ds", size=SIZE, progress=False,
                            pairing_rules=PairingRules(max_pet_mr_gap_min=180.0))
    assert "PH0004" not in {s["patient_id"] for s in summary.skipped}
    assert summary.studies_used == 2


def test_check_uses_the_node_config_selection(studies: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The T1C is chosen by the node's own selection module with the node config's rules:
    a config that excludes MPRAGE descriptions refuses the good study with the node's
    reason, in the dry run as in the node."""
    config = tmp_path / "node.toml"
    config.write_text('[model]\nweights_path = "generator.pt"\n\n'
                      '[selection]\ndescription_exclude = ["(?i)mprage"]\n')
    node = select_series(sorted((studies / "PH0001" / "DICOM" / "T1C").glob("*.dcm")),
                         load_config(config).selection)
    assert not node.accepted
    rc = train_main(["dataset", "--studies", str(studies / "PH0001"), "--check",
                     "--node-config", str(config)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "REFUSED: no series the node would select" in out and node.reason in out


def test_rigid_spatial_registration_is_applied(tmp_path: Path) -> None:
    """The PET written in a frame of reference of its own (rotated 10/-4/6 deg and shifted
    (12, -7, 25) mm) plus a Spatial Registration relating it to the T1C's: the dataset's
    PET SUV equals the one built from the untouched study; without the REG it is refused."""
    plain, moved = tmp_path / "plain", tmp_path / "moved"
    write_patient(generate_patient(0, 33, SMALL), plain, pet_layout="scanner")
    shutil.copytree(plain, moved)
    rot = Rotation.from_euler("zyx", (10.0, -4.0, 6.0), degrees=True).as_matrix()
    shift = np.array([12.0, -7.0, 25.0])
    pet_frame = generate_uid()
    for path in sorted((moved / "PH0001" / "DICOM" / "PET").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [float(v) for v in rot @ np.asarray(
            ds.ImagePositionPatient, dtype=float) + shift]
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        ds.ImageOrientationPatient = [float(v) for v in (*(rot @ iop[:3]), *(rot @ iop[3:]))]
        ds.FrameOfReferenceUID = pet_frame
        ds.save_as(path, enforce_file_format=True)
    t1c = pydicom.dcmread(moved / "PH0001" / "DICOM" / "T1C" / "IM0001.dcm")
    to_t1c = np.eye(4)  # PET coordinates -> T1C (= the registration's own) coordinates
    to_t1c[:3, :3], to_t1c[:3, 3] = rot.T, -rot.T @ shift
    matrix = Dataset()
    matrix.FrameOfReferenceTransformationMatrixType = "RIGID"
    matrix.FrameOfReferenceTransformationMatrix = [float(v) for v in to_t1c.ravel()]
    mreg = Dataset()
    mreg.MatrixSequence = Sequence([matrix])
    item = Dataset()
    item.FrameOfReferenceUID = pet_frame
    item.MatrixRegistrationSequence = Sequence([mreg])
    reg = new_instance(SPATIAL_REGISTRATION, generate_uid())
    for key in ("PatientID", "PatientName", "StudyInstanceUID", "FrameOfReferenceUID"):
        setattr(reg, key, t1c.get(key))
    reg.Modality, reg.SeriesInstanceUID = "REG", generate_uid()
    reg.RegistrationSequence = Sequence([item])
    reg_path = moved / "PH0001" / "DICOM" / "RE0001.dcm"
    reg.save_as(reg_path, enforce_file_format=True)

    build_dataset(plain, tmp_path / "ds-plain", size=SIZE, progress=False)
    build_dataset(moved, tmp_path / "ds-moved", size=SIZE, progress=False)
    a = load_pairs(tmp_path / "ds-plain")["pet_suv"].astype(np.float32)
    b = load_pairs(tmp_path / "ds-moved")["pet_suv"].astype(np.float32)
    assert float(a.max()) > 1.0
    np.testing.assert_allclose(b, a, atol=2e-3 * float(a.max()))
    reg_path.unlink()
    rows = check_studies(moved)
    assert "no spatial registration" in str(rows[0]["refused"])
