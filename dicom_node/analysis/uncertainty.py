"""How sure the synthetic TBR is: an interval per lesion, and "equivocal" findings.

Two sources of doubt, added in quadrature:

1. **The model's own spread.** The generator is run ``samples`` more times with its
   dropout layers active (Monte Carlo dropout, the innermost U-Net blocks) and every
   second pass on the left-right mirrored input (test-time flip); each pass is
   smoothed along the slice normal like the node's output, and each lesion's TBRmax /
   TBRmean is measured in the lesion and background regions the node found. The
   sample standard deviation is ``sd_model``.
2. **What the T1C cannot show.** Uptake that no T1C feature predicts (on the phantoms,
   61 % of the tumour-uptake variance) is invisible to any sampling of the model. The
   model card's ``tbr_interval`` holds the residual standard deviation and mean of the
   synthetic against the real TBR, measured per lesion on the validation patients
   (``dicom-node-train benchmark``); without it the interval holds the sampling
   spread only, and says so.

Three ways to turn these into an interval; the model card's ``tbr_interval`` says which
(``dicom-node-train export --interval-form``):

- **Gaussian** (fdopa-demo 3.2-3.5's form): ``TBR +- z * sqrt(sd_model^2 + sd_residual^2 +
  mean_residual^2)`` with ``z`` for the card's two-sided level, and the residual's SD and
  mean measured per lesion on validation patients. The residual enters as its root mean
  square, so a validation bias the model still has widens the interval instead of moving
  it off the real value unseen. 3.3 took them from one validation cohort (31 lesions) and
  covered 66 % instead of 90 % on its sealed cohort; 3.3.1 pools three (docs/model-card.md).
- **Shifted Gaussian** (cards with ``"form": "shifted"``; fdopa-demo 3.6's, chosen by
  leaving one validation cohort out): ``TBR - mean_residual +- z * sqrt(sd_model^2 +
  sd_residual^2)``, centred on the value corrected by the validation bias (synthetic -
  real) instead of widened by it. The reported TBR stays the measured one.
- **Split-conformal** (cards with a ``conformal`` entry): on validation lesions found on
  real and synthetic uptake, the score ``(real - synthetic) / sqrt(sd_model^2 + s^2)`` is
  ranked, and its lower and upper order statistics at the card's level
  (``floor((n + 1) * a/2)``-th and ``ceil((n + 1) * (1 - a/2))``-th of n, a = 1 - level)
  give the interval ``TBR + [low, high] * sqrt(sd_model^2 + s^2)``, ``s`` being the median
  absolute residual. Distribution-free and not centred: a bias the model still has moves
  the interval towards the real values. On fdopa-demo 3.3's three validation cohorts it
  covered less than the Gaussian form when calibrated on two and tested on the third
  (0.86 against 0.90; docs/model-card.md), so it is not the shipped form.

A lesion whose TBRmax interval reaches below the TBR threshold is *equivocal*: the
synthetic uptake cannot tell it from normal tissue.

The passes run at the network's matrix (the node's point estimate stays the native
one), seeded, so one series always gets the same interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from dicom_node.analysis.tbr import TbrResult
from dicom_node.inference.resampling import to_network

DEFAULT_LEVEL = 0.9
METHOD_SAMPLING = "Monte Carlo dropout with test-time left-right flips"


@dataclass(frozen=True)
class ConformalScores:
    """Split-conformal calibration of one ratio (module docstring): the interval is
    ``TBR + [low, high] * sqrt(sd_model^2 + scale^2)``, from ``n`` validation lesions."""

    low: float
    high: float
    scale: float
    n: int

    def limits(self, value: float, sd_model: float) -> tuple[float, float]:
        width = float(np.hypot(sd_model, self.scale))
        return value + self.low * width, value + self.high * width

    def as_dict(self) -> dict[str, float | int]:
        return {"low": self.low, "high": self.high, "scale": self.scale, "n": self.n}

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> ConformalScores:
        return cls(low=float(document["low"]), high=float(document["high"]),
                   scale=float(document["scale"]), n=int(document["n"]))


def conformal_scores(residuals: ArrayLike, sd_model: ArrayLike,
                     level: float = DEFAULT_LEVEL) -> ConformalScores:
    """Calibrate one ratio from validation lesions: ``residuals`` real - synthetic and the
    model's sampling SD ``sd_model`` of each. Refuses too few lesions for ``level``
    (the order statistics would fall outside the sample: 19 at 90 %)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level {level} must lie between 0 and 1")
    r = np.asarray(residuals, dtype=np.float64)
    sd = np.asarray(sd_model, dtype=np.float64)
    if r.shape != sd.shape or r.ndim != 1:
        raise ValueError("one residual and one sampling SD per lesion")
    if not (np.isfinite(r).all() and np.isfinite(sd).all()):
        raise ValueError("a residual or sampling SD is not finite (were the validation "
                         "lesions measured with uncertainty passes?)")
    n = len(r)
    alpha = 1.0 - level
    eps = 1e-9  # 1 - 0.9 is not 0.1 in binary: keep (n + 1) * 0.05 = 1 an integer
    k_low = math.floor((n + 1) * alpha / 2 + eps)
    k_high = math.ceil((n + 1) * (1 - alpha / 2) - eps)
    if k_low < 1 or k_high > n:
        raise ValueError(f"{n} validation lesions cannot calibrate a {level:.0%} interval "
                         f"(needs at least {math.ceil(2 / alpha - 1 - eps)})")
    scale = float(np.median(np.abs(r)))
    if scale <= 0:
        raise ValueError("the residuals are all zero: nothing to calibrate")
    scores = np.sort(r / np.hypot(sd, scale))
    return ConformalScores(low=float(scores[k_low - 1]), high=float(scores[k_high - 1]),
                           scale=scale, n=n)


