"""Hard negatives: where the generator draws a hot focus that the PET does not have.

A false focus is what a radiologist meets as an invented tumour: the node finds a region at
or above its threshold (1.6 x background) on the synthetic uptake where the real uptake is
background. Such foci are rare and small (0.2-0.4 mL at TBRmax 1.8-1.9 for fdopa-demo
3.3), so the plain L1 barely sees them. Mined online, on each training batch: brain pixels
outside the grown tumour and striatum masks where the generator's own output is at or above ``ratio``
x its slice background while the real uptake, averaged over ``smooth_px`` x ``smooth_px``
pixels (the PET is noisy; the generator's output is not), stays below ``ratio`` x the
real slice background. (The striatum's ratio differs per patient and the node excludes
it: a generator drawing it wider than one patient's PET draws no false focus.) Each
background is the median uptake over the slice's brain outside that zone, the
generator's against its own, as the node measures each uptake against its own
background. Those pixels' L1 weight is raised to ``weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Slices with fewer brain pixels outside the tumour zone have no usable background
#: (the top and bottom of the brain): no hard negatives are mined there.
MIN_BACKGROUND_PIXELS = 200


@dataclass(frozen=True)
class HardNegatives:
    """``weight`` 1 switches the mining off."""

    weight: float = 1.0
    ratio: float = 1.6
    smooth_px: int = 5

    def __post_init__(self) -> None:
        if self.weight < 1.0 or self.ratio <= 1.0 or self.smooth_px < 1 or self.smooth_px % 2 == 0:
            raise ValueError("hard negatives need weight >= 1, ratio above 1 and an odd "
                             "smoothing width of at least 1 pixel")

    @property
    def active(self) -> bool:
        return self.weight > 1.0


def slice_background(uptake: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, 1) median of ``uptake`` over ``region`` per slice; NaN where the region
    has fewer than MIN_BACKGROUND_PIXELS pixels."""
    flat = uptake.masked_fill(~region, float("nan")).flatten(1)
    median = torch.nanmedian(flat, dim=1).values
    enough = region.flatten(1).sum(dim=1) >= MIN_BACKGROUND_PIXELS
    median = torch.where(enough, median, torch.full_like(median, float("nan")))
    return median.view(-1, 1, 1, 1)


def hard_negative_mask(fake_uptake: torch.Tensor, real_uptake: torch.Tensor,
                       brain: torch.Tensor, excluded: torch.Tensor, ratio: float,
                       smooth_px: int) -> torch.Tensor:
    """(B, 1, H, W) bool: brain pixels outside ``excluded`` where the generator's uptake
    is at or above ``ratio`` x its background and the smoothed real uptake is below
    ``ratio`` x the real background. All inputs (B, 1, H, W) in uptake units / bool."""
    region = brain & ~excluded
    real_smooth = F.avg_pool2d(real_uptake, smooth_px, stride=1, padding=smooth_px // 2,
                               count_include_pad=False)
    fake_background = slice_background(fake_uptake, region)
    real_background = slice_background(real_uptake, region)
    hot = fake_uptake >= ratio * fake_background   # False where the background is NaN
    cold = real_smooth < ratio * real_background
    return region & hot & cold


def excluded_zone(labels: torch.Tensor, margin_px: int) -> torch.Tensor:
    """(B, 1, H, W) bool: where no hard negative is mined, the regions ``labels``
    (B, 1, H, W, > 0 inside: the tumours, and in training the striatum too) grown by
    ``margin_px`` pixels."""
    zone = (labels > 0).float()
    if margin_px > 0:
        zone = F.max_pool2d(zone, kernel_size=2 * margin_px + 1, stride=1, padding=margin_px)
    return zone > 0.5


def weights(mask: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel L1 weights: ``weight`` on the hard negatives, 1 elsewhere."""
    return torch.where(mask, torch.full(mask.shape, float(weight), device=mask.device),
                       torch.ones(mask.shape, device=mask.device))
