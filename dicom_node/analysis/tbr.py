"""Tumour-to-background ratios on synthetic uptake, following amino-acid PET practice.

Method (EANM/EANO/RANO 2019 joint practice guideline for amino-acid PET of gliomas;
details and limitations in docs/tbr.md). Volumes are axial, indexed
(slice, row, column); spacing in mm in the same order.

1. Brain: voxels where uptake was drawn (>= the display threshold), with the T1C
   when given; holes filled, largest component (:mod:`dicom_node.analysis.brain_regions`).
2. Midline: the mid-sagittal symmetry plane estimated from the volume itself
   (mirror self-similarity over in-plane angle and offset), never the image centre.
3. Striatum (FDOPA's physiological uptake): deep, near-midline voxels above
   1.5 x background (robust whole-brain start value) whose mirror image across
   the midline is hot too, grown by 6 mm within warm tissue. Excluded from
   lesions and background.
4. Ventricles: dark CSF on T1C (or very low uptake without T1C); excluded from
   the background.
5. Lesions: 3D connected components (26-connectivity) of brain voxels at or above
   ``threshold x background mean``, striatum excluded, each at least
   ``min_lesion_volume_ml``; ordered hottest first (lesion 1 contains the hottest
   lesion voxel). TBRmax = max / background mean, TBRmean = mean over the region /
   background mean, BTV = region volume in mL.
6. Background: a crescent in the hemisphere contralateral to lesion 1 (the cortex
   and the white matter beneath it, down to 30 mm below the brain's outline, at
   least 4 mm from the midline) on the slices through lesion 1 (a slab of at least
   20 mm), minus striatum, ventricles, voxels above the tumour threshold and every
   lesion with a 5 mm margin. Without a lesion: the crescent of both hemispheres on
   the central 30 mm of the brain. Steps 3, 5 and 6 are iterated from a robust
   whole-brain start value until the background mean settles.
7. No lesion: the finding is "no lesion above threshold" and no ratios are given.

All of this runs on the rows and columns around the drawn uptake (plus a margin wider
than any structuring element reaches), not on the whole field of view; masks and
coordinates are returned in the full volume.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from dicom_node.analysis import brain_regions as regions
from dicom_node.analysis.mask_morphology import bounding_box, grown_box_of_part
from dicom_node.config import AnalysisConfig

# The node's defaults live in one place, the configuration: 1.6 x background (FET-style
# guideline practice) and 0.1 mL.
DEFAULT_THRESHOLD = AnalysisConfig().tbr_threshold
FDOPA_THRESHOLD = 2.0          # FDOPA high-grade tissue (e.g. Janvier et al. 2015)
DEFAULT_MIN_LESION_VOLUME_ML = AnalysisConfig().min_lesion_volume_ml
CRESCENT_DEPTH_MM = 30.0
MIDLINE_GAP_MM = 4.0
MIN_SLAB_MM = 20.0
LESION_MARGIN_MM = 5.0
NO_LESION_SLAB_MM = 30.0
ITERATIONS = 4
# Rows / columns kept around the drawn uptake: the brain mask reaches 2 voxels beyond it
# (T1C dilation) and its closing 2 more; beyond 6 every step sees only empty voxels.
CROP_MARGIN_VOXELS = 6

METHOD_TEXT = ("Background: crescent of normal-appearing grey and white matter in the "
               "hemisphere contralateral to the hottest lesion (midline from a symmetry-plane "
               "estimate) on the slices through it, excluding striatum, ventricles and voxels "
               "above threshold (both hemispheres on central slices if no lesion). "
               "Tumour: 3D connected region of voxels >= threshold x background mean, "
               "striatum excluded (EANM/EANO/RANO 2019 practice).")

Side = str  # "left" / "right" (patient), or "" when undetermined
T = TypeVar("T")


@dataclass(frozen=True)
class SliceMeasure:
    """One lesion on one slice, against the same (3D) background mean."""

    slice_index: int
    tbr_max: float
    tbr_mean: float
    area_mm2: float


@dataclass(frozen=True)
class Lesion:
    number: int
    tbr_max: float
    tbr_mean: float
    volume_ml: float
    max_uptake: float
    mean_uptake: float
    mask: NDArray[np.bool_] = field(repr=False)
    peak_index: tuple[int, int, int] = (0, 0, 0)
    side: Side = ""
    per_slice: tuple[SliceMeasure, ...] = ()


@dataclass(frozen=True)
class TbrResult:
    background_mean: float
    background_mask: NDArray[np.bool_] = field(repr=False)
    threshold: float = DEFAULT_THRESHOLD
    min_lesion_volume_ml: float = DEFAULT_MIN_LESION_VOLUME_ML
    lesions: list[Lesion] = field(default_factory=list)
    method: str = METHOD_TEXT
    background_side: Side = ""   # "left", "right" or "both"
    background_slices: tuple[int, ...] = ()
    midline: regions.Midline | None = None
    striatum_mask: NDArray[np.bool_] | None = field(default=None, repr=False)
    ventricle_mask: NDArray[np.bool_] | None = field(default=None, repr=False)
    brain_mask: NDArray[np.bool_] | None = field(default=None, repr=False)
    # Set when no ratio can be measured (e.g. no normal-appearing background found).
    note: str = ""

    @property
    def finding(self) -> str:
        if self.note:
            return self.note
        if not self.lesions:
            return "no lesion above threshold"
        return f"{len(self.lesions)} lesion(s) above threshold"


def _side(sign: float, columns_toward_patient_left: bool) -> Side:
    if sign == 0:
        return ""
    high = "left" if columns_toward_patient_left else "right"
    low = "right" if columns_toward_patient_left else "left"
    return high if sign > 0 else low


def _slab(centre: int, half_mm: float, n_slices: int, slice_mm: float) -> NDArray[np.bool_]:
    half = int(np.ceil(half_mm / slice_mm))
    out = np.zeros(n_slices, dtype=bool)
    out[max(0, centre - half): min(n_slices, centre + half + 1)] = True
    return out


def in_plane_box(uptake: NDArray[np.float32], display_threshold: float,
                 margin: int = CROP_MARGIN_VOXELS) -> tuple[slice, slice]:
    """Rows and columns of the drawn uptake, grown by ``margin`` (clipped)."""
    drawn = uptake >= display_threshold
    rows = np.flatnonzero(drawn.any(axis=(0, 2)))
    cols = np.flatnonzero(drawn.any(axis=(0, 1)))
    if rows.size == 0:
        return slice(0, uptake.shape[1]), slice(0, uptake.shape[2])
    return (slice(max(0, int(rows[0]) - margin), min(uptake.shape[1], int(rows[-1]) + margin + 1)),
            slice(max(0, int(cols[0]) - margin), min(uptake.shape[2], int(cols[-1]) + margin + 1)))


def _uncropped(result: TbrResult, rows: slice, cols: slice, shape: tuple[int, ...]
               ) -> TbrResult:
    """``result`` of a (slices, rows, cols) crop, in the coordinates of the full volume."""
    r0, c0 = int(rows.start), int(cols.start)

    def full(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
        placed = np.zeros(shape, dtype=bool)
        placed[:, rows, cols] = mask
        return placed

    def optional(mask: NDArray[np.bool_] | None) -> NDArray[np.bool_] | None:
        return None if mask is None else full(mask)

    midline = result.midline
    if midline is not None:
        midline = replace(midline, centre_row=midline.centre_row + r0,
                          column_at_centre_row=midline.column_at_centre_row + c0)
    lesions = [replace(lesion, mask=full(lesion.mask),
                       peak_index=(lesion.peak_index[0], lesion.peak_index[1] + r0,
                                   lesion.peak_index[2] + c0))
               for lesion in result.lesions]
    return replace(result, background_mask=full(result.background_mask), lesions=lesions,
                   midline=midline, striatum_mask=optional(result.striatum_mask),
                   ventricle_mask=optional(result.ventricle_mask),
                   brain_mask=optional(result.brain_mask))


class InThread(Executor):
    """An executor that runs each call at once in the caller's thread (its future is done
    when ``submit`` returns): the one "run now, wrap in a Future" of the node."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the caller through the future
            future.set_exception(exc)
        return future


