"""What a viewer shows of the outputs and of the phantom: SEG colours and labels with the
lesion's number and TBRmax, SEG and SR told apart in the first 20 characters of their
descriptions, dated series, and a T1C window that fits the data."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.analysis.tbr import measure_tbr
from dicom_node.inference.fusion import window_t1c
from dicom_node.series.volume import load_volume, read_header, slices_of
from dicom_node.writers.sc import encode
from dicom_node.writers.seg import BACKGROUND_SEGMENT, make_seg
from dicom_node.writers.sr import make_sr
from tests.conftest import validate_dicom
from tests.test_reports import GEOMETRY, PROVENANCE
from training.phantom import generate_patient
from training.phantom_dicom import write_patient


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):
    patient = generate_patient(4, seed=0, geometry=GEOMETRY)  # has a tumour
    paths = write_patient(patient, tmp_path_factory.mktemp("phantom"))
    slices = [s for p in paths.t1c for s in slices_of(read_header(p), p)]
    volume = load_volume(slices)
    result = measure_tbr(patient.uptake, volume.voxel_volume_ml, 1.6, 0.1, 0.3,
                         spacing_mm=volume.spacing_mm, t1c_grey=window_t1c(volume.pixels))
    assert result.lesions
    out = tmp_path_factory.mktemp("out")
    seg = make_seg(volume.datasets, result, "2.25.31", "2.25.31.1", 9903, PROVENANCE)
    sr = make_sr(volume.datasets, seg, result, "2.25.32", "2.25.32.1", 9902, PROVENANCE)
    (out / "seg.dcm").write_bytes(encode(seg))
    (out / "sr.dcm").write_bytes(encode(sr))
    return patient, paths, result, out


def test_segments_carry_colours_and_the_lesions_tbrmax(written) -> None:
    _, _, result, out = written
    seg = dcmread(out / "seg.dcm")
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    colours = {n: tuple(s.RecommendedDisplayCIELabValue) for n, s in segments.items()}
    assert len(set(colours.values())) == len(colours)  # every region its own colour
    background = segments[BACKGROUND_SEGMENT]
    assert background.SegmentLabel == "TBR background"
    for lesion in result.lesions:
        label = next(s.SegmentLabel for n, s in segments.items() if n != BACKGROUND_SEGMENT
                     and s.SegmentLabel.startswith(f"Lesion {lesion.number}:"))
        assert f"TBRmax {lesion.tbr_max:.2f}" in label
    assert validate_dicom(out).returncode == 0


def test_outputs_are_dated_and_told_apart_when_truncated(written) -> None:
    _, _, _, out = written
    seg, sr = dcmread(out / "seg.dcm"), dcmread(out / "sr.dcm")
    assert seg.SeriesDescription[:20] != sr.SeriesDescription[:20]
    for ds in (seg, sr):
        assert "NOT FOR DIAGNOSTIC USE" in ds.SeriesDescription
        assert len(ds.SeriesDate) == 8 and ds.SeriesTime and ds.ContentDate


def test_the_phantom_t1c_window_fits_the_brain(written) -> None:
    patient, paths, _, _ = written
    ds = dcmread(paths.t1c[len(paths.t1c) // 2])
    centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
    low, high = centre - width / 2, centre + width / 2
    brain = patient.t1c[patient.brain_mask].astype(np.float64)
    inside = np.mean((brain > low) & (brain < high))
    assert inside > 0.95, (centre, width, np.percentile(brain, [1, 50, 99]))
    assert high > np.percentile(brain, 50) > low


def test_summary_slice_text_stays_clear_of_the_viewers_corner_overlays() -> None:
    """Viewers draw their own text in the four corners of the viewport. On the first SC
    slice the banner sits in a band at the top centre and the TBR summary in one at the
    bottom centre; every burned-in (yellow) pixel lies in the central 80 % of the width,
    and the middle of the image is left as it was."""
    from dicom_node.analysis.tbr import Lesion, TbrResult
    from dicom_node.analysis.uncertainty import TbrInterval
    from dicom_node.writers.provenance import BANNER
    from dicom_node.writers.sc import burn_in, summary_lines

    mask = np.zeros((2, 4, 4), bool)
    lesions = [Lesion(number=n, tbr_max=2.0 + n, tbr_mean=1.8, volume_ml=12.4, max_uptake=1.0,
                      mean_uptake=1.0, mask=mask) for n in (1, 2, 3, 4)]
    result = TbrResult(background_mean=0.95, background_mask=mask, threshold=1.6,
                       lesions=lesions)
    intervals = [TbrInterval(1, 1.41, 4.27, 1.4, 2.2, 0.1, 0.1, 8, 0.9, True)]
    lines = summary_lines(result, intervals, 0.9)
    for size in (256, 512):
        grey = np.full((size, size, 3), 60, np.uint8)  # no yellow in the image itself
        out = burn_in(grey, [BANNER], lines)
        yellow = (out[..., 0] > 128) & (out[..., 1] > 128) & (out[..., 2] < 100)
        rows, cols = np.nonzero(yellow)
        assert len(rows) > 200
        assert cols.min() >= 0.1 * size and cols.max() < 0.9 * size
        # left and right halves hold about as much text: each line is centred
        left, right = (cols < size / 2).sum(), (cols >= size / 2).sum()
        assert abs(left - right) < 0.25 * (left + right)
        top = rows[rows < size / 2]
        bottom = rows[rows >= size / 2]
        assert top.max() < 0.1 * size  # the banner: one line at the top
        assert bottom.min() > size / 2 and bottom.max() < size  # the summary at the bottom
        band_rows = np.nonzero((out != grey).any(axis=(1, 2)))[0]
        middle = out[int(top.max()) + 8: int(bottom.min()) - 8]
        assert np.array_equal(middle, grey[: len(middle)])  # the anatomy is untouched
        assert band_rows.max() == size - 1 or band_rows.max() >= bottom.max()
    # without a summary only the banner band is drawn
    plain = burn_in(np.full((256, 256, 3), 60, np.uint8), [BANNER])
    assert (plain[128:] == 60).all()
