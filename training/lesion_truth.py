"""Lesions the node reports, matched to the phantom's ground-truth tumours.

What a radiologist meets is a list of lesions, not a slice metric. For one uptake volume
(real, synthetic or oracle) the node's own TBR method (:func:`dicom_node.analysis.tbr.measure_tbr`)
returns lesions; this module decides which ground-truth tumour each one is:

- a reported lesion *matches* tumour k when its hottest voxel lies in tumour k grown by
  ``reach_mm`` (the PET blur carries a lesion's uptake past its edge), or when at least
  half of its voxels do;
- the matched lesion with the most voxels in the grown tumour is the tumour's *finding*
  (its TBRs are the ones compared); further lesions matched to the same tumour are
  *fragments* (satellites of one finding, neither a second finding nor a false focus);
- a lesion that matches no tumour is a *false focus*.

Besides the node's numbers, each tumour gets TBRs in a fixed VOI at the truth (the
maximum over the tumour grown by ``voi_margin_mm``, the mean over the tumour itself,
both over the node's background mean for that volume): defined whether the node found
the lesion or not, so their agreement is not limited to the lesions the model happened
to find.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from scipy import ndimage

from dicom_node.analysis.mask_morphology import bounding_box
from dicom_node.analysis.tbr import Lesion, TbrResult, measure_tbr

DEFAULT_REACH_MM = 4.0
DEFAULT_VOI_MARGIN_MM = 2.0


@dataclass(frozen=True)
class ReportedLesion:
    """One lesion of the node's result and what it was matched to (0: nothing)."""

    number: int
    tbr_max: float
    tbr_mean: float
    volume_ml: float
    peak_index: tuple[int, int, int]
    truth_label: int
    role: str  # "finding" | "fragment" | "false_focus"


@dataclass(frozen=True)
class TruthLesion:
    """One ground-truth tumour, as one uptake volume shows it."""

    label: int
    found: bool
    tbr_max: float  # the node's finding (nan when not found)
    tbr_mean: float
    volume_ml: float
    voi_tbr_max: float  # the fixed VOI at the truth (nan when the volume has no background)
    voi_tbr_mean: float
    finding_number: int  # the node's lesion number of the finding (0 when not found)


@dataclass(frozen=True)
class Matching:
    truth: tuple[TruthLesion, ...]
    reported: tuple[ReportedLesion, ...]

    @property
    def false_foci(self) -> tuple[ReportedLesion, ...]:
        return tuple(r for r in self.reported if r.role == "false_focus")

    @property
    def fragments(self) -> tuple[ReportedLesion, ...]:
        return tuple(r for r in self.reported if r.role == "fragment")

    def of(self, label: int) -> TruthLesion:
        return next(t for t in self.truth if t.label == label)


def grown_labels(labels: NDArray[np.integer], spacing_mm: tuple[float, float, float],
                 margin_mm: float) -> NDArray[np.int32]:
    """Each label grown by ``margin_mm`` into unlabelled voxels (nearest label wins)."""
    labels = np.asarray(labels)
    out = labels.astype(np.int32)
    if margin_mm <= 0 or not labels.any():
        return out
    pad = [int(np.ceil(margin_mm / s)) + 1 for s in spacing_mm]
    region = bounding_box(labels > 0, pad)
    assert region is not None
    crop = labels[region]
    distance, nearest = ndimage.distance_transform_edt(
        crop == 0, sampling=spacing_mm, return_indices=True)
    grown = crop[tuple(nearest)].astype(np.int32)
    grown[distance > margin_mm] = 0
    out[region] = grown
    return out


