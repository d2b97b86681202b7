"""Guideline-style TBR measurement on phantoms with known truth (docs/tbr.md).

Phantoms: seed 0, 128 x 128 matrix, 2 mm pixels, 4 mm slices. Patient 4 has one
solid enhancing tumour (radius 13 mm, patient right), patient 5 a rim-enhancing
tumour on the right and a non-enhancing one on the left, patient 1 no tumour.

Reference values ("truth") use the phantom's true uptake and masks with the same
definitions as the method: background mean = the phantom's normal-background mean
(brain minus tumours, oedema and striatum with a 5 mm margin); TBRmax = the
phantom's ``tbr_max`` (lesion maximum / that mean); TBRmean = mean true uptake of
the voxels >= threshold x true background connected to the true tumour / that mean.

Run as a script to print the de-fusion and TBR accuracy table of docs/tbr.md:
``.venv/bin/python -m tests.test_tbr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage

from dicom_node.analysis.tbr import TbrResult, measure_tbr
from dicom_node.inference.fusion import defuse, window_t1c
from training.phantom import PhantomGeometry, PhantomPatient, generate_patient

GEOMETRY = PhantomGeometry(rows=128, cols=128, pixel_spacing_mm=2.0, slice_spacing_mm=4.0)
SPACING = GEOMETRY.spacing_mm
VOXEL_ML = float(np.prod(SPACING)) / 1000.0
THRESHOLD = 1.6
MIN_ML = 0.1
TBR_TOLERANCE = 0.05
TUMOUR_DICE = 0.80       # lesion region vs true threshold region
BACKGROUND_IN_NORMAL = 0.95  # share of the background region inside the true normal brain
BACKGROUND_CONTRALATERAL = 0.98  # share of it on the true contralateral side
BACKGROUND_DICE = 0.70   # vs the same crescent rule applied to the true masks and midline
DEFUSION_MAE = 0.01      # mean |recovered - true| uptake inside the brain


@dataclass(frozen=True)
class Reference:
    label: int
    region: NDArray[np.bool_]
    tbr_max: float
    tbr_mean: float


def patient(index: int) -> PhantomPatient:
    return generate_patient(index, seed=0, geometry=GEOMETRY)


def true_left(p: PhantomPatient) -> NDArray[np.bool_]:
    """Patient-left half (rows, cols) of the true mid-sagittal plane (x_LPS = -shift_x)."""
    x = GEOMETRY.axis_mm(2)
    left = x > -p.pose["shift_x_mm"]
    return np.broadcast_to(left[None, :], (GEOMETRY.rows, GEOMETRY.cols)).copy()


def references(p: PhantomPatient, threshold: float = THRESHOLD) -> list[Reference]:
    """True threshold regions and TBRs of the tumours big enough to be reported."""
    bg = p.background_mean
    hot = (p.uptake >= threshold * bg) & ~p.striatum_mask
    labels, _ = ndimage.label(hot, structure=np.ones((3, 3, 3), bool))
    out = []
    for tumour in p.tumours:
        ids = np.unique(labels[(p.tumour_labels == tumour.label) & hot])
        region = np.isin(labels, ids[ids > 0])
        if region.sum() * VOXEL_ML < MIN_ML:
            continue
        out.append(Reference(label=tumour.label, region=region, tbr_max=tumour.tbr_max,
                             tbr_mean=float(p.uptake[region].mean()) / bg))
    return out


def dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def measure(uptake: NDArray[np.float32], t1c: NDArray[np.generic],
            **kwargs: object) -> TbrResult:
    return measure_tbr(uptake, VOXEL_ML, THRESHOLD, MIN_ML, 0.3, spacing_mm=SPACING,
                       t1c_grey=window_t1c(t1c), **kwargs)  # type: ignore[arg-type]


def defused_uptake(p: PhantomPatient) -> NDArray[np.float32]:
    grey = window_t1c(p.t1c)
    return defuse(p.fusion.astype(np.float32) / 255.0, grey, p.fusion_style).uptake


def match(result: TbrResult, ref: Reference) -> tuple[float, float, float]:
    """(Dice, TBRmax relative error, TBRmean relative error) of the best lesion."""
    best = max(result.lesions, key=lambda lesion: dice(lesion.mask, ref.region))
    return (dice(best.mask, ref.region), best.tbr_max / ref.tbr_max - 1.0,
            best.tbr_mean / ref.tbr_mean - 1.0)


@pytest.fixture(scope="module")
def phantoms() -> dict[int, PhantomPatient]:
    return {index: patient(index) for index in (1, 4, 5)}


@pytest.mark.parametrize("index", [4, 5])
@pytest.mark.parametrize("source", ["true", "defused"])
def test_tumour_regions_and_tbrs_match_truth(phantoms: dict[int, PhantomPatient], index: int,
                                             source: str) -> None:
    p = phantoms[index]
    uptake = p.uptake if source == "true" else defused_uptake(p)
    result = measure(uptake, p.t1c)
    refs = references(p)
    assert refs, "phantom choice: expected a reportable tumour"
    assert len(result.lesions) == len(refs)
    for ref in refs:
        d, err_max, err_mean = match(result, ref)
        assert d >= TUMOUR_DICE, (ref.label, d)
        assert abs(err_max) <= TBR_TOLERANCE, (ref.label, err_max)
        assert abs(err_mean) <= TBR_TOLERANCE, (ref.label, err_mean)
    assert abs(result.background_mean / p.background_mean - 1.0) <= 0.03
    for lesion in result.lesions:
        assert not (lesion.mask & p.striatum_mask).any()
        assert lesion.volume_ml == pytest.approx(lesion.mask.sum() * VOXEL_ML)
    # lesions are ordered hottest first and carry their side
    assert [les.max_uptake for les in result.lesions] == sorted(
        (les.max_uptake for les in result.lesions), reverse=True)


def test_solid_tumour_overlaps_its_anatomical_mask(phantoms: dict[int, PhantomPatient]) -> None:
    p = phantoms[4]
    result = measure(p.uptake, p.t1c)
    assert len(result.lesions) == 1
    assert dice(result.lesions[0].mask, p.tumour_labels == 1) >= 0.85
    assert result.lesions[0].side == "right"  # tumour at x_LPS -27 mm
    assert result.background_side == "left"


def crescent_truth(p: PhantomPatient, result: TbrResult, contralateral: NDArray[np.bool_]
                   ) -> NDArray[np.bool_]:
    """The crescent rule on the true masks and the true midline (same slices)."""
    brain = p.brain_mask
    depth = np.zeros(brain.shape, dtype=np.float32)
    for k in range(brain.shape[0]):
        depth[k] = ndimage.distance_transform_edt(brain[k], sampling=SPACING[1:])
    x = GEOMETRY.axis_mm(2) + p.pose["shift_x_mm"]
    away = np.abs(x)[None, None, :] >= 4.0
    slices = np.zeros(brain.shape[0], dtype=bool)
    slices[list(result.background_slices)] = True
    csf_free = p.uptake >= 0.5 * p.background_mean
    return (p.background_mask & (depth <= 30.0) & away & contralateral[None]
            & slices[:, None, None] & csf_free & (p.uptake < THRESHOLD * p.background_mean))


@pytest.mark.parametrize("index", [4, 5])
def test_background_is_contralateral_crescent(phantoms: dict[int, PhantomPatient],
                                              index: int) -> None:
    p = phantoms[index]
    result = measure(p.uptake, p.t1c)
    bg = result.background_mask
    hottest = result.lesions[0]
    tumour_left = bool(true_left(p)[hottest.peak_index[1], hottest.peak_index[2]])
    contralateral = ~true_left(p) if tumour_left else true_left(p)
    assert bg.sum() * VOXEL_ML >= 20.0  # a large region
    assert (bg & p.background_mask).sum() / bg.sum() >= BACKGROUND_IN_NORMAL
    assert (bg & contralateral[None]).sum() / bg.sum() >= BACKGROUND_CONTRALATERAL
    assert dice(bg, crescent_truth(p, result, contralateral)) >= BACKGROUND_DICE
    assert set(np.flatnonzero(hottest.mask.any(axis=(1, 2)))) <= set(result.background_slices)
    assert not (bg & result.striatum_mask).any() if result.striatum_mask is not None else True
    assert result.background_mean == pytest.approx(float(p.uptake[bg].mean()), rel=1e-3)


def test_tumour_free_phantom_reports_no_lesion(phantoms: dict[int, PhantomPatient]) -> None:
    p = phantoms[1]
    assert not p.tumours
    for uptake in (p.uptake, defused_uptake(p)):
        result = measure(uptake, p.t1c)
        assert result.finding == "no lesion above threshold"
        assert result.lesions == []
        assert result.background_side == "both"
        assert result.background_mask.sum() * VOXEL_ML >= 20.0
        assert abs(result.background_mean / p.background_mean - 1.0) <= 0.03
        inside = (result.background_mask & p.background_mask).sum()
        assert inside / result.background_mask.sum() >= BACKGROUND_IN_NORMAL


@pytest.mark.parametrize("threshold", [1.5, 1.6, 2.0])
def test_striatum_is_never_a_lesion(phantoms: dict[int, PhantomPatient], threshold: float) -> None:
    for p in phantoms.values():
        result = measure_tbr(p.uptake, VOXEL_ML, threshold, MIN_ML, 0.3, spacing_mm=SPACING,
                             t1c_grey=window_t1c(p.t1c))
        assert result.striatum_mask is not None
        # the physiological striatum is found: most of its hot core is covered
        core = p.striatum_mask & (p.uptake >= 1.8 * p.background_mean)
        assert (core & result.striatum_mask).sum() / core.sum() >= 0.9
        for lesion in result.lesions:
            assert not (lesion.mask & p.striatum_mask).any()
            assert (p.tumour_labels[lesion.mask] > 0).any() or lesion.volume_ml < 0.5


def _move(volume: NDArray[np.generic], angle_deg: float, shift_px: tuple[float, float],
          order: int) -> NDArray[np.generic]:
    """Rotate each slice about its centre and shift it (row, col pixels)."""
    theta = math.radians(angle_deg)
    m = np.array([[1, 0, 0], [0, math.cos(theta), -math.sin(theta)],
                  [0, math.sin(theta), math.cos(theta)]])
    centre = (np.asarray(volume.shape, dtype=np.float64) - 1) / 2
    offset = centre - m @ (centre + np.array([0.0, *shift_px]))
    # output x samples input at m @ x + offset = centre + m @ (x - centre - shift)
    return ndimage.affine_transform(volume, m, offset=offset, order=order, mode="constant")


def test_shifted_rotated_patient_gets_contralateral_background(
        phantoms: dict[int, PhantomPatient]) -> None:
    p = phantoms[4]
    angle, shift = 8.0, (4.0, 10.0)  # degrees; (rows, cols) pixels = 8 mm, 20 mm
    uptake = _move(p.uptake, angle, shift, 1).astype(np.float32)
    t1c = _move(p.t1c.astype(np.float32), angle, shift, 1)
    left = _move(np.broadcast_to(true_left(p)[None], p.uptake.shape).astype(np.uint8),
                 angle, shift, 0).astype(bool)
    brain = _move(p.brain_mask.astype(np.uint8), angle, shift, 0).astype(bool)
    tumour = _move((p.tumour_labels == 1).astype(np.uint8), angle, shift, 0).astype(bool)
    base = measure(p.uptake, p.t1c)
    result = measure(uptake, t1c)
    assert len(result.lesions) == 1
    assert dice(result.lesions[0].mask, tumour) >= 0.8
    assert result.lesions[0].tbr_max == pytest.approx(base.lesions[0].tbr_max, rel=0.05)
    bg = result.background_mask
    assert (bg & ~left & brain).sum() / bg.sum() <= 1.0 - BACKGROUND_CONTRALATERAL  # not right
    assert (bg & left).sum() / bg.sum() >= BACKGROUND_CONTRALATERAL
    # the midline followed the patient: the estimate turned with it
    assert result.midline is not None and base.midline is not None
    turned = result.midline.angle_deg - base.midline.angle_deg
    assert abs(abs(turned) - angle) <= 2.0
    # the image centre would cut through the left hemisphere: the naive rule fails here
    centre_col = (GEOMETRY.cols - 1) / 2
    naive_left = np.arange(GEOMETRY.cols)[None, :] > centre_col
    naive = brain & naive_left[None] & (np.abs(np.arange(GEOMETRY.cols) - centre_col)
                                        >= 2)[None, None, :]
    assert (naive & ~left).sum() / naive.sum() > 1.0 - BACKGROUND_CONTRALATERAL


def test_per_slice_measures(phantoms: dict[int, PhantomPatient]) -> None:
    p = phantoms[4]
    result = measure(p.uptake, p.t1c, per_slice=True)
    lesion = result.lesions[0]
    slices = [m.slice_index for m in lesion.per_slice]
    assert slices == list(np.flatnonzero(lesion.mask.any(axis=(1, 2))))
    assert max(m.tbr_max for m in lesion.per_slice) == pytest.approx(lesion.tbr_max)
    area = sum(m.area_mm2 for m in lesion.per_slice) * SPACING[0] / 1000.0
    assert area == pytest.approx(lesion.volume_ml)
    assert measure(p.uptake, p.t1c).lesions[0].per_slice == ()


def test_defusion_recovers_uptake_inside_the_brain(phantoms: dict[int, PhantomPatient]) -> None:
    p = phantoms[5]
    recovered = defused_uptake(p)
    brain = p.brain_mask
    error = np.abs(recovered[brain] - p.uptake[brain])
    assert float(error.mean()) <= DEFUSION_MAE
    shown = brain & (p.uptake >= p.fusion_style.display_threshold)
    assert float(np.abs(recovered[shown] - p.uptake[shown]).max()) <= 0.02


def test_works_without_t1c(phantoms: dict[int, PhantomPatient]) -> None:
    p = phantoms[4]
    result = measure_tbr(p.uptake, VOXEL_ML, THRESHOLD, MIN_ML, 0.3, spacing_mm=SPACING)
    ref = references(p)[0]
    d, err_max, err_mean = match(result, ref)
    assert d >= TUMOUR_DICE and abs(err_max) <= TBR_TOLERANCE and abs(err_mean) <= TBR_TOLERANCE
    assert result.background_side == "left"


def accuracy_table(indices: range) -> None:
    """Print de-fusion error and TBR errors (method vs truth, de-fused vs true uptake)."""
    print("patient | defusion MAE brain | p99 | TBRmax err true | TBRmean err true | "
          "TBRmax err defused | TBRmean err defused | Dice tumour | Dice background")
    for index in indices:
        p = patient(index)
        recovered = defused_uptake(p)
        err = np.abs(recovered[p.brain_mask] - p.uptake[p.brain_mask])
        true_result = measure(p.uptake, p.t1c)
        def_result = measure(recovered, p.t1c)
        refs = references(p)
        rows = []
        for ref in refs:
            if not true_result.lesions or not def_result.lesions:
                rows.append(f"{ref.label}: missed")
                continue
            d, e1, e2 = match(true_result, ref)
            _, e3, e4 = match(def_result, ref)
            if d == 0.0:
                rows.append(f"{ref.label}: missed (true region "
                            f"{ref.region.sum() * VOXEL_ML:.2f} mL)")
                continue
            rows.append(f"{ref.label}: {100 * e1:+.1f}% | {100 * e2:+.1f}% | {100 * e3:+.1f}% | "
                        f"{100 * e4:+.1f}% | {d:.2f}")
        if true_result.lesions:
            first = true_result.lesions[0]
            is_left = true_left(p)[first.peak_index[1], first.peak_index[2]]
            contra = ~true_left(p) if is_left else true_left(p)
        else:
            contra = np.ones((GEOMETRY.rows, GEOMETRY.cols), dtype=bool)
        bg_dice = dice(true_result.background_mask, crescent_truth(p, true_result, contra))
        tumours = "; ".join(rows) or ("no reportable tumour" if p.tumours else "no tumour")
        print(f"{index} | {err.mean():.4f} | {np.percentile(err, 99):.4f} | "
              f"{tumours} | bg {bg_dice:.2f} | "
              f"bg mean {100 * (true_result.background_mean / p.background_mean - 1):+.1f}% | "
              f"{true_result.finding}")


if __name__ == "__main__":
    accuracy_table(range(12))


@pytest.mark.parametrize("where", ["inside", "edges", "empty"])
def test_grown_mask_equals_the_maximum_filter_over_the_whole_volume(where: str) -> None:
    """The lesion margin is grown on the lesions' bounding box only; it must equal the
    box-shaped maximum filter over the whole volume, also where a lesion touches the
    volume's faces."""
    from dicom_node.analysis.mask_morphology import grown_box

    rng = np.random.default_rng(3)
    mask = np.zeros((20, 40, 30), dtype=bool)
    if where == "inside":
        mask[8:11, 15:19, 10:12] = rng.random((3, 4, 2)) > 0.3
        mask[12, 25, 20] = True
    elif where == "edges":
        mask[0, 0, 5] = mask[19, 39, 29] = mask[10, 0, 29] = True
    margin = [1, 3, 2]
    expected = ndimage.maximum_filter(mask, size=tuple(2 * m + 1 for m in margin))
    np.testing.assert_array_equal(grown_box(mask, margin), expected)


