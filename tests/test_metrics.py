"""Metrics against known values (training.metrics, parts of training.evaluation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dicom_node.inference.fusion import defuse, fuse, to_uint8
from dicom_node.inference.fusion_style import FusionStyle
from training.evaluation import checks, defuse_uptake
from training.metrics import (
    PSNR_CAP_DB,
    bland_altman,
    fsim,
    masked_psnr,
    masked_ssim,
    mse,
    pearson,
    psnr,
    ssim,
    tbr,
)


def _smooth_rgb(rng: np.random.Generator, n: int = 2, size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        phase = rng.uniform(0, 2 * np.pi, 3)
        chans = [0.5 + 0.4 * np.sin(2 * np.pi * (xx * (k + 1) + yy * 2) + phase[k])
                 for k in range(3)]
        images.append(np.stack(chans, axis=-1))
    return np.asarray(images, dtype=np.float32)


def test_identical_images_give_perfect_scores() -> None:
    rng = np.random.default_rng(0)
    images = _smooth_rgb(rng)
    a = images[0]
    assert mse(a, a) == 0.0
    # Identical images have an infinite PSNR; it is capped (documented in metrics).
    assert psnr(a, a) == PSNR_CAP_DB
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-9)
    assert ssim(a[..., 0], a[..., 0]) == pytest.approx(1.0, abs=1e-9)
    assert np.allclose(fsim(images, images), 1.0, atol=1e-4)
    mask = np.zeros(a.shape[:2], bool)
    mask[10:30, 10:30] = True
    assert masked_psnr(a[..., 0], a[..., 0], mask) == PSNR_CAP_DB
    assert masked_ssim(a[..., 0], a[..., 0], mask) == pytest.approx(1.0, abs=1e-9)


def test_different_images_score_below_perfect() -> None:
    rng = np.random.default_rng(1)
    images = _smooth_rgb(rng)
    assert ssim(images[0], images[1]) < 0.9
    assert fsim(images[:1], images[1:])[0] < 0.99
    assert psnr(images[0], images[1]) < 30


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.1])
def test_gaussian_noise_gives_analytic_psnr(sigma: float) -> None:
    rng = np.random.default_rng(2)
    clean = np.full((256, 256, 3), 0.5, dtype=np.float64)  # far from 0 and 1: no clipping
    noisy = clean + rng.normal(0.0, sigma, clean.shape)
    assert psnr(clean, noisy) == pytest.approx(10 * math.log10(1 / sigma**2), abs=0.2)
    assert mse(clean, noisy) == pytest.approx(sigma**2, rel=0.02)


def test_masked_psnr_uses_only_the_mask() -> None:
    a = np.zeros((32, 32))
    b = np.zeros((32, 32))
    b[:16] = 0.1  # error only in the top half
    top = np.zeros((32, 32), bool)
    top[:16] = True
    assert masked_psnr(a, b, top) == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    assert masked_psnr(a, b, ~top) == PSNR_CAP_DB
    assert math.isnan(masked_psnr(a, b, np.zeros_like(top)))


def test_pearson_ci_matches_hand_computation() -> None:
    x = np.array([1.2, 2.3, 2.9, 4.1, 5.0, 6.2, 6.8, 8.1, 9.0, 10.3])
    y = np.array([1.0, 2.9, 2.5, 4.6, 4.4, 6.9, 6.1, 8.8, 8.7, 10.9])
    n = len(x)
    dx, dy = x - x.mean(), y - y.mean()
    r = float((dx * dy).sum() / math.sqrt((dx**2).sum() * (dy**2).sum()))
    z = 0.5 * math.log((1 + r) / (1 - r))
    half = 1.959963984540054 / math.sqrt(n - 3)
    t = r * math.sqrt((n - 2) / (1 - r * r))
    p = 2 * stats.t.sf(abs(t), n - 2)
    corr = pearson(x, y)
    assert corr.n == n
    assert corr.r == pytest.approx(r, abs=1e-12)
    assert corr.ci_low == pytest.approx(math.tanh(z - half), abs=1e-9)
    assert corr.ci_high == pytest.approx(math.tanh(z + half), abs=1e-9)
    assert corr.p == pytest.approx(p, rel=1e-6)
    assert corr.ci_low < r < corr.ci_high


def test_pearson_ignores_nan_and_handles_constant() -> None:
    corr = pearson([1, 2, 3, np.nan, 5], [2, 4, 6, 8, np.nan])
    assert corr.n == 3
    assert corr.r == pytest.approx(1.0)
    assert math.isnan(pearson([1, 1, 1, 1], [1, 2, 3, 4]).r)


def test_tbr_exact_ratio_on_constructed_uptake() -> None:
    uptake = np.zeros((20, 20))
    background = np.zeros((20, 20), bool)
    background[:10] = True
    uptake[:5] = 1.0
    uptake[5:10] = 1.5  # background mean 1.25
    tumour = np.zeros((20, 20), bool)
    tumour[15, 5:8] = True
    uptake[15, 5:8] = [2.0, 3.0, 4.0]  # max 4, mean 3
    tbr_max, tbr_mean = tbr(uptake, tumour, background)
    assert tbr_max == pytest.approx(4.0 / 1.25, abs=1e-12)
    assert tbr_mean == pytest.approx(3.0 / 1.25, abs=1e-12)
    assert all(math.isnan(v) for v in tbr(uptake, tumour, np.zeros_like(background)))


def test_tbr_through_fusion_and_defusion() -> None:
    """TBR on uptake de-fused from a rendered fusion is close to the true ratio."""
    style = FusionStyle()
    grey = np.full((40, 40), 0.4, dtype=np.float32)
    uptake = np.full((40, 40), 1.0, dtype=np.float32)
    tumour = np.zeros((40, 40), bool)
    tumour[18:22, 18:22] = True
    uptake[tumour] = 2.5
    background = ~tumour
    fusion = to_uint8(fuse(grey, uptake, style))
    recovered = defuse_uptake(fusion[None], grey[None], style)[0]
    tbr_max, tbr_mean = tbr(recovered, tumour, background)
    assert tbr_max == pytest.approx(2.5, rel=0.02)
    assert tbr_mean == pytest.approx(2.5, rel=0.02)


def test_fast_defusion_equals_defuse() -> None:
    rng = np.random.default_rng(3)
    style = FusionStyle()
    grey = rng.uniform(0, 1, (2, 24, 24)).astype(np.float32)
    uptake = rng.uniform(0, 4, (2, 24, 24)).astype(np.float32)
    uptake[:, :8] = 0.1  # below the display threshold: plain grey
    fusion = to_uint8(fuse(grey, uptake, style))
    expected = defuse(fusion.astype(np.float32) / 255.0, grey, style).uptake
    assert np.array_equal(defuse_uptake(fusion, grey, style), expected)


def test_bland_altman() -> None:
    ba = bland_altman([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
    assert ba.bias == pytest.approx(0.5)
    assert ba.sd == pytest.approx(0.0)


def test_checks_pass_and_fail() -> None:
    model = {"uptake_psnr_brain": 30.0, "uptake_ssim_brain": 0.9, "uptake_psnr_tumour": 25.0,
             "uptake_ssim_tumour": 0.8, "r_tbrmax_slices": 0.7, "r_tbrmean_slices": 0.85,
             "psnr": 29.0, "ssim": 0.90, "fsim": 0.93}
    oracle = {**model, "psnr": 30.5, "ssim": 0.92, "fsim": 0.94, "r_tbrmax_slices": 0.8,
              "r_tbrmean_slices": 0.9}
    grey = dict.fromkeys(model, 0.1) | {"r_tbrmax_slices": float("nan")}
    summary = {"model": model, "oracle": oracle, "t1c_grey": grey,
               "population_mean": dict.fromkeys(model, 0.2)}
    result = checks(summary)
    assert all(item["pass"] for item in result.values()), result
    summary["model"] = {**model, "psnr": 28.0, "uptake_ssim_tumour": 0.15}
    result = checks(summary)
    assert not result["psnr_vs_oracle"]["pass"]
    assert not result["beats_baselines_pet"]["pass"]
    assert result["ssim_vs_oracle"]["pass"]
