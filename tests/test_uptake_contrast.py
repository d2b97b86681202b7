"""The model card's contrast calibration of the synthetic uptake (``uptake_contrast_gain``),
applied the same way by the node, its uncertainty passes and evaluation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.errors import WeightsError
from dicom_node.inference.model_weights import ModelCard, load_weights
from dicom_node.inference.predictor import Predictor
from dicom_node.inference.uptake_contrast import stretch_above_median
from tests.weights_factory import make_test_weights
from training.evaluation import calibrate_contrast, predict


def test_only_the_excess_over_the_median_drawn_uptake_is_stretched() -> None:
    # 0.1 is below the display threshold (not drawn); the drawn voxels' median is 1.0
    uptake = np.array([0.1, 0.8, 1.0, 1.0, 1.0, 1.5, 2.0], dtype=np.float32)
    out = stretch_above_median(uptake, 1.6, display_threshold=0.3)
    np.testing.assert_allclose(out, [0.1, 0.8, 1.0, 1.0, 1.0, 1.8, 2.6], rtol=1e-6)
    # a ratio against the median: TBR 2.0 -> 1 + 1.6 * (2.0 - 1) = 2.6
    assert out[-1] / 1.0 == pytest.approx(2.6)
    assert uptake[-1] == 2.0  # the input is left as it was
    assert stretch_above_median(uptake, 1.0, 0.3) is uptake
    nothing_drawn = np.full(4, 0.1, dtype=np.float32)
    assert stretch_above_median(nothing_drawn, 2.0, 0.3) is nothing_drawn


def test_the_median_is_the_volumes_own() -> None:
    # doubling the whole volume doubles the result: the reference moves with the volume
    rng = np.random.default_rng(3)
    uptake = (0.5 + rng.random((4, 8, 8))).astype(np.float32)
    np.testing.assert_allclose(stretch_above_median(uptake * 2, 1.4, 0.3),
                               stretch_above_median(uptake, 1.4, 0.3) * 2, rtol=1e-5)


def test_model_card_checks_the_gain(tmp_path: Path) -> None:
    card = ModelCard(name="x", version="1", architecture="unet_128", ngf=8,
                     output_kind="uptake", uptake_contrast_gain=1.5)
    card.validate()
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(WeightsError, match="uptake_contrast_gain"):
            dataclasses.replace(card, uptake_contrast_gain=bad).validate()
    with pytest.raises(WeightsError, match="uptake models only"):
        dataclasses.replace(card, output_kind="fusion_rgb").validate()
    make_test_weights(tmp_path / "w.pt", output_kind="uptake", uptake_contrast_gain=1.5)
    assert load_weights(tmp_path / "w.pt").card.uptake_contrast_gain == 1.5
    # an older weights file without the field reads as no calibration
    assert ModelCard(name="x", version="1", architecture="unet_128", ngf=8,
                     output_kind="uptake").uptake_contrast_gain == 1.0


def test_node_samples_and_evaluation_calibrate_the_same_way(tmp_path: Path) -> None:
    make_test_weights(tmp_path / "w.pt", output_kind="uptake", slice_smoothing_mm=4.0,
                      uptake_contrast_gain=1.7, seed=2)
    model = load_weights(tmp_path / "w.pt")
    plain = dataclasses.replace(model, card=dataclasses.replace(model.card,
                                                                uptake_contrast_gain=1.0))
    rng = np.random.default_rng(1)
    volume = (rng.random((6, 128, 128)) * 1000.0).astype(np.float32)
    node = Predictor(model, torch.device("cpu"), batch_size=4).predict(volume,
                                                                       slice_spacing_mm=4.0)
    raw = Predictor(plain, torch.device("cpu"), batch_size=4).predict(volume,
                                                                      slice_spacing_mm=4.0)
    threshold = model.card.fusion_style.display_threshold
    assert np.abs(node.uptake - raw.uptake).max() > 1e-3, "the gain changed nothing"
    # after the smoothing, over the whole volume
    np.testing.assert_allclose(node.uptake, stretch_above_median(raw.uptake, 1.7, threshold),
                               rtol=1e-5, atol=1e-6)
    samples = Predictor(model, torch.device("cpu"), batch_size=4).sample_uptake(
        node.grey, 2, slice_spacing_mm=4.0)
    raw_samples = Predictor(plain, torch.device("cpu"), batch_size=4).sample_uptake(
        node.grey, 2, slice_spacing_mm=4.0)
    for got, before in zip(samples, raw_samples, strict=True):
        np.testing.assert_allclose(got, stretch_above_median(before, 1.7, threshold),
                                   rtol=1e-5, atol=1e-6)

    # evaluation: shuffled slices of one run, and a second run calibrated on its own
    order = np.array([3, 0, 5, 1, 4, 2])
    runs = [np.argsort(order)]
    _, uptake = predict(model, node.grey[order], model.card.fusion_style, batch_size=4,
                        runs=runs, positions_mm=np.arange(6, dtype=np.float64)[order] * 4.0)
    assert uptake is not None
    np.testing.assert_allclose(uptake, node.uptake[order], rtol=1e-5, atol=1e-6)


def test_evaluation_calibrates_each_run_on_its_own() -> None:
    low = np.full((2, 3, 3), 1.0, dtype=np.float32)
    low[0, 0, 0] = 2.0
    high = low * 3.0
    both = np.concatenate([low, high])
    out = calibrate_contrast(both, [np.array([0, 1]), np.array([2, 3])], 2.0, 0.3)
    assert out[0, 0, 0] == pytest.approx(3.0)  # 1 + 2 * (2 - 1): its own median, 1
    assert out[2, 0, 0] == pytest.approx(9.0)  # 3 + 2 * (6 - 3): its own median, 3
    lone = calibrate_contrast(both, [np.array([2, 3])], 2.0, 0.3)  # rows 0, 1 in no run
    np.testing.assert_allclose(lone[:2], out[:2])
    assert calibrate_contrast(both, None, 1.0, 0.3) is both
