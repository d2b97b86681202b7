"""A differentiable fusion renderer, for a training loss measured on the fusion image.

:func:`dicom_node.fusion.fuse` draws the uptake colour only where uptake reaches the
display threshold: a hard step, whose gradient is zero everywhere. Here that step is a
logistic gate of width ``gate_width_uptake`` (uptake units), so that a generator of
uptake can learn from the error of the fusion it renders: above all at the edge of the
drawn overlay (the outline of the brain, of tumours and of the striatum), where a small
error in uptake switches a pixel between grey and colour. With the width going to 0 the
gate becomes the hard step and :func:`soft_fuse` equals :func:`~dicom_node.fusion.fuse`.
"""

from __future__ import annotations

import torch

from dicom_node.fusion import FusionStyle

# matplotlib "hot" as per-channel ramps: channel = clamp(offset + slope * t, 0, 1)
# (the same control points as dicom_node.fusion._HOT_POINTS).
_HOT_RAMPS: dict[str, tuple[float, float]] = {
    "r": (0.0416, (1.0 - 0.0416) / 0.365079),
    "g": (-0.365079 / (0.746032 - 0.365079), 1.0 / (0.746032 - 0.365079)),
    "b": (-0.746032 / (1.0 - 0.746032), 1.0 / (1.0 - 0.746032)),
}


def hot_colour(t: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) window positions -> (B, 3, H, W) colours of matplotlib's ``hot``."""
    t = t.clamp(0.0, 1.0)
    return torch.cat([(offset + slope * t).clamp(0.0, 1.0)
                      for offset, slope in _HOT_RAMPS.values()], dim=1)


def soft_fuse(uptake: torch.Tensor, grey: torch.Tensor, style: FusionStyle,
              gate_width_uptake: float) -> torch.Tensor:
    """Fusion RGB (B, 3, H, W) in [0, 1] of uptake and grey T1C, both (B, 1, H, W).

    ``gate_width_uptake`` > 0 is the logistic gate's scale in uptake units; 0 gives the
    hard threshold of the node's renderer.
    """
    if style.colormap != "hot":
        raise ValueError(f"soft_fuse knows the 'hot' colormap only, not {style.colormap!r}")
    if gate_width_uptake < 0:
        raise ValueError("gate_width_uptake must be >= 0")
    t = (uptake - style.window_low) / (style.window_high - style.window_low)
    if gate_width_uptake == 0:
        gate = (uptake >= style.display_threshold).to(uptake.dtype)
    else:
        gate = torch.sigmoid((uptake - style.display_threshold) / gate_width_uptake)
    grey3 = grey.expand(-1, 3, -1, -1)
    return grey3 + gate * style.alpha * (hot_colour(t) - grey3)
