"""Image and TBR metrics, as the published study reports them plus PET-specific ones.

All image metrics take images scaled to [0, 1] (data range 1.0):

- ``mse``: mean squared error over all pixels (and channels).
- ``psnr``: ``10 * log10(1 / mse)``. Identical images have an infinite PSNR; it is
  capped at :data:`PSNR_CAP_DB` (100 dB, i.e. MSE 1e-10) so that means stay finite.
- ``ssim``: :func:`skimage.metrics.structural_similarity` with ``data_range=1.0``
  (``channel_axis=-1`` for RGB), default 7x7 uniform window.
- ``fsim``: piq 0.8.0 ``piq.fsim`` (``chromatic=True`` on RGB, ``False`` on grey),
  ``data_range=1.0``.
- Masked PSNR / SSIM: MSE over the mask's pixels; the SSIM map (same settings)
  averaged over the mask's pixels.

TBR: ``TBRmax = max(uptake[tumour]) / mean(uptake[background])`` and
``TBRmean = mean(uptake[tumour]) / mean(uptake[background])``; Pearson r with a 95 %
confidence interval from Fisher's z transform and the two-sided p-value of
:func:`scipy.stats.pearsonr`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy import stats
from skimage.metrics import structural_similarity

PSNR_CAP_DB = 100.0
FSIM_NAME = "piq 0.8.0 piq.fsim, chromatic"

Array = ArrayLike


def mse(a: Array, b: Array) -> float:
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(np.mean(diff * diff))


def psnr_from_mse(value: float, data_range: float = 1.0) -> float:
    """PSNR in dB, capped at :data:`PSNR_CAP_DB` (identical images)."""
    if not math.isfinite(value):
        return float("nan")
    if value <= data_range**2 * 10 ** (-PSNR_CAP_DB / 10):
        return PSNR_CAP_DB
    return float(10.0 * math.log10(data_range**2 / value))


def psnr(a: Array, b: Array, data_range: float = 1.0) -> float:
    return psnr_from_mse(mse(a, b), data_range)


def ssim(a: Array, b: Array, data_range: float = 1.0) -> float:
    """skimage SSIM; images (H, W) or (H, W, 3) (then ``channel_axis=-1``)."""
    fa = np.asarray(a, dtype=np.float64)
    fb = np.asarray(b, dtype=np.float64)
    channel_axis = -1 if fa.ndim == 3 else None
    return float(structural_similarity(fa, fb, data_range=data_range,
                                       channel_axis=channel_axis))


def ssim_map(a: Array, b: Array, data_range: float = 1.0) -> NDArray[np.float64]:
    """The per-pixel SSIM map of two grey images (skimage, ``full=True``)."""
    _, full = structural_similarity(np.asarray(a, dtype=np.float64),
                                    np.asarray(b, dtype=np.float64),
                                    data_range=data_range, full=True)
    return np.asarray(full, dtype=np.float64)


def masked_psnr(a: Array, b: Array, mask: NDArray[np.bool_], data_range: float = 1.0) -> float:
    """PSNR over the pixels in ``mask`` (NaN for an empty mask)."""
    if not mask.any():
        return float("nan")
    diff = np.asarray(a, dtype=np.float64)[mask] - np.asarray(b, dtype=np.float64)[mask]
    return psnr_from_mse(float(np.mean(diff * diff)), data_range)


def masked_ssim(a: Array, b: Array, mask: NDArray[np.bool_], data_range: float = 1.0) -> float:
    """Mean of the SSIM map over the pixels in ``mask`` (NaN for an empty mask)."""
    if not mask.any():
        return float("nan")
    return float(ssim_map(a, b, data_range)[mask].mean())


def fsim(a: Array, b: Array, chromatic: bool = True) -> NDArray[np.float64]:
    """piq FSIM per image of (N, H, W, 3) RGB (or (N, H, W) grey) batches in [0, 1]."""
    import piq  # training extra; imported here so the rest works without it

    ta = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    tb = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))
    if ta.ndim == 3:
        ta, tb = ta.unsqueeze(1), tb.unsqueeze(1)
        chromatic = False
    else:
        ta, tb = ta.permute(0, 3, 1, 2), tb.permute(0, 3, 1, 2)
    with torch.inference_mode():
        values = piq.fsim(ta.clamp(0, 1), tb.clamp(0, 1), data_range=1.0, reduction="none",
                          chromatic=chromatic)
    return np.asarray(values.double().numpy(), dtype=np.float64).reshape(-1)


def tbr(uptake: Array, tumour: NDArray[np.bool_], background: NDArray[np.bool_]
        ) -> tuple[float, float]:
    """(TBRmax, TBRmean) of ``uptake`` for a tumour and a background region (NaN if undefined)."""
    if not tumour.any() or not background.any():
        return float("nan"), float("nan")
    values = np.asarray(uptake, dtype=np.float64)
    bg = float(values[background].mean())
    if bg <= 0.0:
        return float("nan"), float("nan")
    lesion = values[tumour]
    return float(lesion.max() / bg), float(lesion.mean() / bg)


@dataclass(frozen=True)
class Correlation:
    n: int
    r: float
    ci_low: float
    ci_high: float
    p: float

    def as_dict(self) -> dict[str, float | int]:
        return {"n": self.n, "r": self.r, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "p": self.p}

    def text(self) -> str:
        if not math.isfinite(self.r):
            return f"n/a (n={self.n})"
        return (f"{self.r:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}], p={self.p:.2g}, "
                f"n={self.n}")


def pearson(x: Array, y: Array, confidence: float = 0.95) -> Correlation:
    """Pearson r, its Fisher-z confidence interval and p-value over finite pairs."""
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    n = len(xa)
    nan = float("nan")
    if n < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return Correlation(n, nan, nan, nan, nan)
    result = stats.pearsonr(xa, ya)
    r, p = float(result.statistic), float(result.pvalue)
    if n < 4 or abs(r) >= 1.0:
        return Correlation(n, r, r if abs(r) >= 1.0 else nan, r if abs(r) >= 1.0 else nan, p)
    z = math.atanh(r)
    half = float(stats.norm.ppf(0.5 + confidence / 2.0)) / math.sqrt(n - 3)
    return Correlation(n, r, math.tanh(z - half), math.tanh(z + half), p)


@dataclass(frozen=True)
class BlandAltman:
    n: int
    bias: float
    sd: float

    @property
    def limits(self) -> tuple[float, float]:
        return self.bias - 1.96 * self.sd, self.bias + 1.96 * self.sd


def bland_altman(reference: Array, test: Array) -> BlandAltman:
    """Mean difference (test - reference) and its SD over finite pairs."""
    ra = np.asarray(reference, dtype=np.float64)
    ta = np.asarray(test, dtype=np.float64)
    keep = np.isfinite(ra) & np.isfinite(ta)
    diff = ta[keep] - ra[keep]
    if len(diff) == 0:
        return BlandAltman(0, float("nan"), float("nan"))
    sd = float(diff.std(ddof=1)) if len(diff) > 1 else float("nan")
    return BlandAltman(len(diff), float(diff.mean()), sd)


def mean_sd(values: Array) -> tuple[float, float, int]:
    """Mean and SD (ddof=1) over finite values, and their count."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)
