"""Small generator weights made for tests: seeded initialisation, saved as test weights."""

from __future__ import annotations

from pathlib import Path

import torch

from dicom_node.inference.generator import build_generator
from dicom_node.inference.model_weights import ModelCard, save_weights


def make_test_weights(path: Path, output_kind: str = "fusion_rgb", ngf: int = 8,
                      seed: int = 0, slice_smoothing_mm: float = 0.0,
                      uptake_contrast_gain: float = 1.0) -> str:
    torch.manual_seed(seed)
    card = ModelCard(name="test-generator", version="0.0-test", architecture="unet_128",
                     ngf=ngf, output_kind=output_kind, test_weights=True,
                     intended_use="Tests only: untrained weights.",
                     slice_smoothing_mm=slice_smoothing_mm,
                     uptake_contrast_gain=uptake_contrast_gain)
    generator = build_generator("unet_128", ngf, output_nc=card.output_channels)
    return save_weights(generator, card, path)
