"""Smoothing of the synthetic uptake along the slice normal.

A one-slice generator predicts every slice on its own, but a PET voxel's value comes
from tracer a few millimetres away in every direction (about 4-5 mm FWHM), also from
the slices above and below. Left alone, the synthetic uptake of a lesion's first and
last slices misses that, and neighbouring slices disagree where the T1C is ambiguous
(stripes in a coronal or sagittal reformat). A model card's ``slice_smoothing_mm`` is
the standard deviation, in millimetres, of a Gaussian applied along the slice axis of
the generator's uptake before it is fused, measured, written or evaluated; it was chosen
on the validation patients (docs/model-card.md). 0 leaves the output as it is.

The same function serves the node (a series volume's runs of contiguous slices) and
evaluation (each study's runs among a split's rows), runs as
:func:`dicom_node.inference.slice_context.contiguous_runs` finds them, each at its own slice
spacing. The ends of a run repeat the last slice (``mode="nearest"``), so nothing is
smoothed in from another study or across a missing slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy.ndimage import gaussian_filter1d


def sigma_slices(sigma_mm: float, slice_spacing_mm: float | None) -> float:
    """The smoothing's standard deviation in slices (0 when either is unknown or 0)."""
    if sigma_mm <= 0 or not slice_spacing_mm or slice_spacing_mm <= 0:
        return 0.0
    return float(sigma_mm / slice_spacing_mm)


def smooth_slices(uptake: NDArray[np.float32], sigma_mm: float,
                  slice_spacing_mm: float | None) -> NDArray[np.float32]:
    """(N, H, W) uptake of N slices ordered along the normal, ``slice_spacing_mm`` apart,
    smoothed along axis 0; the input itself when there is nothing to smooth."""
    sigma = sigma_slices(sigma_mm, slice_spacing_mm)
    if sigma == 0.0 or len(uptake) < 2:
        return uptake
    smoothed: NDArray[np.float32] = gaussian_filter1d(
        np.asarray(uptake, dtype=np.float32), sigma, axis=0, mode="nearest")
    return smoothed


def smooth_runs(uptake: NDArray[np.float32], runs: Sequence[NDArray[np.int64]],
                sigma_mm: float, positions_mm: NDArray[np.floating]) -> NDArray[np.float32]:
    """Rows of ``uptake`` smoothed within each run (row indices in slice order), each run
    at its own slice spacing (the median distance between its ``positions_mm``); rows
    in no run, and runs of one slice, are left as they are."""
    if sigma_mm <= 0:
        return uptake
    positions = np.asarray(positions_mm, dtype=np.float64)
    out = np.array(uptake, dtype=np.float32, copy=True)
    for run in runs:
        if len(run) < 2:
            continue
        spacing = float(np.median(np.abs(np.diff(positions[run]))))
        out[run] = smooth_slices(out[run], sigma_mm, spacing)
    return out