def _executor(threads: int) -> Executor:
    return ThreadPoolExecutor(threads, thread_name_prefix="tbr") if threads > 1 else InThread()


def measure_tbr(uptake: NDArray[np.float32], voxel_volume_ml: float,
                threshold: float = DEFAULT_THRESHOLD,
                min_lesion_volume_ml: float = DEFAULT_MIN_LESION_VOLUME_ML,
                display_threshold: float = 0.3, *,
                spacing_mm: tuple[float, float, float] | None = None,
                t1c_grey: NDArray[np.float32] | None = None,
                per_slice: bool = False,
                columns_toward_patient_left: bool = True,
                threads: int = 1) -> TbrResult:
    """Guideline-style TBR measurement of an uptake volume (slice, row, column).

    ``spacing_mm`` (slice, row, column) defaults to isotropic voxels of
    ``voxel_volume_ml``. ``t1c_grey`` (the windowed T1C, same shape) sharpens the
    brain mask, the midline and the ventricles. ``columns_toward_patient_left`` is
    True for the usual axial orientation (ImageOrientationPatient row direction
    +x, LPS) and only names the sides. ``threads`` > 1 runs the independent steps
    (midline, per-slice depth, ventricles beside striatum) on that many threads; the
    result is the same.
    """
    uptake = np.asarray(uptake, dtype=np.float32)
    grey = None if t1c_grey is None else np.asarray(t1c_grey, dtype=np.float32)
    rows, cols = in_plane_box(uptake, display_threshold)
    result = _measure(uptake[:, rows, cols], voxel_volume_ml, threshold, min_lesion_volume_ml,
                      display_threshold, spacing_mm,
                      None if grey is None else grey[:, rows, cols], per_slice,
                      columns_toward_patient_left, threads)
    if (rows.start, rows.stop, cols.start, cols.stop) == (0, uptake.shape[1], 0, uptake.shape[2]):
        return result
    return _uncropped(result, rows, cols, uptake.shape)


