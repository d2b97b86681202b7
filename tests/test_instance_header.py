"""The receiver's header reader: the raw-element fast path agrees with pydicom."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.ingest import instance_header
from dicom_node.ingest.instance_header import HeaderError, InstanceHeader, read_instance_header
from tests.bad_input_factory import rewrite
from tests.dicom_factory import SeriesSpec, write_series


def _pydicom(path: Path) -> InstanceHeader | type[Exception]:
    try:
        with path.open("rb") as handle:
            return instance_header._read_with_pydicom(handle)
    except (HeaderError, InvalidDicomError) as exc:
        return type(exc)


def _fast(path: Path) -> InstanceHeader | type[Exception]:
    try:
        return read_instance_header(path)
    except (HeaderError, InvalidDicomError) as exc:
        return type(exc)


def test_plain_mr_slice_is_read_without_pydicom(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_series(tmp_path, SeriesSpec(n_slices=3), seed=2)[1]
    expected = _pydicom(path)
    monkeypatch.setattr(instance_header, "_read_with_pydicom", None)  # the fast path only
    header = read_instance_header(path)
    assert header == expected
    ds = dcmread(path)
    assert (header.study_uid, header.series_uid, header.sop_uid) == (
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert header.sop_class_uid == ds.SOPClassUID and header.modality == "MR"
    assert header.instance_number == ds.InstanceNumber == 2
    assert header.position_mm == pytest.approx(float(ds.ImagePositionPatient[2]))
    assert header.description == ds.SeriesDescription
    assert header.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    # From memory, as pynetdicom hands small instances over, it is the same.
    assert read_instance_header(BytesIO(path.read_bytes())) == header


@pytest.mark.parametrize("changes", [
    {"SeriesDescription": "T1 +C Kontrastmittel \u00e4\u00f6\u00fc",
     "SpecificCharacterSet": "ISO_IR 100"},
    {"PatientID": "\u5c71\u7530", "SpecificCharacterSet": "ISO_IR 192"},
    {"transfer_syntax": DeflatedExplicitVRLittleEndian},
    {"transfer_syntax": ImplicitVRLittleEndian},
    {"NumberOfFrames": 3},
    {"ImageOrientationPatient": None},
    {"InstanceNumber": None, "ImagesInAcquisition": 176},
])
def test_unusual_headers_agree_with_pydicom(tmp_path: Path, changes: dict[str, object]) -> None:
    source = write_series(tmp_path / "src", SeriesSpec(n_slices=2), seed=3)[0]
    path = rewrite(source, tmp_path / "changed.dcm", **changes)  # type: ignore[arg-type]
    if "transfer_syntax" in changes:
        assert dcmread(path).file_meta.TransferSyntaxUID == changes["transfer_syntax"]
    fast = read_instance_header(path)
    assert fast == _pydicom(path)
    ds = dcmread(path)
    assert fast.description == str(ds.get("SeriesDescription", ""))
    assert fast.patient_id == str(ds.get("PatientID", ""))
    if "NumberOfFrames" in changes or "ImageOrientationPatient" in changes:
        assert fast.position_mm is None
    if "ImagesInAcquisition" in changes:
        assert (fast.instance_number, fast.images_in_acquisition) == (None, 176)


def test_every_pydicom_data_file_reads_as_pydicom_reads_it() -> None:
    """Vendor files: big endian, JPEG family, RLE, multi-frame, odd charsets, broken."""
    files = [Path(p) for p in get_testdata_files("*.dcm")]
    assert len(files) > 100
    assert any("bigendian" in p.name for p in files)
    same = 0
    for path in files:
        assert _fast(path) == _pydicom(path), path.name
        same += 1
    assert same == len(files)


def test_missing_uid_and_non_dicom_are_refused(tmp_path: Path) -> None:
    source = write_series(tmp_path / "src", SeriesSpec(n_slices=2), seed=4)[0]
    with pytest.raises(HeaderError, match="SeriesInstanceUID"):
        read_instance_header(rewrite(source, tmp_path / "no-series.dcm",
                                     SeriesInstanceUID=None))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 128 + b"NOPE" + b"\x01" * 64)
    with pytest.raises(InvalidDicomError):
        read_instance_header(junk)
