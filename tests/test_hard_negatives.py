"""Hard-negative mining: which pixels a generator is punished for drawing hot, and how the
weights reach the loss, the run's record and the card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_training import _config, write_toy_dataset
from training import data as ds
from training.export import method_text
from training.hard_negatives import (
    MIN_BACKGROUND_PIXELS,
    HardNegatives,
    excluded_zone,
    hard_negative_mask,
    weights,
)
from training.pix2pix import Pix2Pix, Pix2PixConfig
from training.train import hard_negative_masks, hard_negative_weighting, train

SIZE = 64


def _disk(cy: float, cx: float, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32),
                            torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    return (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).view(1, 1, SIZE, SIZE)


@pytest.fixture
def scene() -> dict[str, torch.Tensor]:
    """A brain at uptake 1; a real tumour (hot on both); the striatum, drawn hotter by the
    generator than this patient's PET; an invented focus; a hot spot outside the brain."""
    brain = _disk(32, 32, 28)
    tumour = _disk(20, 20, 4)
    striatum = _disk(34, 44, 4)
    invented = _disk(44, 24, 3)
    outside = _disk(2, 2, 2)
    real = torch.where(brain, 1.0, 0.0) + 1.5 * tumour.float() + 0.4 * striatum.float()
    fake = (torch.where(brain, 1.0, 0.0) + 1.4 * tumour.float() + 1.2 * striatum.float()
            + 1.0 * invented.float() + 3.0 * outside.float())
    return {"brain": brain, "tumour": tumour, "striatum": striatum, "invented": invented,
            "outside": outside, "real": real, "fake": fake}


def test_only_the_invented_focus_is_a_hard_negative(scene: dict[str, torch.Tensor]) -> None:
    zone = excluded_zone(scene["tumour"] | scene["striatum"], 2)
    mask = hard_negative_mask(scene["fake"], scene["real"], scene["brain"], zone, 1.6, 5)
    assert mask[scene["invented"]].all()
    assert mask.sum() == scene["invented"].sum()
    assert not (mask & (scene["tumour"] | scene["striatum"] | scene["outside"])).any()
    # Without the striatum in the zone, its over-drawn part would be punished too.
    loose = hard_negative_mask(scene["fake"], scene["real"], scene["brain"],
                               excluded_zone(scene["tumour"], 2), 1.6, 5)
    assert (loose & scene["striatum"]).any()
    # Where the real uptake is hot as well (and, blurred, a little wider), the focus is
    # no false one.
    real_too = scene["real"] + 1.0 * _disk(44, 24, 6).float()
    assert not hard_negative_mask(scene["fake"], real_too, scene["brain"], zone, 1.6, 5).any()
    # A single hot PET voxel (noise) does not clear a focus: the real uptake is smoothed.
    speck = scene["real"].clone()
    speck[0, 0, 44, 24] = 3.0
    assert hard_negative_mask(scene["fake"], speck, scene["brain"], zone, 1.6, 5)[
        0, 0, 44, 24]


def test_each_uptake_is_measured_against_its_own_background(
        scene: dict[str, torch.Tensor]) -> None:
    """A generator drawing the whole brain at twice the uptake draws nothing hot; a slice
    with too little brain has no background and gives no hard negatives."""
    zone = excluded_zone(scene["tumour"] | scene["striatum"], 2)
    doubled = 2.0 * torch.where(scene["brain"], 1.0, 0.0)
    assert not hard_negative_mask(doubled, scene["real"], scene["brain"], zone, 1.6, 5).any()
    small = _disk(32, 32, 7)
    assert int(small.sum()) < MIN_BACKGROUND_PIXELS
    assert not hard_negative_mask(scene["fake"], scene["real"], small, zone & small, 1.6,
                                  5).any()


def test_settings_are_checked() -> None:
    assert not HardNegatives().active
    assert HardNegatives(weight=20.0).active
    for bad in ({"weight": 0.5}, {"ratio": 1.0}, {"smooth_px": 4}):
        with pytest.raises(ValueError):
            HardNegatives(**bad)
    mask = torch.tensor([[True, False]])
    assert weights(mask, 30.0).tolist() == [[30.0, 1.0]]


