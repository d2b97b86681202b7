"""Tumour-to-background ratios on synthetic uptake (first method).

Method (documented in docs/tbr.md):

1. Tissue: voxels where uptake was drawn (uptake >= the display threshold).
2. Background: a robust mean of tissue uptake: start from the tissue median and
   average the tissue voxels below ``threshold x median``, so hot lesions do not
   raise their own reference.
3. Lesions: 3D connected components (26-connectivity) of tissue voxels at or above
   ``threshold x background``; components smaller than ``min_lesion_volume_ml`` are
   noise. Each lesion: TBRmax = max / background, TBRmean = mean / background,
   volume in mL. Lesions are ordered hottest first.
4. No component left: the finding is "no lesion above threshold".

Known limitation of this first method: FDOPA's physiological striatal uptake is
not excluded and the background is not restricted to the contralateral hemisphere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

METHOD_TEXT = ("Background: robust mean of all brain uptake below threshold x median. "
               "Tumour: 3D connected region of voxels >= threshold x background mean.")


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


@dataclass(frozen=True)
class TbrResult:
    background_mean: float
    background_mask: NDArray[np.bool_] = field(repr=False)
    threshold: float = 1.6
    min_lesion_volume_ml: float = 0.1
    lesions: list[Lesion] = field(default_factory=list)
    method: str = METHOD_TEXT

    @property
    def finding(self) -> str:
        if not self.lesions:
            return "no lesion above threshold"
        return f"{len(self.lesions)} lesion(s) above threshold"


def measure_tbr(uptake: NDArray[np.float32], voxel_volume_ml: float, threshold: float,
                min_lesion_volume_ml: float, display_threshold: float) -> TbrResult:
    tissue = uptake >= display_threshold
    if not tissue.any():
        return TbrResult(background_mean=0.0, background_mask=tissue, threshold=threshold,
                         min_lesion_volume_ml=min_lesion_volume_ml)
    median = float(np.median(uptake[tissue]))
    background_mask = tissue & (uptake < threshold * median)
    background = float(uptake[background_mask].mean()) if background_mask.any() else median
    hot = tissue & (uptake >= threshold * background)
    labels, count = ndimage.label(hot, structure=np.ones((3, 3, 3), dtype=bool))
    min_voxels = max(1, int(np.ceil(min_lesion_volume_ml / voxel_volume_ml)))
    lesions: list[Lesion] = []
    if count:
        sizes = np.bincount(labels.ravel())
        for label in range(1, count + 1):
            if sizes[label] < min_voxels:
                continue
            mask = labels == label
            values = uptake[mask]
            peak_flat = int(np.argmax(np.where(mask, uptake, -np.inf)))
            peak = np.unravel_index(peak_flat, uptake.shape)
            lesions.append(Lesion(
                number=0, tbr_max=float(values.max()) / background,
                tbr_mean=float(values.mean()) / background,
                volume_ml=float(mask.sum()) * voxel_volume_ml, max_uptake=float(values.max()),
                mean_uptake=float(values.mean()), mask=mask,
                peak_index=(int(peak[0]), int(peak[1]), int(peak[2]))))
    lesions.sort(key=lambda item: item.max_uptake, reverse=True)
    numbered = [Lesion(number=i + 1, tbr_max=item.tbr_max, tbr_mean=item.tbr_mean,
                       volume_ml=item.volume_ml, max_uptake=item.max_uptake,
                       mean_uptake=item.mean_uptake, mask=item.mask, peak_index=item.peak_index)
                for i, item in enumerate(lesions)]
    return TbrResult(background_mean=background, background_mask=background_mask & ~hot,
                     threshold=threshold, min_lesion_volume_ml=min_lesion_volume_ml,
                     lesions=numbered)