@pytest.mark.parametrize("shape", [(6, 41, 37), (3, 5, 4), (1, 9, 2), (8, 3, 30)])
def test_separable_morphology_equals_scipy_binary_operations(
        shape: tuple[int, int, int]) -> None:
    """mask_morphology's shifted-copy morphology gives the voxels of scipy's binary_*
    operations, also where shapes touch the volume's faces and where the volume is
    thinner than the structuring element reaches."""
    from dicom_node.analysis import mask_morphology as morphology

    rng = np.random.default_rng(11)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    for level in (0.3, 0.45, 0.5, 0.55, 0.7):
        mask = ndimage.gaussian_filter(rng.random(shape), 1.2) > level
        for steps in (1, 2, 3):
            np.testing.assert_array_equal(morphology.dilate_cross(mask, steps),
                                          ndimage.binary_dilation(mask, iterations=steps))
            np.testing.assert_array_equal(
                morphology.close_in_plane(mask, steps),
                ndimage.binary_closing(mask, structure=np.ones((1, 3, 3), bool),
                                       iterations=steps))
        np.testing.assert_array_equal(morphology.fill_holes_in_plane(mask),
                                      ndimage.binary_fill_holes(mask, structure=in_plane))
        np.testing.assert_array_equal(  # 0/1 integers are a mask too (not bitwise-not)
            morphology.fill_holes_in_plane(mask.astype(np.uint8)),
            ndimage.binary_fill_holes(mask, structure=in_plane))
        np.testing.assert_array_equal(
            morphology.open_2x2_in_plane(mask),
            ndimage.binary_opening(mask, structure=np.ones((1, 2, 2), bool)))
    # scipy reads iterations < 1 as "until nothing changes": refused, not silently a copy
    with pytest.raises(ValueError, match="steps"):
        morphology.dilate_cross(mask, 0)
    with pytest.raises(ValueError, match="steps"):
        morphology.close_in_plane(mask, 0)


