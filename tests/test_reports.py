"""SEG and SR from a real analysis: valid DICOM, the SR's numbers equal the analysis,
and every reference resolves to the SEG and the source instances."""

from __future__ import annotations

import pytest
from pydicom import dcmread

from dicom_node.fusion import window_t1c
from dicom_node.tbr import measure_tbr
from dicom_node.volume import load_volume, read_header, slices_of
from dicom_node.writers.provenance import Provenance
from dicom_node.writers.sc import encode
from dicom_node.writers.seg import BACKGROUND_SEGMENT, make_seg
from dicom_node.writers.sr import make_sr, read_tbr_report
from tests.conftest import validate_dicom
from training.phantom import PhantomGeometry, generate_patient
from training.phantom_dicom import write_patient

GEOMETRY = PhantomGeometry(rows=128, cols=128, pixel_spacing_mm=2.0, slice_spacing_mm=4.0)
PROVENANCE = Provenance(manufacturer="dicom-node", model_name="phantom-truth",
                        model_version="test", weights_sha256="0" * 64)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    patient = generate_patient(4, seed=0, geometry=GEOMETRY)  # has a tumour (tests/test_tbr.py)
    paths = write_patient(patient, tmp_path_factory.mktemp("phantom"))
    slices = [s for p in paths.t1c for s in slices_of(read_header(p), p)]
    volume = load_volume(slices)
    result = measure_tbr(patient.uptake, volume.voxel_volume_ml, 1.6, 0.1, 0.3,
                         spacing_mm=volume.spacing_mm, t1c_grey=window_t1c(volume.pixels))
    assert result.lesions, "phantom 4 should have a lesion above threshold"
    out = tmp_path_factory.mktemp("reports")
    seg = make_seg(volume.datasets, result, "2.25.11", "2.25.11.1", 9903, PROVENANCE)
    sr = make_sr(volume.datasets, seg, result, "2.25.12", "2.25.12.1", 9902, PROVENANCE)
    (out / "seg.dcm").write_bytes(encode(seg))
    (out / "sr.dcm").write_bytes(encode(sr))
    return volume, result, out


def test_seg_and_sr_validate(analysed) -> None:  # type: ignore[no-untyped-def]
    _, _, out = analysed
    result = validate_dicom(out)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sr_numbers_equal_the_analysis(analysed) -> None:  # type: ignore[no-untyped-def]
    _, result, out = analysed
    report = read_tbr_report(dcmread(out / "sr.dcm"))
    assert len(report.lesions) == len(result.lesions)
    for read, lesion in zip(report.lesions, result.lesions, strict=True):
        assert read["tbr_max"] == pytest.approx(lesion.tbr_max, abs=1e-4)
        assert read["tbr_mean"] == pytest.approx(lesion.tbr_mean, abs=1e-4)
        assert read["volume_ml"] == pytest.approx(lesion.volume_ml, abs=1e-4)
    assert report.background_mean == pytest.approx(result.background_mean, abs=1e-4)


def test_references_resolve(analysed) -> None:  # type: ignore[no-untyped-def]
    volume, result, out = analysed
    seg = dcmread(out / "seg.dcm")
    sr = dcmread(out / "sr.dcm")
    segments = {int(item.SegmentNumber) for item in seg.SegmentSequence}
    assert segments == {BACKGROUND_SEGMENT, *(lesion.number + 1 for lesion in result.lesions)}
    # every segment number the SR points at exists in the SEG it names
    referenced: list[tuple[str, int]] = []

    def walk(node) -> None:  # type: ignore[no-untyped-def]
        for item in node.get("ContentSequence", []):
            if item.ValueType == "IMAGE" and "ReferencedSegmentNumber" in item.ReferencedSOPSequence[0]:
                ref = item.ReferencedSOPSequence[0]
                referenced.append((str(ref.ReferencedSOPInstanceUID),
                                   int(ref.ReferencedSegmentNumber)))
            walk(item)

    walk(sr)
    assert referenced and all(uid == seg.SOPInstanceUID for uid, _ in referenced)
    assert {number for _, number in referenced} == segments
    # the SEG and the SR's evidence point at the source T1C instances
    sources = {str(ds.SOPInstanceUID) for ds in volume.datasets}
    seg_refs = {str(item.ReferencedSOPInstanceUID)
                for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert seg_refs <= sources and seg_refs
    evidence = {str(inst.ReferencedSOPInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for inst in series.ReferencedSOPSequence}
    assert sources | {str(seg.SOPInstanceUID)} == evidence
    # one frame per segment and slice the region touches, holding exactly its voxels
    masks = [result.background_mask, *(lesion.mask for lesion in result.lesions)]
    assert int(seg.NumberOfFrames) == sum(int(m.any(axis=(1, 2)).sum()) for m in masks)
    frames = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    assert int(frames.astype(bool).sum()) == sum(int(m.sum()) for m in masks)
