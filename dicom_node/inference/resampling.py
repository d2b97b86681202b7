"""Slices to and from the network's square input, keeping the aspect ratio.

A (N, H, W) stack is zero-padded symmetrically to a square of side max(H, W) and
resized to the network size; the network's output is resized back to that square
and the padding cropped away, so every output pixel lies over its source pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray


@dataclass(frozen=True)
class Padding:
    """Where the native (height, width) image sits inside its padded square."""

    height: int
    width: int
    top: int
    left: int

    @property
    def side(self) -> int:
        return max(self.height, self.width)


def padding_for(height: int, width: int) -> Padding:
    side = max(height, width)
    return Padding(height=height, width=width, top=(side - height) // 2, left=(side - width) // 2)


def to_network(slices: NDArray[np.floating] | torch.Tensor, size: int) -> tuple[torch.Tensor, Padding]:
    """(N, H, W) -> (N, 1, size, size) float32 tensor, bilinear, aspect kept."""
    data = torch.as_tensor(np.asarray(slices, dtype=np.float32)
                           if not isinstance(slices, torch.Tensor) else slices).float()
    if data.ndim != 3:
        raise ValueError(f"expected (N, H, W) slices, got shape {tuple(data.shape)}")
    n, height, width = data.shape
    pad = padding_for(height, width)
    square = torch.zeros((n, 1, pad.side, pad.side), dtype=torch.float32)
    square[:, 0, pad.top : pad.top + height, pad.left : pad.left + width] = data
    if pad.side == size:
        return square, pad
    resized = F.interpolate(square, size=(size, size), mode="bilinear", align_corners=False,
                            antialias=pad.side > size)
    return resized, pad


def from_network(output: torch.Tensor, pad: Padding) -> torch.Tensor:
    """(N, C, size, size) -> (N, C, H, W): resize to the padded square and crop."""
    if output.shape[-1] != pad.side:
        output = F.interpolate(output.float(), size=(pad.side, pad.side), mode="bilinear",
                               align_corners=False, antialias=output.shape[-1] > pad.side)
    return output[..., pad.top : pad.top + pad.height, pad.left : pad.left + pad.width]