def test_grown_part_equals_growing_the_whole_volume() -> None:
    """Growing a part given inside a box (the lesions inside the box of hot voxels) is
    the box-shaped maximum filter of the whole volume it belongs to."""
    from dicom_node.analysis.mask_morphology import grown_box_of_part

    rng = np.random.default_rng(5)
    shape = (12, 30, 25)
    for box in [(slice(2, 9), slice(0, 11), slice(20, 25)), (slice(0, 12), slice(3, 4),
                                                              slice(1, 24))]:
        part = rng.random(tuple(b.stop - b.start for b in box)) > 0.9
        whole = np.zeros(shape, dtype=bool)
        whole[box] = part
        margin = [1, 4, 2]
        np.testing.assert_array_equal(
            grown_box_of_part(part, box, shape, margin),
            ndimage.maximum_filter(whole, size=tuple(2 * m + 1 for m in margin)))


def test_depth_equals_the_distance_transform_of_whole_slices(
        phantoms: dict[int, PhantomPatient]) -> None:
    """depth_mm runs each slice's distance transform on the brain's box plus a ring of
    background only; that must give the whole slice's distances, bit for bit."""
    from dicom_node.analysis.brain_regions import depth_mm

    brain = phantoms[5].brain_mask.copy()
    brain[:, :, :3] = True  # a brain touching a face: nothing to pad on that side
    expected = np.zeros(brain.shape, dtype=np.float32)
    for k in range(brain.shape[0]):
        if brain[k].any():
            expected[k] = ndimage.distance_transform_edt(brain[k], sampling=SPACING[1:])
    np.testing.assert_array_equal(depth_mm(brain, SPACING), expected)


