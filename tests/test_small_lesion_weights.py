"""The small-lesion emphasis of training: a small lesion's L1 weight and its slice's
sampling weight are raised, a large lesion's are not, and with the option off the loss
is exactly the earlier tumour-weighted one."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from training import data as ds


class _Labels:
    """The one array :func:`training.data.l1_weights` reads."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

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
    gain = ds.small_lesion_slice_gain(_Labels(labels), np.arange(3), 100, 6.0)  # type: ignore[arg-type]
    assert gain.tolist() == [6.0, 4.0, 1.0]
    sampling = ds.sampling_weights(np.array([True, True, False]), 2.0, np.sqrt(gain))
    assert np.allclose(sampling.numpy(), [2.0 * np.sqrt(6.0), 4.0, 1.0])
