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

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from dicom_node.inference.fusion_style import FusionStyle

FloatArray = NDArray[np.float32]

# matplotlib "hot": (position, value) control points per channel.
_HOT_POINTS: dict[str, tuple[tuple[float, float], ...]] = {
    "r": ((0.0, 0.0416), (0.365079, 1.0), (1.0, 1.0)),
    "g": ((0.0, 0.0), (0.365079, 0.0), (0.746032, 1.0), (1.0, 1.0)),
    "b": ((0.0, 0.0), (0.746032, 0.0), (1.0, 1.0)),
}

T1C_WINDOW_PERCENTILES = (0.5, 99.5)
# The grey a newly built training set stores and its model reads: the window above,
# clipped at 2 instead of 1 so that enhancement survives (see window_t1c). Models and
# datasets made before it have ceiling 1 (their cards and dataset.json say which).
NETWORK_T1C_CEILING = 2.0


def colormap_knots(name: str) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Positions t and RGB colours where the piecewise-linear colormap bends."""
    if name != "hot":
        raise ValueError(f"unknown colormap {name!r}")
    ts = sorted({x for points in _HOT_POINTS.values() for x, _ in points})
    colours = []
    for key in ("r", "g", "b"):
        xs, ys = zip(*_HOT_POINTS[key], strict=True)
        colours.append(np.interp(ts, xs, ys))
    return np.asarray(ts), np.stack(colours, axis=-1)


def colormap(t: NDArray[np.floating], name: str = "hot") -> FloatArray:
    """Colours (..., 3) in [0, 1] of positions t in [0, 1] (exact, no lookup table)."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
    channels = []
    for key in ("r", "g", "b"):
        xs, ys = zip(*_HOT_POINTS[key], strict=True)
        channels.append(np.interp(t, xs, ys))
    if name != "hot":
        raise ValueError(f"unknown colormap {name!r}")
    return np.stack(channels, axis=-1).astype(np.float32)


def window_t1c(volume: NDArray[np.floating] | NDArray[np.integer],
               ceiling: float = 1.0) -> FloatArray:
    """Window a T1C series (any shape) to grey values by its percentiles: the 0.5th maps
    to 0, the 99.5th to 1, and values are clipped to [0, ``ceiling``].

    The display grey has ceiling 1. A network input keeps headroom above it
    (:data:`NETWORK_T1C_CEILING`): the 99.5th percentile of a brain series lies in the
    brightest white matter, so at ceiling 1 enhancing tissue (brighter than any white
    matter) reads exactly as bright white matter and a small enhancing lesion vanishes."""
    check_ceiling(ceiling)
    data = np.asarray(volume, dtype=np.float32)
    low, high = np.percentile(data, T1C_WINDOW_PERCENTILES)
    if high <= low:
        high = low + 1.0
    scaled: NDArray[np.float32] = np.clip((data - low) / (high - low), 0.0, ceiling).astype(
        np.float32)
    return scaled


def check_ceiling(ceiling: float) -> float:
    """``ceiling`` if it is a usable grey ceiling (finite, >= 1), else ValueError."""
    if not (math.isfinite(ceiling) and ceiling >= 1.0):
        raise ValueError(f"the T1C grey's ceiling must be a finite value >= 1, got {ceiling}")
    return ceiling


def display_grey(network_grey: NDArray[np.floating]) -> FloatArray:
    """The display grey (ceiling 1) of a grey windowed with headroom."""
    return np.minimum(np.asarray(network_grey, dtype=np.float32), np.float32(1.0))


def uptake_to_colour(uptake: NDArray[np.floating], style: FusionStyle) -> FloatArray:
    """Colormap colours (..., 3) of uptake values."""
    t = (np.asarray(uptake, dtype=np.float64) - style.window_low) / (
        style.window_high - style.window_low)
    return colormap(t, style.colormap)


def fuse(grey: NDArray[np.floating], uptake: NDArray[np.floating], style: FusionStyle) -> FloatArray:
    """Render fusion RGB (..., 3) in [0, 1] from windowed grey T1C and uptake of one shape."""
    grey = np.asarray(grey, dtype=np.float32)
    uptake = np.asarray(uptake, dtype=np.float32)
    if grey.shape != uptake.shape:
        raise ValueError(f"grey {grey.shape} and uptake {uptake.shape} differ in shape")
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    shown = uptake >= style.display_threshold
    # Colour only the pixels that show uptake (a minority of a brain volume).
    colour = uptake_to_colour(uptake[shown], style)
    rgb[shown] = ((1.0 - style.alpha) * rgb[shown] + style.alpha * colour).astype(np.float32)
    return rgb