@pytest.mark.parametrize("with_t1c", [True, False])
def test_threads_give_the_same_measurement(phantoms: dict[int, PhantomPatient],
                                           with_t1c: bool) -> None:
    """The analysis' independent steps may run on threads; every number and mask must
    be what one thread gives."""
    p = phantoms[5]
    grey = window_t1c(p.t1c) if with_t1c else None

    def run(threads: int) -> TbrResult:
        return measure_tbr(p.uptake, VOXEL_ML, THRESHOLD, MIN_ML, 0.3, spacing_mm=SPACING,
                           t1c_grey=grey, per_slice=True, threads=threads)

    one, three = run(1), run(3)
    assert one.lesions
    assert (one.background_mean, one.finding, one.background_side, one.midline,
            one.background_slices) == (three.background_mean, three.finding,
                                       three.background_side, three.midline,
                                       three.background_slices)
    for name in ("background_mask", "brain_mask", "striatum_mask", "ventricle_mask"):
        np.testing.assert_array_equal(getattr(one, name), getattr(three, name), name)
    assert [(x.tbr_max, x.tbr_mean, x.volume_ml, x.peak_index, x.per_slice)
            for x in one.lesions] == [(x.tbr_max, x.tbr_mean, x.volume_ml, x.peak_index,
                                       x.per_slice) for x in three.lesions]
    for a, b in zip(one.lesions, three.lesions, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)


