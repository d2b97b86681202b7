"""The model card's contrast calibration of the synthetic uptake.

A generator trained with an L1 loss predicts the middle of what the T1C allows: where the
T1C cannot tell a very avid tumour from a mildly avid one, it draws something between,
and the synthetic tumour is less hot than the real one on average (on the validation
phantoms, TBRmax 0.55 lower; docs/model-card.md). A model card's
``uptake_contrast_gain`` g undoes that on average: every voxel above the volume's median
drawn uptake m (the brain's typical uptake, the voxels at or above the fusion's display
threshold) is moved to ``m + g * (u - m)``; voxels at or below m are left as they are.
A lesion's TBR against a normal-brain background near m becomes about ``1 + g * (TBR -
1)``, so the gain is a calibration of the ratios the node reports, chosen on validation
patients only, never on the sealed test cohort. It raises every hot spot alike,
tumour or not, so the false foci per patient were measured with it (docs/model-card.md).

g = 1 leaves the uptake as the generator made it.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def stretch_above_median(uptake: NDArray[np.float32], gain: float,
                         display_threshold: float) -> NDArray[np.float32]:
    """``uptake`` (any shape: one volume, or one run of contiguous slices) with its
    excess over the median drawn uptake multiplied by ``gain``; the input itself when
    the gain is 1 or nothing is drawn."""
    if gain == 1.0:
        return uptake
    drawn = uptake >= display_threshold
    if not drawn.any():
        return uptake
    median = np.float32(np.median(uptake[drawn]))
    excess = uptake - median
    stretched: NDArray[np.float32] = np.where(
        excess > 0, median + np.float32(gain) * excess, uptake).astype(np.float32)
    return stretched
