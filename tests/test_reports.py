"""SEG and SR from a real analysis: valid DICOM, the SR's numbers equal the analysis,
and every reference resolves to the SEG and the source instances."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.path import Path
from pydicom import dcmread

from dicom_node.analysis.tbr import measure_tbr
from dicom_node.inference.fusion import window_t1c
from dicom_node.series.volume import load_volume, read_header, slices_of
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
def analysed(tmp_path_factory: pytest.TempPathFactory):
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


def test_seg_and_sr_validate(analysed) -> None:
    _, _, out = analysed
    result = validate_dicom(out)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sr_numbers_equal_the_analysis(analysed) -> None:
    _, result, out = analysed
    report = read_tbr_report(dcmread(out / "sr.dcm"))
    assert len(report.lesions) == len(result.lesions)
    for read, lesion in zip(report.lesions, result.lesions, strict=True):
        assert read["tbr_max"] == pytest.approx(lesion.tbr_max, abs=1e-4)
        assert read["tbr_mean"] == pytest.approx(lesion.tbr_mean, abs=1e-4)
        assert read["volume_ml"] == pytest.approx(lesion.volume_ml, abs=1e-4)
    assert report.background_mean == pytest.approx(result.background_mean, abs=1e-4)


def test_references_resolve(analysed) -> None:
    volume, result, out = analysed
    seg = dcmread(out / "seg.dcm")
    sr = dcmread(out / "sr.dcm")
    segments = {int(item.SegmentNumber) for item in seg.SegmentSequence}
    assert segments == {BACKGROUND_SEGMENT, *(lesion.number + 1 for lesion in result.lesions)}
    # every segment number the SR points at exists in the SEG it names
    referenced: list[tuple[str, int]] = []

    def walk(node) -> None:
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


def test_sr_with_intervals_validates_and_reads_back(analysed, tmp_path) -> None:
    """Each lesion's interval travels as TID 310 uncertainty ranges; an interval that
    reaches below the threshold makes the lesion equivocal, in the SR and on read-back."""
    from dicom_node.analysis.uncertainty import TbrInterval

    volume, result, _ = analysed
    first = result.lesions[0]
    intervals = [TbrInterval(lesion=first.number, tbr_max_low=result.threshold - 0.2,
                             tbr_max_high=first.tbr_max + 0.5, tbr_mean_low=first.tbr_mean - 0.3,
                             tbr_mean_high=first.tbr_mean + 0.4, sd_model_tbr_max=0.05,
                             sd_model_tbr_mean=0.03, samples=8, level=0.9, equivocal=True)]
    for lesion in result.lesions[1:]:
        intervals.append(TbrInterval(lesion=lesion.number, tbr_max_low=lesion.tbr_max - 0.1,
                                     tbr_max_high=lesion.tbr_max + 0.1,
                                     tbr_mean_low=lesion.tbr_mean - 0.1,
                                     tbr_mean_high=lesion.tbr_mean + 0.1, sd_model_tbr_max=0.01,
                                     sd_model_tbr_mean=0.01, samples=8, level=0.9,
                                     equivocal=False))
    seg = make_seg(volume.datasets, result, "2.25.21", "2.25.21.1", 9903, PROVENANCE)
    sr = make_sr(volume.datasets, seg, result, "2.25.22", "2.25.22.1", 9902, PROVENANCE,
                 intervals=intervals, interval_method="90% interval: test")
    (tmp_path / "sr.dcm").write_bytes(encode(sr))
    checked = validate_dicom(tmp_path / "sr.dcm")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    report = read_tbr_report(dcmread(tmp_path / "sr.dcm"))
    read = report.lesions[0]
    assert read["equivocal"] == 1.0
    assert read["tbr_max_low"] == pytest.approx(result.threshold - 0.2, abs=1e-3)
    assert read["tbr_max_high"] == pytest.approx(first.tbr_max + 0.5, abs=1e-3)
    assert read["tbr_mean_low"] == pytest.approx(first.tbr_mean - 0.3, abs=1e-3)
    assert read["tbr_mean_high"] == pytest.approx(first.tbr_mean + 0.4, abs=1e-3)
    assert all(other["equivocal"] == 0.0 for other in report.lesions[1:])
    # without intervals nothing of the kind is written
    plain = read_tbr_report(dcmread(analysed[2] / "sr.dcm"))
    assert all("tbr_max_low" not in lesion and lesion["equivocal"] == 0.0
               for lesion in plain.lesions)


def _groups(sr) -> list:
    """The measurement groups under Imaging Measurements."""
    measurements = next(item for item in sr.ContentSequence
                        if item.ConceptNameCodeSequence[0].CodeValue == "126010")
    return [item for item in measurements.ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue == "125007"]


def test_image_sr_outlines_each_lesion_on_its_tbrmax_slice(analysed, tmp_path) -> None:
    """The second SR (for viewers that show only image-region measurements, e.g. OHIF):
    per lesion a TID 1410 group whose closed POLYLINE follows the lesion's edge on the
    slice of its TBRmax, selected from that source instance, with TBRmax, TBRmean and
    volume equal to the analysis; it validates, and shares the lesion's tracking UID
    with the volumetric SR."""
    from dicom_node.writers.sr import (
        IMAGE_SERIES_DESCRIPTION,
        SERIES_DESCRIPTION,
        make_image_sr,
        tbr_max_slice,
    )

    volume, result, out = analysed
    sr = make_image_sr(volume.datasets, result, "2.25.13", "2.25.13.1", 9904, PROVENANCE)
    assert sr is not None
    (tmp_path / "image-sr.dcm").write_bytes(encode(sr))
    checked = validate_dicom(tmp_path / "image-sr.dcm")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    sr = dcmread(tmp_path / "image-sr.dcm")
    assert sr.SeriesNumber == 9904 and sr.SeriesDescription == IMAGE_SERIES_DESCRIPTION
    assert sr.SeriesDescription[:20] != SERIES_DESCRIPTION[:20]
    groups = _groups(sr)
    assert len(groups) == len(result.lesions)
    volumetric = {str(item.UID) for group in _groups(dcmread(out / "sr.dcm"))
                  for item in group.ContentSequence if item.ValueType == "UIDREF"}
    for group, lesion in zip(groups, result.lesions, strict=True):
        items = list(group.ContentSequence)
        label = next(i.TextValue for i in items if i.ValueType == "TEXT")
        assert label == f"Lesion {lesion.number}"
        assert next(str(i.UID) for i in items if i.ValueType == "UIDREF") in volumetric
        scoord = next(i for i in items if i.ValueType == "SCOORD")
        assert scoord.GraphicType == "POLYLINE"
        points = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)
        assert len(points) >= 7 and np.array_equal(points[0], points[-1])  # closed
        z = tbr_max_slice(lesion)
        assert lesion.mask[z].any() and lesion.mask[lesion.peak_index] and z == lesion.peak_index[0]
        ref = scoord.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == volume.datasets[z].SOPInstanceUID
        assert ref.ReferencedSOPClassUID == volume.datasets[z].SOPClassUID
        # the polygon encloses the lesion's pixels on that slice and little else
        rows, cols = lesion.mask[z].shape
        centres = np.stack(np.meshgrid(np.arange(cols) + 0.5, np.arange(rows) + 0.5),
                           axis=-1).reshape(-1, 2)
        inside = Path(points).contains_points(centres).reshape(rows, cols)
        overlap = (inside & lesion.mask[z]).sum()
        assert overlap >= 0.9 * lesion.mask[z].sum()
        assert inside.sum() <= 1.5 * lesion.mask[z].sum() + 8
    report = read_tbr_report(sr)
    for read, lesion in zip(report.lesions, result.lesions, strict=True):
        assert read["tbr_max"] == pytest.approx(lesion.tbr_max, abs=1e-4)
        assert read["tbr_mean"] == pytest.approx(lesion.tbr_mean, abs=1e-4)
        assert read["volume_ml"] == pytest.approx(lesion.volume_ml, abs=1e-4)
    # a viewer labels each value with its concept's meaning: the two ratios differ
    names = {str(i.ConceptNameCodeSequence[0].CodeMeaning) for i in groups[0].ContentSequence
             if i.ValueType == "NUM"}
    assert {"TBRmax", "TBRmean", "Volume"} <= names


def test_lesion_outline_of_small_regions_is_a_closed_polygon() -> None:
    """A one-pixel lesion still gets a closed outline of at least 7 points (OHIF reads a
    4- or 5-point POLYLINE as a rectangle) around that pixel's centre."""
    from dicom_node.writers.sr import lesion_outline

    mask = np.zeros((6, 6), bool)
    mask[2, 3] = True
    points = lesion_outline(mask)
    assert len(points) >= 7 and np.array_equal(points[0], points[-1])
    assert Path(points).contains_point((3.5, 2.5))
    assert np.all(np.abs(points - (3.5, 2.5)) <= 0.5 + 1e-6)
    block = np.zeros((8, 8), bool)
    block[2:5, 1:7] = True  # a 6 x 3 block: its outline spans columns 1..7, rows 2..5
    points = lesion_outline(block)
    assert points[:, 0].min() == pytest.approx(1.0) and points[:, 0].max() == pytest.approx(7.0)
    assert points[:, 1].min() == pytest.approx(2.0) and points[:, 1].max() == pytest.approx(5.0)