def to_uint8(rgb: NDArray[np.floating]) -> NDArray[np.uint8]:
    """[0, 1] float image -> uint8 with rounding."""
    return np.clip(np.rint(np.asarray(rgb) * 255.0), 0, 255).astype(np.uint8)


def fuse_uint8(grey: NDArray[np.floating], uptake: NDArray[np.floating],
               style: FusionStyle) -> NDArray[np.uint8]:
    """``to_uint8(fuse(grey, uptake, style))``, bit for bit, in about a third of the time:
    the grey is rounded once per pixel instead of once per channel, and only the pixels
    that show uptake go through the float blend."""
    grey = np.asarray(grey, dtype=np.float32)
    uptake = np.asarray(uptake, dtype=np.float32)
    if grey.shape != uptake.shape:
        raise ValueError(f"grey {grey.shape} and uptake {uptake.shape} differ in shape")
    rgb = np.repeat(to_uint8(grey)[..., None], 3, axis=-1)
    shown = uptake >= style.display_threshold
    colour = uptake_to_colour(uptake[shown], style)
    blended = ((1.0 - style.alpha) * grey[shown][:, None] + style.alpha * colour)
    rgb[shown] = to_uint8(blended.astype(np.float32))
    return rgb


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
    its uptake is the window value of the nearest point on the colormap curve (an
    exact projection onto each linear piece of the curve). A pixel whose
    fusion equals its grey (within ``blend_tolerance``) had no colour blended, unless
    the nearest colormap point explains it better than "not shown" does.
    """
    fusion = np.asarray(fusion_rgb, dtype=np.float32)
    grey = np.asarray(grey, dtype=np.float32)
    if fusion.shape != (*grey.shape, 3):
        raise ValueError(f"fusion {fusion.shape} does not match grey {grey.shape} + RGB")
    residual_plain = np.abs(fusion - grey[..., None]).max(axis=-1)
    # Only pixels that differ from their grey can carry colour: project just those.
    candidate = residual_plain > blend_tolerance
    colour = (fusion[candidate] - (1.0 - style.alpha) * grey[candidate][:, None]) / style.alpha
    t, dist = nearest_on_colormap(colour, style.colormap)
    # Residual of the "blended" explanation, in fusion units, versus "not shown".
    residual_blended = dist * style.alpha
    chosen = residual_blended < residual_plain[candidate]
    shown = np.zeros(grey.shape, dtype=bool)
    shown[candidate] = chosen
    value = np.maximum(style.window_low + t * (style.window_high - style.window_low),
                       style.display_threshold)
    uptake = np.zeros(grey.shape, dtype=np.float32)
    uptake[candidate] = np.where(chosen, value, 0.0)
    confidence = np.ones(grey.shape, dtype=np.float32)
    confidence[candidate] = np.where(
        chosen, np.clip(1.0 - residual_blended / 0.1, 0.0, 1.0), 1.0)
    return Defused(uptake=uptake, shown=shown, confidence=confidence)


def nearest_on_colormap(colour: NDArray[np.floating],
                        name: str = "hot") -> tuple[FloatArray, FloatArray]:
    """Position t in [0, 1] of the nearest colormap point to each colour, and the distance."""
    knots_t, knots_rgb = colormap_knots(name)
    c = np.asarray(colour, dtype=np.float32)
    best_t = np.zeros(c.shape[:-1], dtype=np.float32)
    best_d = np.full(c.shape[:-1], np.inf, dtype=np.float32)
    for i in range(len(knots_t) - 1):
        a = knots_rgb[i].astype(np.float32)
        seg = (knots_rgb[i + 1] - knots_rgb[i]).astype(np.float32)
        length2 = float(seg @ seg)
        s = np.clip(((c - a) @ seg) / length2, 0.0, 1.0) if length2 > 0 else np.zeros_like(best_t)
        d = np.linalg.norm(a + s[..., None] * seg - c, axis=-1)
        better = d < best_d
        best_d = np.where(better, d, best_d)
        span = knots_t[i + 1] - knots_t[i]
        best_t = np.where(better, knots_t[i] + s * span, best_t).astype(np.float32)
    return best_t, best_d.astype(np.float32)