@dataclass(frozen=True)
class Calibration:
    """The model card's ``tbr_interval``: conformal scores per ratio, or the residual SDs
    and means per lesion (centred on the value, or on the value corrected by the mean when
    ``"form": "shifted"``), and the level."""

    residual_sd_tbr_max: float = 0.0
    residual_sd_tbr_mean: float = 0.0
    residual_bias_tbr_max: float = 0.0
    residual_bias_tbr_mean: float = 0.0
    level: float = DEFAULT_LEVEL
    source: str = ""
    conformal_tbr_max: ConformalScores | None = None
    conformal_tbr_mean: ConformalScores | None = None
    shifted: bool = False  # centred on the value - bias, half-width from the SD alone

    @classmethod
    def from_card(cls, document: dict[str, Any]) -> Calibration:
        if not document:
            return cls()
        conformal = document.get("conformal") or {}
        return cls(residual_sd_tbr_max=float(document.get("residual_sd_tbr_max", 0.0)),
                   residual_sd_tbr_mean=float(document.get("residual_sd_tbr_mean", 0.0)),
                   residual_bias_tbr_max=float(document.get("residual_bias_tbr_max", 0.0)),
                   residual_bias_tbr_mean=float(document.get("residual_bias_tbr_mean", 0.0)),
                   level=float(document.get("level", DEFAULT_LEVEL)),
                   source=str(document.get("source", "")),
                   shifted=document.get("form") == "shifted",
                   conformal_tbr_max=(ConformalScores.from_dict(conformal["tbr_max"])
                                      if "tbr_max" in conformal else None),
                   conformal_tbr_mean=(ConformalScores.from_dict(conformal["tbr_mean"])
                                       if "tbr_mean" in conformal else None))

    @property
    def conformal(self) -> bool:
        return self.conformal_tbr_max is not None and self.conformal_tbr_mean is not None

    @property
    def calibrated(self) -> bool:
        return (self.conformal or self.residual_sd_tbr_max > 0
                or self.residual_sd_tbr_mean > 0)

    @property
    def residual_rms_tbr_max(self) -> float:
        return float(np.hypot(self.residual_sd_tbr_max, self.residual_bias_tbr_max))

    @property
    def residual_rms_tbr_mean(self) -> float:
        return float(np.hypot(self.residual_sd_tbr_mean, self.residual_bias_tbr_mean))

    @property
    def z(self) -> float:
        return NormalDist().inv_cdf(0.5 + self.level / 2.0)

    def limits(self, measure: str, value: float, sd_model: float) -> tuple[float, float]:
        """The interval of one lesion's ``measure`` ("tbr_max" or "tbr_mean") measured at
        ``value`` with the sampling SD ``sd_model``, in the card's form."""
        if measure not in ("tbr_max", "tbr_mean"):
            raise ValueError(f"no interval for {measure!r}")
        if self.conformal_tbr_max is not None and self.conformal_tbr_mean is not None:
            scores = self.conformal_tbr_max if measure == "tbr_max" else self.conformal_tbr_mean
            return scores.limits(value, sd_model)
        if self.shifted:
            sd = self.residual_sd_tbr_max if measure == "tbr_max" else self.residual_sd_tbr_mean
            bias = (self.residual_bias_tbr_max if measure == "tbr_max"
                    else self.residual_bias_tbr_mean)
            half, centre = self.z * float(np.hypot(sd_model, sd)), value - bias
        else:
            rms = self.residual_rms_tbr_max if measure == "tbr_max" else self.residual_rms_tbr_mean
            half, centre = self.z * float(np.hypot(sd_model, rms)), value
        return centre - half, centre + half

    def method_text(self, samples: int) -> str:
        text = f"{self.level:.0%} interval: {samples} passes of {METHOD_SAMPLING}"
        if self.conformal:
            return (text + ", scaled by split-conformal scores of (real - synthetic) / "
                    "sqrt(SD^2 + s^2) on validation lesions "
                    f"({self.source or 'model card'}); not centred on the value")
        if self.calibrated and self.shifted:
            return (text + ", combined with the residual SD of synthetic vs real TBR per "
                    "lesion on validation patients and centred on the value corrected by "
                    f"their mean residual ({self.source or 'model card'})")
        if self.calibrated:
            return (text + ", combined with the root-mean-square residual (SD and mean) "
                    "of synthetic vs real TBR per lesion on validation patients "
                    f"({self.source or 'model card'})")
        return text + " only (no calibration in the model card: the interval is too narrow)"


