"""The inference weights file: generator state dict plus its model card.

One file (``torch.save`` of a plain dict, loaded with ``weights_only=True``)::

    {"format": "dicom-node-generator/1",
     "model_card": {...},          # JSON-compatible: see ModelCard
     "state_dict": {...}}          # UnetGenerator state dict (fp16 or fp32 tensors)

The sha256 of the whole file identifies the model in every output's provenance.
A ``<weights>.json`` copy of the model card is written beside it for people.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dicom_node.errors import WeightsError
from dicom_node.inference.fusion_style import FusionStyle
from dicom_node.inference.generator import ARCHITECTURES, INPUT_SIZES, UnetGenerator, build_generator
from dicom_node.inference.slice_context import input_channels
from storage.file_store import atomic_writer

FORMAT = "dicom-node-generator/1"
OUTPUT_KINDS = ("fusion_rgb", "uptake")


@dataclass(frozen=True)
class ModelCard:
    """What a weights file is, how it was made, and how its output is to be read."""

    name: str
    version: str
    architecture: str  # unet_256 | unet_128
    ngf: int
    output_kind: str  # fusion_rgb | uptake
    fusion: dict[str, Any] = field(default_factory=lambda: FusionStyle().as_dict())
    # Output uptake scale for output_kind == "uptake": uptake = (y + 1) / 2 * uptake_scale
    uptake_scale: float = 4.0
    intended_use: str = "Research only. Synthetic PET. NOT FOR DIAGNOSTIC USE."
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    test_weights: bool = False
    # Neighbouring T1C slices each side fed as extra channels (0 = the published
    # one-slice input), taken at this slice spacing (0 = adjacent slices): see
    # dicom_node.inference.slice_context.
    context_slices: int = 0
    context_spacing_mm: float = 0.0
    # Standard deviation (mm) of a Gaussian along the slice normal applied to an uptake
    # model's output before anything reads it (0 = none): see dicom_node.inference.slice_smoothing.
    slice_smoothing_mm: float = 0.0
    # Excess of the (smoothed) uptake over its median drawn value multiplied by this gain
    # (1 = none), chosen on validation patients: see dicom_node.inference.uptake_contrast.
    uptake_contrast_gain: float = 1.0
    # Residual SD of synthetic vs real TBR per lesion on validation patients, the interval
    # level and where they were measured: see dicom_node.analysis.uncertainty ({} = not calibrated).
    tbr_interval: dict[str, Any] = field(default_factory=dict)
    # The phantom cohorts behind this model: training and validation seeds (used for
    # choices) and the sealed test seed, evaluated once: see training.benchmark.
    cohorts: dict[str, Any] = field(default_factory=dict)
    # The clip of the network's T1C grey (dicom_node.inference.fusion.window_t1c): 1 for
    # models before 3.3 (their input clipped enhancement to bright white matter).
    t1c_input_ceiling: float = 1.0

    @property
    def input_channels(self) -> int:
        return input_channels(self.context_slices)

    @property
    def input_size(self) -> int:
        return INPUT_SIZES[self.architecture]

    @property
    def output_channels(self) -> int:
        return 3 if self.output_kind == "fusion_rgb" else 1

    @property
    def fusion_style(self) -> FusionStyle:
        return FusionStyle.from_dict(self.fusion)

    def validate(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise WeightsError(f"model card architecture {self.architecture!r} is not one of "
                               f"{sorted(ARCHITECTURES)}")
        if not isinstance(self.context_slices, int) or self.context_slices < 0:
            raise WeightsError(f"model card context_slices {self.context_slices!r} is not "
                               "a count >= 0")
        if self.output_kind not in OUTPUT_KINDS:
            raise WeightsError(f"model card output_kind {self.output_kind!r} is not one of "
                               f"{OUTPUT_KINDS}")
        smoothing = self.slice_smoothing_mm
        if (isinstance(smoothing, bool) or not isinstance(smoothing, (int, float))
                or not math.isfinite(smoothing) or smoothing < 0):
            raise WeightsError(f"model card slice_smoothing_mm {smoothing!r} is not a "
                               "finite length >= 0")
        if smoothing and self.output_kind != "uptake":
            raise WeightsError("model card slice_smoothing_mm applies to uptake models only")
        ceiling = self.t1c_input_ceiling
        if (isinstance(ceiling, bool) or not isinstance(ceiling, (int, float))
                or not math.isfinite(ceiling) or ceiling < 1.0):
            raise WeightsError(f"model card t1c_input_ceiling {ceiling!r} is not a finite "
                               "value >= 1")
        gain = self.uptake_contrast_gain
        if (isinstance(gain, bool) or not isinstance(gain, (int, float))
                or not math.isfinite(gain) or gain <= 0):
            raise WeightsError(f"model card uptake_contrast_gain {gain!r} is not a finite "
                               "gain > 0")
        if gain != 1.0 and self.output_kind != "uptake":
            raise WeightsError("model card uptake_contrast_gain applies to uptake models only")


@dataclass(frozen=True)
class LoadedModel:
    generator: UnetGenerator
    card: ModelCard
    sha256: str
    path: Path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_weights(generator: UnetGenerator, card: ModelCard, path: Path, fp16: bool = True) -> str:
    """Write generator weights and model card atomically; return the file's sha256."""
    card.validate()
    state = {
        key: (value.half() if fp16 and value.is_floating_point() else value).detach().cpu()
        for key, value in generator.state_dict().items()
    }
    payload = {"format": FORMAT, "model_card": json.loads(json.dumps(asdict(card))),
               "state_dict": state}
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0644: whoever trains writes the weights, the service's own user reads them
    with atomic_writer(path, mode=0o644) as handle:
        torch.save(payload, handle)
    sha = file_sha256(path)
    card_path = path.with_suffix(path.suffix + ".json")
    card_path.write_text(json.dumps({**asdict(card), "sha256": sha}, indent=2) + "\n")
    return sha


def load_weights(path: Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a weights file into an eval-mode generator on ``device``."""
    if not path.is_file():
        raise WeightsError(f"model weights not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise WeightsError(f"cannot read model weights {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise WeightsError(f"{path} is not a dicom-node generator weights file ({FORMAT})")
    try:
        card = ModelCard(**payload["model_card"])
    except TypeError as exc:
        raise WeightsError(f"{path}: invalid model card: {exc}") from exc
    card.validate()
    generator = build_generator(card.architecture, card.ngf, input_nc=card.input_channels,
                                output_nc=card.output_channels)
    state = {key: value.float() if value.is_floating_point() else value
             for key, value in payload["state_dict"].items()}
    try:
        generator.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: weights do not match the model card: {exc}") from exc
    generator.eval()
    generator.to(device)
    return LoadedModel(generator=generator, card=card, sha256=file_sha256(path), path=path)
