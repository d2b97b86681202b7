"""Smoothing of the synthetic uptake along the slice normal: the model card's
``slice_smoothing_mm``, applied the same way by the node and by evaluation."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from dicom_node.errors import WeightsError
from dicom_node.inference.fusion import fuse
from dicom_node.inference.model_weights import ModelCard, load_weights
from dicom_node.inference.predictor import Predictor
from dicom_node.inference.slice_context import contiguous_runs, restrict_runs
from dicom_node.inference.slice_smoothing import sigma_slices, smooth_runs, smooth_slices
from tests.test_training import write_toy_dataset
from tests.weights_factory import make_test_weights
from training import data as ds
from training.cli import main as cli_main
from training.evaluation import evaluation_runs, predict


def gaussian_by_hand(volume: NDArray[np.float32], sigma: float) -> NDArray[np.float32]:
    """Gaussian along axis 0, ends repeated, truncated at 4 SD: written out, not scipy."""
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    n = len(volume)
    out = np.zeros_like(volume, dtype=np.float64)
    for i in range(n):
        for offset, weight in zip(offsets, weights, strict=True):
            out[i] += weight * volume[min(max(i + offset, 0), n - 1)]  # type: ignore[index]
    return out.astype(np.float32)


def test_sigma_in_slices() -> None:
    assert sigma_slices(2.4, 3.0) == pytest.approx(0.8)
    assert sigma_slices(2.4, 1.0) == pytest.approx(2.4)  # thinner slices: more of them
    assert sigma_slices(0.0, 3.0) == 0.0
    assert sigma_slices(2.4, None) == 0.0 and sigma_slices(2.4, 0.0) == 0.0


def test_smooth_slices_is_a_gaussian_along_the_normal_only() -> None:
    rng = np.random.default_rng(0)
    volume = rng.random((9, 4, 5), dtype=np.float32)
    smoothed = smooth_slices(volume, 3.0, 3.0)  # one slice SD
    np.testing.assert_allclose(smoothed, gaussian_by_hand(volume, 1.0), atol=1e-6)
    assert not np.allclose(smoothed, volume)
    impulse = np.zeros((11, 2, 2), dtype=np.float32)
    impulse[5] = 1.0
    spread = smooth_slices(impulse, 2.4, 3.0)[:, 0, 0]
    assert spread[5] == spread.max() and spread[4] == pytest.approx(spread[6])
    assert spread[4] / spread[5] == pytest.approx(math.exp(-0.5 / 0.8 ** 2), rel=1e-4)
    assert spread.sum() == pytest.approx(1.0, abs=1e-6)
    constant = np.full((5, 3, 3), 1.7, dtype=np.float32)
    np.testing.assert_allclose(smooth_slices(constant, 5.0, 1.0), constant, rtol=1e-6)
    assert smooth_slices(volume, 0.0, 3.0) is volume
    assert smooth_slices(volume[:1], 3.0, 3.0) is not None
    np.testing.assert_array_equal(smooth_slices(volume[:1], 3.0, 3.0), volume[:1])


def test_smooth_runs_stay_within_each_run() -> None:
    # study A: shuffled rows, 3 mm apart, the slice at 9 mm missing; study B interleaved
    groups = np.array(["A", "B", "A", "A", "B", "A", "A"])
    positions = np.array([6.0, 0.0, 0.0, 12.0, 3.0, 3.0, 15.0], dtype=np.float32)
    runs = contiguous_runs(groups, positions)
    assert sorted(r.tolist() for r in runs) == [[1, 4], [2, 5, 0], [3, 6]]
    uptake = np.zeros((7, 2, 2), dtype=np.float32)
    uptake[0] = 3.0  # A at 6 mm, the last slice before the gap
    smoothed = smooth_runs(uptake, runs, 3.0, positions)
    assert smoothed[5, 0, 0] > 0  # its neighbour at 3 mm gets some
    for row in (1, 3, 4, 6):  # study B and the slices across the gap get nothing
        assert smoothed[row].max() == 0.0
    ordered = gaussian_by_hand(uptake[[2, 5, 0]], 1.0)
    np.testing.assert_allclose(smoothed[[2, 5, 0]], ordered, atol=1e-6)
    assert uptake[5].max() == 0.0  # the input is left as it was


def test_each_run_is_smoothed_at_its_own_spacing() -> None:
    rng = np.random.default_rng(4)
    uptake = rng.random((12, 2, 3), dtype=np.float32)
    positions = np.concatenate([np.arange(6) * 1.0, 100.0 + np.arange(6) * 3.0])
    runs = [np.arange(6), np.arange(6, 12)]
    smoothed = smooth_runs(uptake, runs, 3.0, positions)
    np.testing.assert_allclose(smoothed[:6], gaussian_by_hand(uptake[:6], 3.0), atol=1e-6)
    np.testing.assert_allclose(smoothed[6:], gaussian_by_hand(uptake[6:], 1.0), atol=1e-6)


def test_restrict_runs_cuts_at_rows_outside_the_subset() -> None:
    runs = [np.array([4, 2, 0, 1]), np.array([3, 5])]
    # a slice-level split holding rows 4, 0, 1, 5: row 2 is missing between 4 and 0
    assert [r.tolist() for r in restrict_runs(runs, np.array([5, 0, 4, 1]))] == \
        [[2], [1, 3], [0]]
    assert restrict_runs(runs, np.array([], dtype=np.int64)) == []


def test_evaluation_runs_of_a_slice_level_split(tmp_path: Path) -> None:
    data = ds.load_dataset(write_toy_dataset(tmp_path / "ds", patients=2, slices=6, seed=1))
    idx = np.array([0, 1, 3, 4, 5, 9, 7], dtype=np.int64)  # patient 0 without slice 2
    runs = evaluation_runs(data, idx)
    as_rows = sorted(idx[r].tolist() for r in runs)
    assert as_rows == [[0, 1], [3, 4, 5], [7], [9]]


def test_model_card_checks_the_smoothing(tmp_path: Path) -> None:
    card = ModelCard(name="x", version="1", architecture="unet_128", ngf=8,
                     output_kind="uptake", slice_smoothing_mm=2.4)
    card.validate()
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(WeightsError, match="slice_smoothing_mm"):
            dataclasses.replace(card, slice_smoothing_mm=bad).validate()
    with pytest.raises(WeightsError, match="uptake models only"):
        dataclasses.replace(card, output_kind="fusion_rgb").validate()
    make_test_weights(tmp_path / "w.pt", output_kind="uptake", slice_smoothing_mm=2.4)
    assert load_weights(tmp_path / "w.pt").card.slice_smoothing_mm == 2.4


def test_node_and_evaluation_smooth_the_same_way(tmp_path: Path) -> None:
    make_test_weights(tmp_path / "w.pt", output_kind="uptake", slice_smoothing_mm=4.0, seed=2)
    model = load_weights(tmp_path / "w.pt")
    plain = dataclasses.replace(model, card=dataclasses.replace(model.card,
                                                                slice_smoothing_mm=0.0))
    rng = np.random.default_rng(1)
    # 128 x 128 (the network size): the node's native matrix is the evaluation's
    volume = (rng.random((6, 128, 128)) * 1000.0).astype(np.float32)
    node = Predictor(model, torch.device("cpu"), batch_size=4).predict(volume,
                                                                       slice_spacing_mm=4.0)
    raw = Predictor(plain, torch.device("cpu"), batch_size=4).predict(volume,
                                                                      slice_spacing_mm=4.0)
    assert np.abs(node.uptake - raw.uptake).max() > 1e-3, "smoothing changed nothing"
    np.testing.assert_allclose(node.uptake, gaussian_by_hand(raw.uptake, 1.0), atol=1e-5)
    np.testing.assert_allclose(node.fusion, fuse(node.grey, node.uptake, model.card.fusion_style),
                               atol=1e-6)
    # thinner slices: the same millimetres are more slices
    thin = Predictor(model, torch.device("cpu"), batch_size=4).predict(volume,
                                                                       slice_spacing_mm=2.0)
    np.testing.assert_allclose(thin.uptake, gaussian_by_hand(raw.uptake, 2.0), atol=1e-5)

    # a missing slice (positions 0, 4, 8 | 20, 24, 28 mm): no smoothing across the gap
    positions = np.array([0.0, 4.0, 8.0, 20.0, 24.0, 28.0])
    gapped = Predictor(model, torch.device("cpu"), batch_size=4).predict(
        volume, slice_spacing_mm=4.0, slice_positions_mm=positions)
    np.testing.assert_allclose(gapped.uptake[:3], gaussian_by_hand(raw.uptake[:3], 1.0),
                               atol=1e-5)
    np.testing.assert_allclose(gapped.uptake[3:], gaussian_by_hand(raw.uptake[3:], 1.0),
                               atol=1e-5)

    # evaluation: the same slices handed over shuffled, their order given as a run
    order = np.array([3, 0, 5, 1, 4, 2])
    runs = [np.argsort(order)]  # positions in the shuffled array, in slice order
    shuffled_mm = np.arange(6, dtype=np.float64)[order] * 4.0
    _, uptake = predict(model, node.grey[order], model.card.fusion_style, batch_size=4,
                        runs=runs, positions_mm=shuffled_mm)
    assert uptake is not None
    np.testing.assert_allclose(uptake, node.uptake[order], atol=1e-5)
    _, unsmoothed = predict(model, node.grey[order], model.card.fusion_style, batch_size=4,
                            runs=runs, positions_mm=shuffled_mm, slice_smoothing_mm=0.0)
    assert unsmoothed is not None
    np.testing.assert_allclose(unsmoothed, raw.uptake[order], atol=1e-5)
    with pytest.raises(ValueError, match="runs of contiguous slices"):
        predict(model, node.grey, model.card.fusion_style)  # the card smooths: runs needed


def test_evaluate_refuses_a_smoothing_that_is_not_a_length(tmp_path: Path) -> None:
    dataset = write_toy_dataset(tmp_path / "ds", patients=3, slices=4, seed=2)
    make_test_weights(tmp_path / "rgb.pt", output_kind="fusion_rgb")
    for value, weights in (("inf", "rgb.pt"), ("-1", "rgb.pt"), ("2.4", "rgb.pt")):
        assert cli_main(["evaluate", "--dataset", str(dataset), "--weights",
                         str(tmp_path / weights), "--split", "test", "--out",
                         str(tmp_path / "report"), "--slice-smoothing-mm", value]) == 2
    assert not (tmp_path / "report" / "report.md").exists()