@dataclass(frozen=True)
class TbrInterval:
    """One lesion's interval; ``equivocal`` when the TBRmax interval reaches below the
    threshold."""

    lesion: int
    tbr_max_low: float
    tbr_max_high: float
    tbr_mean_low: float
    tbr_mean_high: float
    sd_model_tbr_max: float
    sd_model_tbr_mean: float
    samples: int
    level: float
    equivocal: bool


def network_fraction(mask: NDArray[np.bool_], size: int) -> NDArray[np.float32]:
    """(N, H, W) mask -> (N, size, size) covered fraction, resampled like the network input."""
    return to_network(mask.astype(np.float32), size)[0][:, 0].numpy()


def lesion_intervals(samples: NDArray[np.float32], result: TbrResult, calibration: Calibration,
                     ) -> list[TbrInterval]:
    """Intervals of ``result``'s lesions from ``samples`` (n, N, S, S) of the uptake at
    the network size (the node's lesion and background masks resampled onto it)."""
    n = len(samples)
    if n < 2 or not result.lesions:
        return []
    size = samples.shape[-1]
    background = network_fraction(result.background_mask, size) >= 0.5
    if not background.any():
        return []
    flat = samples.reshape(n, -1)
    bg_means = flat[:, background.ravel()].mean(axis=1).astype(np.float64)
    out = []
    for lesion in result.lesions:
        # Only the lesion's own slices are resampled (per slice, so exactly the same
        # fractions as the whole volume's): a volume-sized resampling per lesion cost
        # about 50 ms each.
        slices = np.flatnonzero(lesion.mask.reshape(len(lesion.mask), -1).any(axis=1))
        first, last = (int(slices[0]), int(slices[-1]) + 1) if slices.size else (0, 0)
        fraction = network_fraction(lesion.mask[first:last], size)
        if fraction.size == 0:
            continue
        inside = (fraction >= 0.25).ravel()
        if not inside.any():
            inside = (fraction >= fraction.max()).ravel()
        values = samples[:, first:last].reshape(n, -1)[:, inside].astype(np.float64)
        tbr_max = values.max(axis=1) / bg_means
        tbr_mean = values.mean(axis=1) / bg_means
        sd_max, sd_mean = float(tbr_max.std(ddof=1)), float(tbr_mean.std(ddof=1))
        low_max, high_max = calibration.limits("tbr_max", lesion.tbr_max, sd_max)
        low_mean, high_mean = calibration.limits("tbr_mean", lesion.tbr_mean, sd_mean)
        out.append(TbrInterval(
            lesion=lesion.number, tbr_max_low=low_max, tbr_max_high=high_max,
            tbr_mean_low=low_mean, tbr_mean_high=high_mean,
            sd_model_tbr_max=sd_max, sd_model_tbr_mean=sd_mean, samples=n,
            level=calibration.level, equivocal=bool(low_max < result.threshold)))
    return out
