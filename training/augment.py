"""Geometric augmentation of training batches: one random in-plane affine per slice.

The same rotation, scaling and shift move the T1C input, the uptake target and the
per-pixel loss weights, so every pair stays a true pair; what lies outside the slice
comes in as background (black T1C, zero uptake). It makes a lesion's exact shape and
place worthless to memorise, which is what an uptake model otherwise learns from a few
hundred training lesions. Draws depend only on the generator passed in, so a resumed
run repeats them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AffineAugment:
    """Uniform draws in +- ``rotation_deg``, +- ``scale`` (relative) and +- ``shift_px``."""

    rotation_deg: float = 0.0
    scale: float = 0.0
    shift_px: float = 0.0

    def __post_init__(self) -> None:
        if self.rotation_deg < 0 or not 0 <= self.scale < 0.5 or self.shift_px < 0:
            raise ValueError("augmentation ranges must be >= 0 (scale below 0.5)")

    @property
    def active(self) -> bool:
        return self.rotation_deg > 0 or self.scale > 0 or self.shift_px > 0

    def matrices(self, batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
        """(B, 2, 3) affine matrices in grid_sample's normalised coordinates."""
        u = torch.rand(batch, 4, generator=generator) * 2.0 - 1.0
        angle = u[:, 0] * math.radians(self.rotation_deg)
        zoom = 1.0 + u[:, 1] * self.scale
        shift = u[:, 2:] * (2.0 * self.shift_px / size)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.zeros(batch, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos, -sin, shift[:, 0]
        theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin, cos, shift[:, 1]
        return theta


def warp(tensor: torch.Tensor, theta: torch.Tensor, background: float) -> torch.Tensor:
    """(B, C, H, W) resampled bilinearly through ``theta``; outside = ``background``."""
    grid = F.affine_grid(theta.to(tensor.dtype), list(tensor.shape), align_corners=False)
    moved = F.grid_sample(tensor - background, grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    return moved + background
