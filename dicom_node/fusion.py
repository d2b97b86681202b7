"""PET/T1C fusion rendering and its inverse ("de-fusion").

A fusion image is what a PET/MR console shows: the T1C in grey, windowed per
series, with the PET uptake drawn over it through a colormap at a fixed alpha.
Only uptake at or above the display threshold is drawn; below it the pixel is the
plain grey T1C.

    t      = clip((uptake - window_low) / (window_high - window_low), 0, 1)
    fusion = (1 - alpha) * grey + alpha * colormap(t)   where uptake >= display threshold
    fusion = grey                                        elsewhere

The colormap is matplotlib's ``hot`` (black-red-yellow-white), reproduced here as
its piecewise-linear control points so the service needs no plotting library. Its
RGB curve is monotone in each channel and never crosses itself, which makes the
colour -> value lookup in :func:`defuse` unique.

The grey T1C is the series windowed between its 0.5th and 99.5th intensity
percentiles (:func:`window_t1c`); training data, the node's own fusion of uptake
models and de-fusion all use this one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float32]

# matplotlib "hot": (position, value) control points per channel.
_HOT_POINTS: dict[str, tuple[tuple[float, float], ...]] = {
    "r": ((0.0, 0.0416), (0.365079, 1.0), (1.0, 1.0)),
    "g": ((0.0, 0.0), (0.365079, 0.0), (0.746032, 1.0), (1.0, 1.0)),
    "b": ((0.0, 0.0), (0.746032, 0.0), (1.0, 1.0)),
}

COLORMAPS = ("hot",)

T1C_WINDOW_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class FusionStyle:
    """How uptake is drawn over the T1C. Recorded in every model card."""

    colormap: str = "hot"
    alpha: float = 0.6
    window_low: float = 0.0
    window_high: float = 4.0
    display_threshold: float = 0.3

    def __post_init__(self) -> None:
        if self.colormap not in COLORMAPS:
            raise ValueError(f"colormap must be one of {COLORMAPS}, got {self.colormap!r}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if not self.window_high > self.window_low:
            raise ValueError("window_high must be greater than window_low")

    def as_dict(self) -> dict[str, float | str]:
        return {
            "colormap": self.colormap,
            "alpha": self.alpha,
            "window_low": self.window_low,
            "window_high": self.window_high,
            "display_threshold": self.display_threshold,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> FusionStyle:
        return cls(
            colormap=str(data.get("colormap", "hot")),
            alpha=float(data.get("alpha", 0.6)),  # type: ignore[arg-type]
            window_low=float(data.get("window_low", 0.0)),  # type: ignore[arg-type]
            window_high=float(data.get("window_high", 4.0)),  # type: ignore[arg-type]
            display_threshold=float(data.get("display_threshold", 0.3)),  # type: ignore[arg-type]
        )


def colormap_lut(name: str = "hot", size: int = 1024) -> FloatArray:
    """The colormap sampled at ``size`` evenly spaced points, shape (size, 3), in [0, 1]."""
    if name != "hot":
        raise ValueError(f"unknown colormap {name!r}")
    t = np.linspace(0.0, 1.0, size)
    channels = []
    for key in ("r", "g", "b"):
        xs, ys = zip(*_HOT_POINTS[key], strict=True)
        channels.append(np.interp(t, xs, ys))
    return np.stack(channels, axis=-1).astype(np.float32)


def window_t1c(volume: NDArray[np.floating] | NDArray[np.integer]) -> FloatArray:
    """Window a T1C series (any shape) to grey values in [0, 1] by its percentiles."""
    data = np.asarray(volume, dtype=np.float32)
    low, high = np.percentile(data, T1C_WINDOW_PERCENTILES)
    if high <= low:
        high = low + 1.0
    return np.clip((data - low) / (high - low), 0.0, 1.0).astype(np.float32)


def uptake_to_colour(uptake: NDArray[np.floating], style: FusionStyle) -> FloatArray:
    """Colormap colours (..., 3) of uptake values."""
    lut = colormap_lut(style.colormap)
    t = np.clip((uptake - style.window_low) / (style.window_high - style.window_low), 0.0, 1.0)
    index = np.rint(t * (len(lut) - 1)).astype(np.intp)
    return lut[index]


def fuse(grey: NDArray[np.floating], uptake: NDArray[np.floating], style: FusionStyle) -> FloatArray:
    """Render fusion RGB (..., 3) in [0, 1] from windowed grey T1C and uptake of one shape."""
    grey = np.asarray(grey, dtype=np.float32)
    uptake = np.asarray(uptake, dtype=np.float32)
    if grey.shape != uptake.shape:
        raise ValueError(f"grey {grey.shape} and uptake {uptake.shape} differ in shape")
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    shown = uptake >= style.display_threshold
    colour = uptake_to_colour(uptake, style)
    blended = (1.0 - style.alpha) * rgb + style.alpha * colour
    return np.where(shown[..., None], blended, rgb).astype(np.float32)


def to_uint8(rgb: NDArray[np.floating]) -> NDArray[np.uint8]:
    """[0, 1] float image -> uint8 with rounding."""
    return np.clip(np.rint(np.asarray(rgb) * 255.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Defused:
    """Uptake recovered from a fusion image.

    ``uptake`` is NaN-free: pixels judged unblended carry 0. ``shown`` marks pixels
    where PET colour was blended; ``confidence`` in [0, 1] falls with the distance
    between the recovered colour and the nearest point of the colormap curve.
    """

    uptake: FloatArray
    shown: NDArray[np.bool_]
    confidence: FloatArray


def defuse(
    fusion_rgb: NDArray[np.floating],
    grey: NDArray[np.floating],
    style: FusionStyle,
    blend_tolerance: float = 2.0 / 255.0,
) -> Defused:
    """Invert :func:`fuse`: recover uptake from fusion RGB (..., 3) and its grey T1C.

    For each pixel the colour that was blended is ``(F - (1 - alpha) * grey) / alpha``;
    its uptake is the window value of the nearest colormap point. A pixel whose
    fusion equals its grey (within ``blend_tolerance``) had no colour blended, unless
    the nearest colormap point explains it better than "not shown" does.
    """
    fusion = np.asarray(fusion_rgb, dtype=np.float32)
    grey = np.asarray(grey, dtype=np.float32)
    if fusion.shape != (*grey.shape, 3):
        raise ValueError(f"fusion {fusion.shape} does not match grey {grey.shape} + RGB")
    lut = colormap_lut(style.colormap)
    colour = (fusion - (1.0 - style.alpha) * grey[..., None]) / style.alpha
    flat = colour.reshape(-1, 3)
    index = np.empty(len(flat), dtype=np.intp)
    dist2 = np.empty(len(flat), dtype=np.float32)
    chunk = 65536
    for start in range(0, len(flat), chunk):
        part = flat[start : start + chunk]
        d = ((part[:, None, :] - lut[None, :, :]) ** 2).sum(axis=-1)
        index[start : start + chunk] = d.argmin(axis=1)
        dist2[start : start + chunk] = d.min(axis=1)
    t = index.astype(np.float32) / (len(lut) - 1)
    value = style.window_low + t * (style.window_high - style.window_low)
    value = value.reshape(grey.shape)
    # Residual of the "blended" explanation, in fusion units, versus "not shown".
    residual_blended = np.sqrt(dist2).reshape(grey.shape) * style.alpha
    residual_plain = np.abs(fusion - grey[..., None]).max(axis=-1)
    shown = (residual_plain > blend_tolerance) & (residual_blended < residual_plain)
    value = np.maximum(value, style.display_threshold)
    uptake = np.where(shown, value, 0.0).astype(np.float32)
    confidence = np.clip(1.0 - residual_blended / 0.1, 0.0, 1.0).astype(np.float32)
    confidence = np.where(shown, confidence, 1.0).astype(np.float32)
    return Defused(uptake=uptake, shown=shown, confidence=confidence)
