"""The lesion emphasis of training: a small lesion's L1 weight and its slice's sampling
weight are raised, a large lesion's are not; a non-enhancing lesion's likewise (capped
together); with the options off the loss is exactly the earlier tumour-weighted one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.test_training import _config, write_toy_dataset
from training import data as ds
from training.export import method_text
from training.train import train


class _Labels:
    """The arrays :func:`training.data.l1_weights` reads: the tumour labels and, for the
    non-enhancing gain, the T1C."""

    def __init__(self, labels: np.ndarray, t1c: np.ndarray | None = None) -> None:
        self.labels = labels
        self.t1c = t1c

    def get(self, name: str) -> np.ndarray:
        assert name == "tumour_labels"
        return self.labels


def _labels() -> np.ndarray:
    labels = np.zeros((3, 32, 32), dtype=np.uint8)
    labels[0, 2:20, 2:20] = 1      # a large lesion: 324 pixels
    labels[0, 25:27, 25:27] = 2    # a small one on the same slice: 4 pixels
    labels[1, 10:15, 10:15] = 1    # 25 pixels
    return labels                  # slice 2: no lesion


def test_off_is_the_tumour_weighted_loss_as_before() -> None:
    labels = _labels()
    weights = ds.l1_weights(_Labels(labels), np.arange(3), 10.0, 2)  # type: ignore[arg-type]
    mask = F.max_pool2d(torch.from_numpy(labels > 0).float().unsqueeze(1), 5, 1, 2)
    assert torch.equal(weights, 1.0 + 9.0 * mask)


def test_small_lesions_weigh_more_and_large_ones_do_not() -> None:
    labels = _labels()
    weights = ds.l1_weights(_Labels(labels), np.arange(3), 10.0, 2,  # type: ignore[arg-type]
                            small_lesion_area_px=100, small_lesion_max_gain=6.0)
    assert weights[0, 0, 10, 10] == 10.0                 # 324 px: no gain
    assert weights[0, 0, 26, 26] == 60.0                 # 4 px: capped at 6x
    assert weights[1, 0, 12, 12] == 40.0                 # 25 px: 100 / 25 = 4x
    assert weights[1, 0, 8, 12] == 40.0                  # grown with its lesion (margin 2)
    assert weights[2].max() == 1.0                       # no lesion: plain L1
    gain = ds.lesion_slice_gain(_Labels(labels), np.arange(3), 100, 6.0)  # type: ignore[arg-type]
    assert gain.tolist() == [6.0, 4.0, 1.0]
    sampling = ds.sampling_weights(np.array([True, True, False]), 2.0, np.sqrt(gain))
    assert np.allclose(sampling.numpy(), [2.0 * np.sqrt(6.0), 4.0, 1.0])


def _t1c(labels: np.ndarray) -> np.ndarray:
    """White matter about 0.5; lesion 1 on slice 0 and the lesion of slice 1 enhance (a
    rim reaching 1.3), lesion 2 on slice 0 is a dark area (0.3) that never does."""
    t1c = np.full(labels.shape, 0.5, dtype=np.float16)
    t1c[0, 2:20, 2:20] = 0.4
    t1c[0, 2, 2:20] = 1.3
    t1c[0, 25:27, 25:27] = 0.3
    t1c[1, 10:15, 10:15] = 1.2
    return t1c


def test_non_enhancing_sections_are_the_lesions_whose_t1c_stays_dark() -> None:
    labels = _labels()
    dark = ds.non_enhancing_sections(labels, _t1c(labels).astype(np.float32), 0.95)
    assert dark[0, 25:27, 25:27].all()                       # the dark lesion
    assert not dark[0, 2:20, 2:20].any()                     # a rim enhances the section
    assert not dark[1].any() and not dark[2].any()
    assert dark.sum() == 4


def test_non_enhancing_gain_raises_weight_and_sampling_capped_with_small_lesions() -> None:
    labels, t1c = _labels(), _t1c(_labels())
    data = _Labels(labels, t1c)
    alone = ds.l1_weights(data, np.arange(3), 10.0, 0,  # type: ignore[arg-type]
                          non_enhancing_gain=3.0)
    assert alone[0, 0, 26, 26] == 30.0                       # dark: 3x the tumour weight
    assert alone[0, 0, 10, 10] == 10.0 and alone[1, 0, 12, 12] == 10.0
    both = ds.l1_weights(data, np.arange(3), 10.0, 0,  # type: ignore[arg-type]
                         small_lesion_area_px=100, small_lesion_max_gain=6.0,
                         non_enhancing_gain=3.0)
    assert both[0, 0, 26, 26] == 60.0                        # 6 x 3, capped at 6
    assert both[1, 0, 12, 12] == 40.0                        # enhancing: small gain only
    gain = ds.lesion_slice_gain(data, np.arange(3), 0, 6.0,  # type: ignore[arg-type]
                                      non_enhancing_gain=3.0)
    assert gain.tolist() == [3.0, 1.0, 1.0]
    off = ds.l1_weights(data, np.arange(3), 10.0, 2)  # type: ignore[arg-type]
    assert torch.equal(off, ds.l1_weights(_Labels(labels), np.arange(3), 10.0, 2))  # type: ignore[arg-type]


def test_non_enhancing_gain_is_trained_recorded_and_fixed_on_resume(tmp_path: Path) -> None:
    dataset = write_toy_dataset(tmp_path / "ds", patients=3)
    out = tmp_path / "run"
    train(_config(dataset, out, target="uptake", tumour_l1_weight=10.0,
                  non_enhancing_gain=3.0, max_steps=2))
    config = json.loads((out / "config.json").read_text())
    assert config["non_enhancing_gain"] == 3.0 and config["enhancing_t1c"] == 0.95
    assert "non-enhancing" in method_text(config) and "3x more" in method_text(config)
    with pytest.raises(ValueError, match="non_enhancing_gain"):
        train(_config(dataset, out, target="uptake", tumour_l1_weight=10.0,
                      non_enhancing_gain=2.0, max_steps=3), resume=True)
    with pytest.raises(ValueError, match="--tumour-l1-weight above 1"):
        train(_config(dataset, tmp_path / "plain", target="uptake", non_enhancing_gain=3.0))