def test_train_step_weighs_the_mined_pixels(tmp_path: Path) -> None:
    """The mined weights multiply the L1 where they exceed the tumour weights, and the
    fraction raised is reported."""
    dataset = write_toy_dataset(tmp_path / "ds", patients=3)
    data = ds.load_dataset(dataset)
    idx = data.indices("train")[:4]
    x, y = ds.batch(data, idx, "uptake")
    torch.manual_seed(0)
    model = Pix2Pix(Pix2PixConfig(architecture="unet_128", ngf=8, ndf=8, output_nc=1),
                    torch.device("cpu"))
    model.generator = torch.nn.Conv2d(1, 1, 1)  # type: ignore[assignment]  # deterministic
    model.opt_g = torch.optim.Adam(model.generator.parameters())
    tumour_weight = ds.l1_weights(data, idx, 10.0, 2)
    mined = torch.ones_like(tumour_weight)
    mined[:, :, 10:20, 10:20] = 50.0
    with torch.no_grad():
        fake = model.generator(x)
    losses = model.train_step(x, y, tumour_weight, None, lambda output: mined)
    expected = float(((fake - y).abs() * torch.maximum(tumour_weight, mined)).mean())
    assert losses["loss_G_L1_weighted"] == pytest.approx(expected, rel=1e-4)
    assert losses["hard_negative_fraction"] == pytest.approx(float((mined > 1).float().mean()))


def test_mining_on_a_batch_skips_tumours_and_striatum(tmp_path: Path) -> None:
    """On the toy dataset, an output that adds a focus in normal brain and doubles every
    tumour and striatum is punished at the focus only."""
    data = ds.load_dataset(write_toy_dataset(tmp_path / "ds", patients=3))
    idx = data.indices("train")
    _, y = ds.batch(data, idx, "uptake")
    masks = hard_negative_masks(data, idx)
    config = _config(tmp_path, tmp_path / "run", target="uptake", tumour_margin_px=2)
    hard = HardNegatives(weight=40.0)
    weigh = hard_negative_weighting(y, masks, hard, config, torch.device("cpu"))
    uptake = (y + 1.0) / 2.0 * config.uptake_scale
    hot = masks[1] > 0.5
    brain = masks[0] > 0.5
    output = torch.where(hot, 2.0 * uptake, uptake)
    focus = brain & ~excluded_zone(hot, 8)
    focus &= torch.rand(focus.shape, generator=torch.Generator().manual_seed(1)) < 0.002
    focus = torch.nn.functional.max_pool2d(focus.float(), 5, 1, 2) > 0.5
    focus &= brain & ~excluded_zone(hot, 6)
    assert focus.any()
    output = torch.where(focus, 2.5 * torch.ones_like(uptake), output)
    mined = weigh(output / config.uptake_scale * 2.0 - 1.0)
    assert (mined[focus] == 40.0).float().mean() > 0.9
    assert (mined[~focus] == 1.0).all()


def test_hard_negative_training_is_recorded_in_the_card_and_fixed_on_resume(
        tmp_path: Path) -> None:
    dataset = write_toy_dataset(tmp_path / "ds", patients=3)
    out = tmp_path / "run"
    train(_config(dataset, out, target="uptake", tumour_l1_weight=10.0,
                  hard_negative_weight=30.0, max_steps=2))
    config = json.loads((out / "config.json").read_text())
    assert config["hard_negative_weight"] == 30.0
    assert "hard negatives" in method_text(config) and "30x" in method_text(config)
    history = json.loads((out / "history.json").read_text())
    assert all("hard_negative_fraction" in row for row in history["steps"])
    with pytest.raises(ValueError, match="hard_negative_weight"):
        train(_config(dataset, out, target="uptake", tumour_l1_weight=10.0,
                      hard_negative_weight=20.0, max_steps=3), resume=True)
    with pytest.raises(ValueError, match="--target uptake"):
        train(_config(dataset, tmp_path / "fusion", hard_negative_weight=30.0))
