"""The dataset reader on the vendor test files the installed packages ship (no download):
each PET and MR file gets a verdict with a reason, and the known ones the known verdict."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from training.dataset import build_dataset
from training.phantom import PhantomGeometry, generate_patient
from training.phantom_dicom import write_patient
from training.reader_survey import SurveyRow, installed_test_files, markdown, survey


@pytest.fixture(scope="module")
def rows() -> dict[str, SurveyRow]:
    files = installed_test_files()
    if len(files) < 10:
        pytest.skip("pydicom's test files are not installed")
    return {r.file.split("/", 1)[1] if "/" in r.file else r.file: r for r in survey(files)}


def test_every_file_gets_a_verdict_with_a_reason(rows: dict[str, SurveyRow]) -> None:
    for name, row in rows.items():
        assert row.modality in ("PT", "MR"), name
        assert row.header == "read" or row.header.startswith("refused: "), name
        if row.header == "read":
            for field in ("selection_default", "selection_one_slice", "pixels"):
                value = getattr(row, field)
                assert value.startswith(("accepted", "ok ", "refused: ")) or len(value) > 10, \
                    (name, field, value)
    table = markdown(list(rows.values()))
    assert table.count("\n| ") == len(rows) + 1  # and the header row


def test_known_files(rows: dict[str, SurveyRow]) -> None:
    small = rows["data/test_files/MR_small.dcm"]
    assert small.selection_one_slice == "accepted" and small.pixels == "ok 64x64"
    assert "matches no include rule" in small.selection_default
    # Every compressed variant of MR_small decodes to the same matrix.
    for variant in ("RLE", "bigendian", "jp2klossless", "jpeg_ls_lossless", "implicit"):
        assert rows[f"data/test_files/MR_small_{variant}.dcm"].pixels == "ok 64x64"
    truncated = rows["data/test_files/MR_truncated.dcm"]
    assert truncated.pixels.startswith("refused: cannot decode pixel data")
    localizer = rows["data/test_files/dicomdirtests/98892003/MR1/15820"]
    assert localizer.selection_one_slice.startswith("not axial")


def test_undecodable_t1c_refuses_its_study_not_the_build(tmp_path: Path) -> None:
    """Like pydicom's MR_truncated.dcm: one T1C file whose pixel data ends early refuses
    that study with a reason; the other study is still built."""
    geometry = PhantomGeometry(rows=64, cols=64, pixel_spacing_mm=3.0, slice_spacing_mm=6.0,
                               n_slices=20)
    for i in range(2):
        write_patient(generate_patient(i, 4, geometry), tmp_path / "s", pet_layout="scanner",
                      scanner=None)
    path = tmp_path / "s" / "PH0001" / "DICOM" / "T1C" / "IM0010.dcm"
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:-200]
    ds.save_as(path, enforce_file_format=True)
    summary = build_dataset(tmp_path / "s", tmp_path / "ds", size=32, progress=False)
    assert summary.studies_used == 1
    assert [s["patient_id"] for s in summary.skipped] == ["PH0001"]
    assert "cannot decode pixel data of IM0010.dcm" in summary.skipped[0]["reason"]
    shutil.rmtree(tmp_path / "s")
