"""A differentiable fusion renderer, for a training loss measured on the fusion image.

:func:`dicom_node.inference.fusion.fuse` draws the uptake colour only where uptake reaches the
display threshold: a hard step, whose gradient is zero everywhere. Here that step is a
logistic gate of width ``gate_width_uptake`` (uptake units), so that a generator of
uptake can learn from the error of the fusion it renders: above all at the edge of the
drawn overlay (the outline of the brain, of tumours and of the striatum), where a small
error in uptake switches a pixel between grey and colour. With the width going to 0 the
gate becomes the hard step and :func:`soft_fuse` equals :func:`~dicom_node.inference.fusion.fuse`.
"""

from __future__ import annotations

import torch

from dicom_node.inference.fusion import colormap_knots
from dicom_node.inference.fusion_style import FusionStyle


def colour(t: torch.Tensor, name: str = "hot") -> torch.Tensor:
    """(B, 1, H, W) window positions -> (B, 3, H, W) colours: the node's colormap
    (:func:`dicom_node.inference.fusion.colormap`), interpolated between the same knots."""
    knots_t, knots_rgb = (torch.as_tensor(a, dtype=t.dtype, device=t.device)
                          for a in colormap_knots(name))
    t = t.clamp(0.0, 1.0)
    out = knots_rgb[0].view(1, 3, 1, 1).expand(t.shape[0], 3, *t.shape[2:])
    for i in range(len(knots_t) - 1):
        slope = (knots_rgb[i + 1] - knots_rgb[i]) / (knots_t[i + 1] - knots_t[i])
        out = out + slope.view(1, 3, 1, 1) * (t.clamp(knots_t[i], knots_t[i + 1]) - knots_t[i])
    return out


def soft_fuse(uptake: torch.Tensor, grey: torch.Tensor, style: FusionStyle,
              gate_width_uptake: float) -> torch.Tensor:
    """Fusion RGB (B, 3, H, W) in [0, 1] of uptake and grey T1C, both (B, 1, H, W).

    ``gate_width_uptake`` > 0 is the logistic gate's scale in uptake units; 0 gives the
    hard threshold of the node's renderer.
    """
    if gate_width_uptake < 0:
        raise ValueError("gate_width_uptake must be >= 0")
    t = (uptake - style.window_low) / (style.window_high - style.window_low)
    if gate_width_uptake == 0:
        gate = (uptake >= style.display_threshold).to(uptake.dtype)
    else:
        gate = torch.sigmoid((uptake - style.display_threshold) / gate_width_uptake)
    grey3 = grey.expand(-1, 3, -1, -1)
    return grey3 + gate * style.alpha * (colour(t, style.colormap) - grey3)