def _measure(uptake: NDArray[np.float32], voxel_volume_ml: float, threshold: float,
             min_lesion_volume_ml: float, display_threshold: float,
             spacing_mm: tuple[float, float, float] | None,
             grey: NDArray[np.float32] | None, per_slice: bool,
             columns_toward_patient_left: bool, threads: int) -> TbrResult:
    """:func:`measure_tbr` on arrays already cropped around the brain."""
    if spacing_mm is None:
        edge = float(voxel_volume_ml * 1000.0) ** (1.0 / 3.0)
        spacing_mm = (edge, edge, edge)
    spacing = (float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2]))
    voxel_ml = float(voxel_volume_ml)
    brain = regions.brain_mask(uptake, display_threshold, grey)
    if not brain.any():
        return TbrResult(background_mean=0.0, background_mask=brain, threshold=threshold,
                         min_lesion_volume_ml=min_lesion_volume_ml, brain_mask=brain)
    with _executor(threads) as pool:
        # midline and depth both need only the brain; with threads they run side by side
        midline_job = pool.submit(regions.estimate_midline, brain, spacing, grey)
        depth = regions.depth_mm(brain, spacing, None if threads <= 1 else pool)
        drawn = brain & (uptake >= display_threshold)
        values = uptake[drawn] if drawn.any() else uptake[brain]
        median = float(np.median(values))
        background = float(values[values < threshold * median].mean())
        ventricles_job = pool.submit(regions.find_ventricles, brain, uptake, background,
                                     depth, grey)
        midline = midline_job.result()
        distance = regions.signed_distance(midline, uptake.shape, spacing)  # (rows, cols)
        # The striatum is found once, from the robust start value of the background.
        striatum = regions.find_striatum(uptake, brain, background, midline, distance,
                                         depth, spacing)
        ventricles = ventricles_job.result()
    crescent = brain & (depth <= CRESCENT_DEPTH_MM) & (
        np.abs(distance)[None] >= MIDLINE_GAP_MM) & ~ventricles
    min_voxels = max(1, int(np.ceil(min_lesion_volume_ml / voxel_ml)))
    n_slices = uptake.shape[0]
    area = brain.sum(axis=(1, 2)).astype(np.float64)
    central = round(float((np.arange(n_slices) * area).sum() / area.sum()))

    # Lesions are labelled inside the box around the hot voxels only (they are few): the
    # same labels in the same order as over the whole volume, since the box keeps the
    # voxels' raster order.
    labels = np.zeros((0, 0, 0), dtype=np.int32)
    hot_box: tuple[slice, ...] = (slice(0, 0),) * 3
    order: list[int] = []
    region = brain
    side_sign = 0.0
    slices = np.zeros(n_slices, dtype=bool)
    for _ in range(ITERATIONS):
        above = brain & (uptake >= threshold * background)
        hot = above & ~striatum
        box = bounding_box(hot)
        hot_box = box if box is not None else (slice(0, 0),) * 3
        labels, count = ndimage.label(hot[hot_box], structure=np.ones((3, 3, 3), dtype=bool))
        order = []
        if count:
            box_uptake = uptake[hot_box]
            flat = labels.ravel()
            inside = np.flatnonzero(flat)
            sizes = np.bincount(flat[inside], minlength=count + 1)  # [0] unused
            peaks = np.full(count + 1, -np.inf)
            np.maximum.at(peaks, flat[inside], box_uptake.ravel()[inside])
            peaks = peaks[1:]
            candidates = [i + 1 for i in range(count) if sizes[i + 1] >= min_voxels]
            order = sorted(candidates, key=lambda lab: -float(peaks[lab - 1]))
        if order:
            first = labels == order[0]
            local = np.unravel_index(int(np.argmax(np.where(first, box_uptake, -np.inf))),
                                     first.shape)
            peak = tuple(int(c) + int(part.start) for c, part in zip(local, hot_box, strict=True))
            side_sign = float(np.sign(distance[peak[1], peak[2]])) or 1.0
            through = np.zeros(n_slices, dtype=bool)
            through[hot_box[0]] = first.any(axis=(1, 2))
            idx = np.flatnonzero(through)
            mid = round((idx[0] + idx[-1]) / 2)
            slices = through | _slab(mid, MIN_SLAB_MM / 2, n_slices, spacing[0])
            side = (-side_sign * distance > 0)[None]
            keep = np.zeros(count + 1, dtype=bool)
            keep[order] = True
            margin = [max(1, round(LESION_MARGIN_MM / s)) for s in spacing]
            near_lesion = grown_box_of_part(keep[labels], hot_box, brain.shape, margin)
            region = crescent & side & slices[:, None, None] & ~near_lesion
        else:
            side_sign = 0.0
            slices = _slab(central, NO_LESION_SLAB_MM / 2, n_slices, spacing[0])
            region = crescent & slices[:, None, None]
        region = region & ~striatum & ~above
        if not region.any():
            break
        new_background = float(uptake[region].mean())
        settled = abs(new_background - background) <= 1e-4 * max(background, 1e-6)
        background = new_background
        if settled:
            break

    note = ""
    if not region.any() or not background > 0:
        # No ratio without a reference: report that instead of dividing by nothing.
        note = "no measurable background region: TBR not computed"
        order = []
        background = max(background, 0.0) if np.isfinite(background) else 0.0
    lesions: list[Lesion] = []
    boxes = ndimage.find_objects(labels) if order else []
    for number, label in enumerate(order, start=1):
        # Work inside the lesion's bounding box, not over the whole volume.
        in_hot_box = boxes[label - 1]
        assert in_hot_box is not None
        inside = labels[in_hot_box] == label
        box = tuple(slice(int(h.start) + int(b.start), int(h.start) + int(b.stop))
                    for h, b in zip(hot_box, in_hot_box, strict=True))
        mask = np.zeros(brain.shape, dtype=bool)
        mask[box] = inside
        vals = uptake[box][inside]
        local = np.unravel_index(int(np.argmax(np.where(inside, uptake[box], -np.inf))),
                                 inside.shape)
        at = [int(c) + int(part.start) for c, part in zip(local, box, strict=True)]
        measures: tuple[SliceMeasure, ...] = ()
        if per_slice:
            rows = []
            for k in np.flatnonzero(mask.any(axis=(1, 2))):
                sv = uptake[k][mask[k]]
                rows.append(SliceMeasure(slice_index=int(k),
                                         tbr_max=float(sv.max()) / background,
                                         tbr_mean=float(sv.mean()) / background,
                                         area_mm2=float(sv.size) * spacing[1] * spacing[2]))
            measures = tuple(rows)
        lesions.append(Lesion(
            number=number, tbr_max=float(vals.max()) / background,
            tbr_mean=float(vals.mean()) / background, volume_ml=float(vals.size) * voxel_ml,
            max_uptake=float(vals.max()), mean_uptake=float(vals.mean()), mask=mask,
            peak_index=(at[0], at[1], at[2]),
            side=_side(float(np.sign(distance[at[1], at[2]])), columns_toward_patient_left),
            per_slice=measures))
    background_side = ("both" if side_sign == 0 else
                       _side(-side_sign, columns_toward_patient_left))
    return TbrResult(background_mean=background, background_mask=np.asarray(region, dtype=bool),
                     threshold=threshold, min_lesion_volume_ml=min_lesion_volume_ml,
                     lesions=lesions, background_side=background_side,
                     background_slices=tuple(int(k) for k in np.flatnonzero(slices)),
                     midline=midline, striatum_mask=striatum, ventricle_mask=ventricles,
                     brain_mask=brain, note=note)