def _without_timestamps(ds) -> bytes:
    """The encoded dataset with the creation times emptied (content, instance creation,
    series, and the library's contribution date-time)."""
    from io import BytesIO

    copy = dcmread(BytesIO(encode(ds)))
    for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime",
                    "SeriesDate", "SeriesTime"):
        if keyword in copy:
            setattr(copy, keyword, "")
    for item in copy.ContributingEquipmentSequence:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = ""
    return encode(copy)


def test_reports_equal_highdicoms_own_assembly(analysed, monkeypatch) -> None:
    """Both reports are built around a root without the measurement groups (highdicom's
    constructor would copy and search them all) and given the groups after: the result
    equals what highdicom assembles from the full tree, element for element, and a group
    that references an instance outside the evidence is refused as highdicom would."""
    import dicom_node.writers.sr as sr_module
    from dicom_node.writers.sr import make_image_sr

    volume, result, _ = analysed
    seg = make_seg(volume.datasets, result, "2.25.41", "2.25.41.1", 9903, PROVENANCE)

    def both() -> list[bytes]:
        sr = make_sr(volume.datasets, seg, result, "2.25.42", "2.25.42.1", 9902, PROVENANCE)
        image_sr = make_image_sr(volume.datasets, result, "2.25.43", "2.25.43.1", 9904,
                                 PROVENANCE)
        assert image_sr is not None
        return [_without_timestamps(sr), _without_timestamps(image_sr)]

    fast = both()
    monkeypatch.setattr(sr_module, "_root_without_measurements", lambda root: root)
    assert both() == fast
    monkeypatch.undo()
    # the reference check highdicom no longer makes over the whole tree
    import highdicom as hd
    from pydicom.sr.codedict import codes

    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid="2.25.45", identifier="Lesion 1"),
        referenced_segment=sr_module._segment_ref(seg, 1), finding_type=codes.SCT.Neoplasm)
    sr_module._check_references([group], [*volume.datasets, seg])
    with pytest.raises(ValueError, match="not evidence"):
        sr_module._check_references([group], volume.datasets)
