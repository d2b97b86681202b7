"""Neighbouring T1C slices as input channels: the same rows in training and in the node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.inference.fusion import window_t1c
from dicom_node.inference.model_weights import load_weights
from dicom_node.inference.predictor import Predictor
from dicom_node.inference.resampling import to_network
from dicom_node.inference.slice_context import context_step, group_rows, neighbour_rows, stack_context
from tests.test_training import _config, write_toy_dataset
from training import data as ds
from training.evaluation import predict
from training.train import train


def test_neighbour_rows_repeat_the_ends() -> None:
    assert neighbour_rows(4, 1).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    assert neighbour_rows(5, 1, step=2).tolist() == [[0, 0, 2], [0, 1, 3], [0, 2, 4],
                                                     [1, 3, 4], [2, 4, 4]]
    assert neighbour_rows(3, 0).tolist() == [[0], [1], [2]]
    assert neighbour_rows(1, 2).tolist() == [[0, 0, 0, 0, 0]]


def test_context_step_follows_the_training_spacing() -> None:
    assert context_step(3.0, 3.0) == 1
    assert context_step(1.0, 3.0) == 3
    assert context_step(1.2, 3.0) == 2  # 2.5 slices: rounded
    assert context_step(5.0, 3.0) == 1  # thicker than trained: the adjacent slice
    assert context_step(None, 3.0) == 1
    assert context_step(1.0, 0.0) == 1  # spacing not recorded


def test_group_rows_follow_position_within_each_study_and_stop_at_gaps() -> None:
    # study A shuffled, 3 mm apart, with the slice at 9 mm missing; study B interleaved
    groups = np.array(["A", "B", "A", "A", "B", "A", "A"])
    positions = np.array([6.0, 0.0, 0.0, 12.0, 3.0, 3.0, 15.0], dtype=np.float32)
    rows = group_rows(groups, positions, 1)
    by_position = {float(positions[i]): rows[i].tolist() for i in np.flatnonzero(groups == "A")}
    # A in order: rows 2 (0 mm), 5 (3), 0 (6) | gap | 3 (12), 6 (15)
    assert by_position[0.0] == [2, 2, 5]
    assert by_position[3.0] == [2, 5, 0]
    assert by_position[6.0] == [5, 0, 0]  # the slice at 9 mm is missing: no neighbour
    assert by_position[12.0] == [3, 3, 6]  # across the gap: the slice itself
    assert by_position[15.0] == [3, 6, 6]
    assert rows[1].tolist() == [1, 1, 4] and rows[4].tolist() == [1, 4, 4]
    assert group_rows(groups, positions, 0).tolist() == [[i] for i in range(7)]


def test_stack_context_gathers_channels() -> None:
    slices = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    stacked = stack_context(slices, neighbour_rows(4, 1))
    assert stacked.shape == (4, 3, 2, 2)
    assert stacked[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    with pytest.raises(ValueError):
        stack_context(slices[:, 0], neighbour_rows(4, 1))


def test_context_model_trains_from_a_one_slice_model_and_runs_in_the_node(
        tmp_path: Path) -> None:
    dataset = write_toy_dataset(tmp_path / "ds", patients=4, slices=6, seed=3)
    data = ds.load_dataset(dataset)
    assert data.slice_spacing_mm() == 4.0
    one = train(_config(dataset, tmp_path / "one", max_steps=4, target="uptake"))
    assert one.weights is not None
    base = load_weights(one.weights)
    assert base.card.input_channels == 1

    # widened from the one-slice model: before any step it gives the same output
    start = train(_config(dataset, tmp_path / "start", max_steps=0, target="uptake",
                          context_slices=1, init_generator=str(one.weights)))
    assert start.weights is not None
    widened = load_weights(start.weights)
    assert (widened.card.context_slices, widened.card.input_channels) == (1, 3)
    assert widened.card.context_spacing_mm == 4.0
    assert "neighbouring slice" in widened.card.training["method"]
    test = data.indices("test")
    with torch.inference_mode():
        y_one = base.generator(ds.input_tensor(data.input_grey(test)))
        y_wide = widened.generator(ds.input_tensor(data.input_grey(test, 1)))
    torch.testing.assert_close(y_wide, y_one, rtol=0, atol=1e-6)

    trained = train(_config(dataset, tmp_path / "ctx", max_steps=6, target="uptake",
                            context_slices=1, init_generator=str(one.weights)))
    assert trained.weights is not None
    model = load_weights(trained.weights)
    x = ds.input_tensor(data.input_grey(test, 1))
    assert x.shape[1] == 3
    with torch.inference_mode():
        expected = model.generator(x)
        alone = model.generator(torch.cat([x[:, 1:2]] * 3, 1))
    assert (expected - alone).abs().max() > 1e-4, "the neighbours change nothing"

    # evaluate's predict and the node's Predictor give the training output
    _, uptake = predict(model, data.input_grey(test, 1), data.fusion_style)
    assert uptake is not None
    unit = ((expected[:, 0].clamp(-1, 1) + 1) / 2 * model.card.uptake_scale).numpy()
    np.testing.assert_allclose(uptake, unit, atol=1e-5)
    volume = data.t1c[test].astype(np.float32) * 1000.0  # one patient's slices, in order
    predictor = Predictor(model, torch.device("cpu"), batch_size=4)
    node = predictor.predict(volume, slice_spacing_mm=4.0)
    net = to_network(window_t1c(volume), model.card.input_size)[0] * 2 - 1
    with torch.inference_mode():
        direct = model.generator(stack_context(net, neighbour_rows(len(volume), 1)))
    direct_uptake = ((direct[:, 0].clamp(-1, 1) + 1) / 2 * model.card.uptake_scale).numpy()
    np.testing.assert_allclose(node.uptake, direct_uptake, atol=1e-5)
    with torch.inference_mode():  # the same slices one at a time: not what the node gives
        flat = model.generator(torch.cat([net] * 3, 1))
    assert (flat - direct).abs().max() > 1e-4
    # at 2 mm slices the neighbours are taken two slices away (the training spacing)
    assert predictor.context_rows(6, 2.0).tolist()[2] == [0, 2, 4]
    with pytest.raises(ValueError, match="ngf"):
        train(_config(dataset, tmp_path / "bad", max_steps=1, target="uptake", ngf=16,
                      context_slices=1, init_generator=str(one.weights)))


def test_warm_up_runs_the_network_and_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    """The node's start-up forward pass (Predictor.warm_up) changes no weight or buffer,
    and the predictions of a series are the same with and without it."""
    from tests.weights_factory import make_test_weights

    make_test_weights(tmp_path / "w.pt", output_kind="uptake", seed=3)
    model = load_weights(tmp_path / "w.pt", torch.device("cpu"))
    before = {k: v.clone() for k, v in model.generator.state_dict().items()}
    volume = np.random.default_rng(0).random((5, 40, 36)).astype(np.float32) * 1000
    cold = Predictor(model, torch.device("cpu"), 4).predict(volume, slice_spacing_mm=2.0)
    predictor = Predictor(model, torch.device("cpu"), 4)
    assert predictor.warm_up() > 0
    after = model.generator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    warm = predictor.predict(volume, slice_spacing_mm=2.0)
    np.testing.assert_array_equal(warm.uptake, cold.uptake)
