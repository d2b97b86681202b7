"""Run the generator over a T1C volume: synthetic fusion and uptake per slice.

Pre-processing: window the series by its percentiles (:func:`fusion.window_t1c`) to
the display grey [0, 1] and, for the network, to [0, t1c_input_ceiling] (the model
card's: 2 keeps enhancement that the display window clips to white matter), pad to
square and resize to the network size, scale to [-1, 1], and for a model trained with
neighbouring slices stack them as channels (:mod:`slice_context`, at the model's training
spacing). The generator runs
in eval mode (deterministic: dropout off, BatchNorm running statistics) under
``torch.inference_mode()``, batched, with autocast on CUDA. Its output is mapped
back to the native matrix. A fusion model's RGB output is de-fused to uptake; an
uptake model's output is smoothed along the slice normal and its contrast calibrated as
its model card says (:mod:`slice_smoothing`, :mod:`uptake_contrast`) and fused over the
T1C with the configured style.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from dicom_node.inference.fusion import (
    defuse,
    display_grey,
    fuse,
    fuse_uint8,
    to_uint8,
    window_t1c,
)
from dicom_node.inference.fusion_style import FusionStyle
from dicom_node.inference.model_weights import LoadedModel
from dicom_node.inference.resampling import Padding, from_network, to_network
from dicom_node.inference.slice_context import (
    context_step,
    contiguous_runs,
    neighbour_rows,
    stack_context,
)
from dicom_node.inference.slice_smoothing import smooth_runs
from dicom_node.inference.uptake_contrast import stretch_above_median

log = logging.getLogger(__name__)


class InferenceTimeout(RuntimeError):
    """Inference of one series ran past ``model.timeout_s``."""


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


@dataclass(frozen=True)
class Prediction:
    grey: NDArray[np.float32]  # (N, H, W) windowed T1C in [0, 1], the display grey
    uptake: NDArray[np.float32]  # (N, H, W) synthetic uptake
    style: FusionStyle  # how ``fusion`` is drawn
    model_fusion: NDArray[np.float32] | None = None  # a fusion model's own output
    # The grey as the network read it (the card's t1c_input_ceiling); None: ``grey``
    network_grey: NDArray[np.float32] | None = None

    @property
    def input_grey(self) -> NDArray[np.float32]:
        """What :meth:`Predictor.sample_uptake` takes: the grey the network read."""
        return self.grey if self.network_grey is None else self.network_grey

    @functools.cached_property
    def fusion(self) -> NDArray[np.float32]:
        """(N, H, W, 3) in [0, 1]: a fusion model's output, or the uptake drawn over the
        T1C on first use (about 1 s for 176 x 256x256, so the node asks for it only
        after it has handed the uptake to the TBR analysis)."""
        if self.model_fusion is not None:
            return self.model_fusion
        return fuse(self.grey, self.uptake, self.style).astype(np.float32)

    def fusion_uint8(self) -> NDArray[np.uint8]:
        """``to_uint8(fusion)``, as the SC series stores it; for an uptake model drawn
        straight to uint8 (:func:`fusion.fuse_uint8`, a third of the time)."""
        if self.model_fusion is not None:
            return to_uint8(self.model_fusion)
        return fuse_uint8(self.grey, self.uptake, self.style)


class Predictor:
    """The loaded model, kept warm, and how to run it on a volume."""

    def __init__(self, model: LoadedModel, device: torch.device, batch_size: int,
                 render_style: FusionStyle | None = None) -> None:
        self.model = model
        self.device = device
        self.batch_size = batch_size
        # A fusion model's colours are read back with the style it was trained on (its
        # model card); an uptake model's output is drawn with the configured style.
        if model.card.output_kind == "uptake" and render_style is not None:
            self.style: FusionStyle = render_style
        else:
            self.style = model.card.fusion_style

    def context_rows(self, count: int, slice_spacing_mm: float | None) -> NDArray[np.int64]:
        """(count, channels) slice indices of each slice's network input."""
        card = self.model.card
        step = context_step(slice_spacing_mm, card.context_spacing_mm)
        return neighbour_rows(count, card.context_slices, step)

    def run_network(self, grey: NDArray[np.float32],
                    progress: Callable[[int, int], None] | None = None,
                    batch_size: int | None = None,
                    slice_spacing_mm: float | None = None) -> torch.Tensor:
        """(N, H, W) grey (windowed to the card's ``t1c_input_ceiling``), ordered along the
        slice normal -> (N, C, H, W) generator output in [-1, 1] at native size."""
        net_in, pad = self._network_input(grey, slice_spacing_mm)
        generator = self.model.generator
        generator.eval()
        with torch.inference_mode():
            result = self._forward(net_in, batch_size or self.batch_size, progress)
        return from_network(result, pad).clamp(-1.0, 1.0)

    def _network_input(self, grey: NDArray[np.float32], slice_spacing_mm: float | None
                       ) -> tuple[torch.Tensor, Padding]:
        """(N, H, W) grey -> the generator's (N, C, S, S) input in [-1, 1] and the padding."""
        net_in, pad = to_network(grey, self.model.card.input_size)
        rows = self.context_rows(len(grey), slice_spacing_mm)
        return stack_context(net_in * 2.0 - 1.0, rows), pad

    def _forward(self, net_in: torch.Tensor, batch: int,
                 progress: Callable[[int, int], None] | None = None,
                 mirrored: bool = False) -> torch.Tensor:
        """The generator over ``net_in`` (N, C, S, S) in batches, on the model's device
        (autocast on CUDA); ``mirrored``: each batch left-right mirrored on the way in and
        back on the way out. (N, C_out, S, S) float32 on the CPU, not clamped."""
        generator = self.model.generator
        use_cuda = self.device.type == "cuda"
        outputs = []
        for start in range(0, len(net_in), batch):
            chunk = net_in[start : start + batch]
            if mirrored:
                chunk = chunk.flip(-1)
            if use_cuda:
                chunk = chunk.pin_memory().to(self.device, non_blocking=True)
                chunk = chunk.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.float16):
                    out = generator(chunk)
            else:
                out = generator(chunk)
            out = out.float().cpu()
            outputs.append(out.flip(-1) if mirrored else out)
            if progress is not None:
                progress(min(start + batch, len(net_in)), len(net_in))
        return torch.cat(outputs, 0)

    def warm_up(self) -> float:
        """One forward pass of a blank batch (the configured batch size, the network's
        input size), so that the first series does not pay for the lazy set-up of the
        first pass (oneDNN primitives on the CPU; on CUDA the cuDNN and cuBLAS handles,
        kernel loading, autocast). Returns the seconds it took."""
        started = time.monotonic()
        size = self.model.card.input_size
        self.run_network(np.zeros((self.batch_size, size, size), dtype=np.float32),
                         slice_spacing_mm=1.0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.monotonic() - started

    def smooth(self, uptake: NDArray[np.float32], slice_spacing_mm: float | None,
               slice_positions_mm: NDArray[np.floating] | None) -> NDArray[np.float32]:
        """The model card's smoothing along the slice normal, within runs of contiguous
        slices; without their positions the slices are taken as evenly spaced."""
        sigma_mm = self.model.card.slice_smoothing_mm
        if sigma_mm <= 0:
            return uptake
        positions = (np.asarray(slice_positions_mm, dtype=np.float64)
                     if slice_positions_mm is not None
                     else np.arange(len(uptake)) * float(slice_spacing_mm or 0.0))
        runs = contiguous_runs(np.zeros(len(uptake), dtype=np.str_), positions)
        return smooth_runs(uptake, runs, sigma_mm, positions)

    def calibrate(self, uptake: NDArray[np.float32], slice_spacing_mm: float | None,
                  slice_positions_mm: NDArray[np.floating] | None) -> NDArray[np.float32]:
        """The model card's steps after the network, in order: smoothing along the slice
        normal (:meth:`smooth`), then the contrast calibration
        (:mod:`dicom_node.inference.uptake_contrast`)."""
        card = self.model.card
        smoothed = self.smooth(uptake, slice_spacing_mm, slice_positions_mm)
        return stretch_above_median(smoothed, card.uptake_contrast_gain,
                                    card.fusion_style.display_threshold)

    def sample_uptake(self, grey: NDArray[np.float32], samples: int,
                      slice_spacing_mm: float | None = None,
                      slice_positions_mm: NDArray[np.floating] | None = None,
                      seed: int = 0, batch_size: int | None = None) -> NDArray[np.float32]:
        """(samples, N, S, S) uptake at the network size from stochastic passes: dropout
        active (Monte Carlo dropout), every second pass on the mirrored input and mirrored
        back, each smoothed and calibrated like :meth:`predict`. Seeded: the same
        grey gives the same samples. An uptake model only."""
        if self.model.card.output_kind != "uptake":
            raise ValueError("uncertainty sampling needs an uptake model")
        size = self.model.card.input_size
        net_in, _pad = self._network_input(grey, slice_spacing_mm)
        generator = self.model.generator
        dropouts = [m for m in generator.modules() if isinstance(m, torch.nn.Dropout)]
        scale = self.model.card.uptake_scale
        out = np.empty((samples, len(grey), size, size), dtype=np.float32)
        generator.eval()
        try:
            for layer in dropouts:
                layer.train()
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                for i in range(samples):
                    torch.manual_seed(seed * 1_000 + i)
                    y = self._forward(net_in, batch_size or self.batch_size,
                                      mirrored=i % 2 == 1)
                    uptake = (y[:, 0].clamp(-1.0, 1.0).numpy() + 1.0) / 2.0 * scale
                    out[i] = self.calibrate(uptake.astype(np.float32), slice_spacing_mm,
                                            slice_positions_mm)
        finally:
            for layer in dropouts:
                layer.eval()
        return out

    def predict(self, volume: NDArray[np.float32], batch_size: int | None = None,
                timeout_s: float | None = None,
                slice_spacing_mm: float | None = None,
                slice_positions_mm: NDArray[np.floating] | None = None) -> Prediction:
        """``volume`` (N, H, W) ordered along the slice normal, ``slice_spacing_mm`` apart
        (for models that take neighbouring slices or smooth along the normal); with
        ``slice_positions_mm`` the smoothing stops at missing slices."""
        network_grey = window_t1c(volume, self.model.card.t1c_input_ceiling)
        grey = display_grey(network_grey)
        started = time.monotonic()

        def check_deadline(done: int, total: int) -> None:
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise InferenceTimeout(f"inference exceeded {timeout_s:g} s "
                                       f"({done}/{total} slices done)")

        output = self.run_network(network_grey, progress=check_deadline, batch_size=batch_size,
                                  slice_spacing_mm=slice_spacing_mm).numpy()
        if self.model.card.output_kind == "uptake":
            uptake = ((output[:, 0] + 1.0) / 2.0 * self.model.card.uptake_scale).astype(np.float32)
            uptake = self.calibrate(uptake, slice_spacing_mm, slice_positions_mm)
            return Prediction(grey=grey, uptake=uptake, style=self.style,
                              network_grey=network_grey)
        fusion = np.transpose((output + 1.0) / 2.0, (0, 2, 3, 1)).astype(np.float32)
        # Quantise as the stored SC will be, so analysis sees what the viewer sees.
        fusion = np.rint(fusion * 255.0) / 255.0
        # The grey inside the model's fusion went through the network's resolution;
        # de-fuse against the T1C resampled the same way, not the sharp native one.
        net_grey, pad = to_network(grey, self.model.card.input_size)
        matched_grey = from_network(net_grey, pad)[:, 0].numpy()
        uptake = defuse(fusion, matched_grey, self.style).uptake
        return Prediction(grey=grey, uptake=uptake, style=self.style,
                          model_fusion=fusion.astype(np.float32))