def match_lesions(labels: NDArray[np.integer], result: TbrResult,
                  spacing_mm: tuple[float, float, float], uptake: NDArray[np.floating],
                  reach_mm: float = DEFAULT_REACH_MM,
                  voi_margin_mm: float = DEFAULT_VOI_MARGIN_MM, use_peaks: bool = True
                  ) -> Matching:
    """Match ``result``'s lesions (measured on ``uptake``) to the tumour ``labels``;
    ``use_peaks=False`` for lesions read back from a SEG (no hottest voxel known):
    the overlap rule alone."""
    labels = np.asarray(labels)
    truth_ids = [int(v) for v in np.unique(labels) if v > 0]
    reach = grown_labels(labels, spacing_mm, reach_mm)
    matched: list[tuple[Lesion, int, int]] = []  # (lesion, label, voxels inside)
    for lesion in result.lesions:
        inside = reach[lesion.mask]
        peak_label = int(reach[lesion.peak_index]) if use_peaks else 0
        counts = np.bincount(inside, minlength=max(truth_ids, default=0) + 1)
        counts[0] = 0
        best = int(np.argmax(counts)) if counts.any() else 0
        label = peak_label or (best if counts[best] * 2 >= inside.size else 0)
        matched.append((lesion, label, int(counts[label]) if label else 0))
    finding_of: dict[int, Lesion] = {}
    for label in truth_ids:
        candidates = [(n, lesion) for lesion, lab, n in matched if lab == label]
        if candidates:
            finding_of[label] = max(candidates, key=lambda c: (c[0], -c[1].number))[1]
    reported = []
    for lesion, label, _n in matched:
        role = ("false_focus" if label == 0 else
                "finding" if finding_of.get(label) is lesion else "fragment")
        reported.append(ReportedLesion(
            number=lesion.number, tbr_max=lesion.tbr_max, tbr_mean=lesion.tbr_mean,
            volume_ml=lesion.volume_ml,
            peak_index=tuple(int(i) for i in lesion.peak_index),  # type: ignore[arg-type]
            truth_label=label, role=role))
    voi = grown_labels(labels, spacing_mm, voi_margin_mm)
    background = result.background_mean
    usable = bool(np.isfinite(background) and background > 0 and not result.note)
    values = np.asarray(uptake, dtype=np.float64)
    truth = []
    for label in truth_ids:
        finding = finding_of.get(label)
        if usable:
            voi_max = float(values[voi == label].max() / background)
            voi_mean = float(values[labels == label].mean() / background)
        else:
            voi_max = voi_mean = float("nan")
        truth.append(TruthLesion(
            label=label, found=finding is not None,
            tbr_max=finding.tbr_max if finding else float("nan"),
            tbr_mean=finding.tbr_mean if finding else float("nan"),
            volume_ml=finding.volume_ml if finding else float("nan"),
            voi_tbr_max=voi_max, voi_tbr_mean=voi_mean,
            finding_number=finding.number if finding else 0))
    return Matching(truth=tuple(truth), reported=tuple(reported))


def measure_and_match(labels: NDArray[np.integer], uptake: NDArray[np.floating],
                      spacing_mm: tuple[float, float, float], grey: NDArray[np.float32],
                      threshold: float, min_volume_ml: float, display_threshold: float
                      ) -> tuple[TbrResult, Matching]:
    """The node's TBR method on one uptake volume, its lesions matched to ``labels``."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    result = measure_tbr(np.asarray(uptake, dtype=np.float32), voxel_ml, threshold,
                         min_volume_ml, display_threshold, spacing_mm=spacing_mm, t1c_grey=grey)
    return result, match_lesions(labels, result, spacing_mm, uptake)


def detection_rate(found: Sequence[bool]) -> float:
    return float(np.mean(found)) if len(found) else float("nan")


def segment_masks(seg: Dataset, source_uids: Sequence[str], shape: tuple[int, int, int]
                  ) -> dict[int, NDArray[np.bool_]]:
    """The masks of a binary SEG's segments on the source series' grid: ``source_uids``
    are the source slices' SOP Instance UIDs in slice order, ``shape`` the volume's."""
    index = {uid: k for k, uid in enumerate(source_uids)}
    frames = np.asarray(seg.pixel_array).astype(bool)
    if frames.ndim == 2:
        frames = frames[None]
    masks: dict[int, NDArray[np.bool_]] = {}
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = str(item.DerivationImageSequence[0].SourceImageSequence[0]
                     .ReferencedSOPInstanceUID)
        mask = masks.setdefault(number, np.zeros(shape, dtype=bool))
        mask[index[source]] |= frame
    return masks