def test_wide_field_of_view_gives_the_same_measurement_in_full_coordinates(
        phantoms: dict[int, PhantomPatient]) -> None:
    """The measurement runs on the rows and columns around the brain; a head in a
    wider, off-centre field of view gets the same lesions, and every mask and index
    comes back in the coordinates of the volume that was passed in."""
    p = phantoms[5]
    grey = window_t1c(p.t1c)  # windowed once: padding would move its percentiles

    def run(uptake: NDArray[np.float32], t1c_grey: NDArray[np.float32]) -> TbrResult:
        return measure_tbr(uptake, VOXEL_ML, THRESHOLD, MIN_ML, 0.3, spacing_mm=SPACING,
                           t1c_grey=t1c_grey, per_slice=True)

    tight = run(p.uptake, grey)
    pad = ((0, 0), (30, 7), (5, 41))
    wide = run(np.pad(p.uptake, pad), np.pad(grey, pad))
    assert tight.lesions and len(wide.lesions) == len(tight.lesions)
    shape = np.pad(p.uptake, pad).shape
    assert wide.brain_mask is not None and tight.brain_mask is not None
    assert wide.brain_mask.shape == shape
    np.testing.assert_array_equal(wide.brain_mask[:, 30:-7, 5:-41], tight.brain_mask)
    assert wide.background_mean == pytest.approx(tight.background_mean, rel=0.01)
    for a, b in zip(wide.lesions, tight.lesions, strict=True):
        assert a.mask.shape == shape
        assert dice(a.mask[:, 30:-7, 5:-41], b.mask) > 0.98
        assert a.tbr_max == pytest.approx(b.tbr_max, rel=0.01)
        assert a.peak_index == (b.peak_index[0], b.peak_index[1] + 30, b.peak_index[2] + 5)
        assert [m.slice_index for m in a.per_slice] == [m.slice_index for m in b.per_slice]
    assert wide.midline is not None and tight.midline is not None
    # the same plane: the midline's column on any row moves by the column offset
    for row in (20.0, 64.0, 100.0):
        def column(m: object, r: float) -> float:
            return float(m.column_at_centre_row + (r - m.centre_row) * math.tan(  # type: ignore[attr-defined]
                math.radians(m.angle_deg)))  # type: ignore[attr-defined]
        assert column(wide.midline, row + 30) == pytest.approx(column(tight.midline, row) + 5,
                                                               abs=1.0)
