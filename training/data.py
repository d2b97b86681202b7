"""The on-disk paired slice dataset (written by ``training.dataset``), read into numpy / torch.

``DSDIR/pairs.npz``: ``t1c`` float16 (N, S, S) windowed grey in [0, 1]; ``fusion`` uint8
(N, S, S, 3); ``patient_id``, ``study_uid`` str (N,); ``slice_position_mm`` float32 (N,);
``has_tumour`` bool (N,); ``t1c_backdrop`` uint8 (N, S, S), the T1C exactly as the
fusion images show it where no uptake is drawn (datasets built before it existed lack it:
:meth:`PairedDataset.backdrop` then falls back to ``t1c``); phantoms also carry
``uptake`` float16, ``oracle_fusion`` uint8, ``oracle_uptake`` float16 (older phantom
datasets lack it), ``tumour_labels`` uint8, ``brain_mask``,
``striatum_mask``, ``oedema`` bool (N, S, S).
``DSDIR/splits.json``: ``method``, ``seed``, ``train`` / ``val`` / ``test`` index lists.
``DSDIR/dataset.json``: ``size``, ``fusion_style`` and provenance.

Network tensors: input ``x = 2 * t1c - 1`` (1 channel, or ``2k + 1`` channels with
``context_slices = k``: the slice and its neighbours in the same study, see
:mod:`dicom_node.inference.slice_context`); target ``fusion / 255 * 2 - 1``
(3 channels, ``target="fusion"``) or ``uptake / uptake_scale * 2 - 1`` clipped to
[-1, 1] (1 channel, ``target="uptake"``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from dicom_node.inference.fusion import display_grey
from dicom_node.inference.fusion_style import FusionStyle
from dicom_node.inference.slice_context import group_rows

TARGETS = ("fusion", "uptake")
SPLITS = ("train", "val", "test")
OPTIONAL_ARRAYS = ("t1c_backdrop", "uptake", "pet_suv", "oracle_fusion", "oracle_uptake", "tumour_labels",
                   "brain_mask", "striatum_mask", "oedema")


class DatasetError(Exception):
    """The dataset folder is missing a file or holds something unexpected."""


@dataclass
class PairedDataset:
    """All arrays of one dataset folder, in memory."""

    path: Path
    t1c: NDArray[np.float16]
    fusion_rgb: NDArray[np.uint8] | None  # None in a lean dataset (uptake training only)
    patient_id: NDArray[np.str_]
    study_uid: NDArray[np.str_]
    slice_position_mm: NDArray[np.float32]
    has_tumour: NDArray[np.bool_]
    splits: dict[str, Any]
    info: dict[str, Any]
    extra: dict[str, NDArray[Any]] = field(default_factory=dict)
    _context: dict[int, NDArray[np.int64]] = field(default_factory=dict, repr=False)

    def context_rows(self, context_slices: int) -> NDArray[np.int64]:
        """(N, 2k+1) rows of every pair's T1C neighbours within its study (cached)."""
        if context_slices not in self._context:
            self._context[context_slices] = group_rows(self.study_uid, self.slice_position_mm,
                                                       context_slices)
        return self._context[context_slices]

    def slice_spacing_mm(self) -> float:
        """The median distance between consecutive pairs of a study (0 if unknown)."""
        gaps: list[NDArray[np.float32]] = []
        for study in np.unique(self.study_uid):
            positions = np.sort(self.slice_position_mm[self.study_uid == study])
            gaps.append(np.diff(positions))
        joined = np.concatenate(gaps) if gaps else np.zeros(0, dtype=np.float32)
        joined = joined[joined > 0]
        return round(float(np.median(joined)), 3) if joined.size else 0.0

    def input_grey(self, idx: NDArray[np.int64], context_slices: int = 0) -> NDArray[np.float32]:
        """Grey T1C of slices ``idx``: (B, S, S), or (B, 2k+1, S, S) with neighbours."""
        if context_slices == 0:
            return self.t1c[idx].astype(np.float32)
        return self.t1c[self.context_rows(context_slices)[idx]].astype(np.float32)

    @property
    def fusion(self) -> NDArray[np.uint8]:
        """(N, S, S, 3) RGB fusion targets; a lean dataset has none."""
        if self.fusion_rgb is None:
            raise DatasetError(f"dataset {self.path} is lean (no RGB fusion); it serves "
                               "uptake training only")
        return self.fusion_rgb

    @property
    def size(self) -> int:
        return int(self.t1c.shape[-1])

    @property
    def fusion_style(self) -> FusionStyle:
        return FusionStyle.from_dict(self.info.get("fusion_style") or {})

    @property
    def t1c_ceiling(self) -> float:
        """The clip of the stored T1C grey (``dataset.json``; 1 for datasets before it)."""
        return float(self.info.get("t1c_ceiling", 1.0))

    @property
    def split_method(self) -> str:
        return str(self.splits.get("method", "unknown"))

    def indices(self, split: str) -> NDArray[np.int64]:
        if split not in SPLITS:
            raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
        return np.asarray(self.splits.get(split, []), dtype=np.int64)

    def has(self, name: str) -> bool:
        return name in self.extra

    def get(self, name: str) -> NDArray[Any]:
        if name not in self.extra:
            raise DatasetError(f"dataset {self.path} has no {name!r} array (phantoms only)")
        return self.extra[name]

    def backdrop(self, idx: NDArray[np.int64]) -> NDArray[np.float32]:
        """The grey T1C under the fusion of slices ``idx`` in [0, 1]: what a synthetic
        fusion is drawn over so that it matches the real fusion where no uptake shows."""
        if "t1c_backdrop" in self.extra:
            return self.extra["t1c_backdrop"][idx].astype(np.float32) / 255.0
        return display_grey(self.t1c[idx])  # the stored grey may keep headroom above 1

    def summary(self, split: str) -> dict[str, int]:
        idx = self.indices(split)
        return {"pairs": len(idx), "patients": len(set(self.patient_id[idx].tolist())),
                "tumour_pairs": int(self.has_tumour[idx].sum())}


def load_dataset(path: Path) -> PairedDataset:
    """Read ``pairs.npz``, ``splits.json`` and ``dataset.json`` of a dataset folder."""
    pairs = path / "pairs.npz"
    for required in (pairs, path / "splits.json", path / "dataset.json"):
        if not required.is_file():
            raise DatasetError(f"dataset file missing: {required}")
    with np.load(pairs, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    needed = ["t1c", "patient_id", "study_uid", "slice_position_mm", "has_tumour"]
    if "uptake" not in arrays:  # only a lean phantom dataset may leave out the fusion
        needed.append("fusion")
    for name in needed:
        if name not in arrays:
            raise DatasetError(f"{pairs} has no {name!r} array")
    t1c, fusion = arrays["t1c"], arrays.get("fusion")
    n, size = t1c.shape[0], t1c.shape[-1]
    if t1c.shape != (n, size, size) or (
            fusion is not None and fusion.shape != (n, size, size, 3)):
        raise DatasetError(f"{pairs}: t1c {t1c.shape} / fusion "
                           f"{None if fusion is None else fusion.shape} are not "
                           "(N, S, S) / (N, S, S, 3)")
    splits = json.loads((path / "splits.json").read_text())
    info = json.loads((path / "dataset.json").read_text())
    return PairedDataset(
        path=path,
        t1c=t1c.astype(np.float16, copy=False),
        fusion_rgb=None if fusion is None else fusion.astype(np.uint8, copy=False),
        patient_id=arrays["patient_id"].astype(str),
        study_uid=arrays["study_uid"].astype(str),
        slice_position_mm=arrays["slice_position_mm"].astype(np.float32),
        has_tumour=arrays["has_tumour"].astype(bool),
        splits=splits,
        info=info,
        extra={name: arrays[name] for name in OPTIONAL_ARRAYS if name in arrays},
    )


def input_tensor(t1c: NDArray[np.floating]) -> torch.Tensor:
    """(B, S, S) or (B, C, S, S) grey T1C in [0, 1] -> (B, C, S, S) float32 in [-1, 1]."""
    x = torch.from_numpy(np.asarray(t1c, dtype=np.float32))
    x = x * 2.0 - 1.0
    return x.unsqueeze(1) if x.ndim == 3 else x


def uptake_array(data: PairedDataset) -> str:
    """The array an uptake model learns: ``pet_suv``, the PET series as measured (SUVbw
    by the book, resampled into the T1C planes: what a site's exports hold, and a
    scanner-layout phantom's), where the dataset has it; else ``uptake`` (a same-grid
    phantom's PET, which is the same noisy uptake on the T1C grid)."""
    if data.has("pet_suv"):
        return "pet_suv"
    if data.has("uptake"):
        return "uptake"
    raise DatasetError(f"{data.path} has neither a 'pet_suv' nor an 'uptake' array")


def target_tensor(data: PairedDataset, idx: NDArray[np.int64], target: str,
                  uptake_scale: float = 4.0) -> torch.Tensor:
    """The network target of slices ``idx``, channels first, in [-1, 1]."""
    if target == "fusion":
        rgb = torch.from_numpy(data.fusion[idx].astype(np.float32) / 255.0)
        return (rgb * 2.0 - 1.0).permute(0, 3, 1, 2).contiguous()
    if target == "uptake":
        up = torch.from_numpy(data.get(uptake_array(data))[idx].astype(np.float32))
        return (up / uptake_scale * 2.0 - 1.0).clamp(-1.0, 1.0).unsqueeze(1)
    raise DatasetError(f"target must be one of {TARGETS}, got {target!r}")


def output_channels(target: str) -> int:
    return 3 if target == "fusion" else 1


def batch(data: PairedDataset, idx: NDArray[np.int64], target: str,
          uptake_scale: float = 4.0, context_slices: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) tensors of slices ``idx``."""
    return (input_tensor(data.input_grey(idx, context_slices)),
            target_tensor(data, idx, target, uptake_scale))


ENHANCING_T1C = 0.95  # network-input T1C (0..ceiling); see non_enhancing_sections


def non_enhancing_sections(labels: NDArray[np.integer], t1c: NDArray[np.floating],
                           enhancing_t1c: float = ENHANCING_T1C) -> NDArray[np.bool_]:
    """(B, S, S) bool: the pixels of each lesion cross-section whose T1C never reaches
    ``enhancing_t1c`` (the network's input, windowed so that white matter is about 1):
    a tumour that does not enhance, which the T1C shows only as a faint dark area. On the
    phantom training cohort the per-section maxima fall in two groups, below 0.9 and
    above 1.0."""
    dark = np.zeros(labels.shape, dtype=bool)
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = labels == value
        peak = np.where(mask, t1c, -np.inf).reshape(len(labels), -1).max(axis=1)
        dark |= mask & (peak < enhancing_t1c)[:, None, None]
    return dark


def lesion_gain(labels: NDArray[np.integer], small_lesion_area_px: int, max_gain: float,
                t1c: NDArray[np.floating] | None = None, non_enhancing_gain: float = 1.0,
                enhancing_t1c: float = ENHANCING_T1C) -> NDArray[np.float32]:
    """Per-pixel gain (B, S, S) for small lesions: a lesion whose cross-section on the slice
    covers ``a`` pixels gets ``clip(small_lesion_area_px / a, 1, max_gain)`` on its
    pixels, 1 elsewhere, so that a 20-pixel lesion weighs about as much in the loss as a
    large one instead of a hundredth of it. ``small_lesion_area_px`` 0 switches it off.

    With ``t1c`` and ``non_enhancing_gain``, a non-enhancing cross-section
    (:func:`non_enhancing_sections`) gets that gain on top, the product capped at the
    larger of the two maxima."""
    gain = np.ones(labels.shape, dtype=np.float32)
    if small_lesion_area_px > 0:
        for value in np.unique(labels):
            if value == 0:
                continue
            mask = labels == value
            area = mask.reshape(len(labels), -1).sum(axis=1).astype(np.float32)
            per_slice = np.clip(small_lesion_area_px / np.maximum(area, 1.0), 1.0, max_gain)
            gain = np.where(mask, np.maximum(gain, per_slice[:, None, None]), gain)
    if t1c is not None and non_enhancing_gain != 1.0:
        cap = max(max_gain if small_lesion_area_px > 0 else 1.0, non_enhancing_gain)
        dark = non_enhancing_sections(labels, t1c.astype(np.float32), enhancing_t1c)
        gain = np.where(dark, np.minimum(gain * non_enhancing_gain, cap), gain)
    return gain.astype(np.float32)


def l1_weights(data: PairedDataset, idx: NDArray[np.int64], tumour_weight: float,
               margin_px: int, small_lesion_area_px: int = 0,
               small_lesion_max_gain: float = 1.0, non_enhancing_gain: float = 1.0,
               enhancing_t1c: float = ENHANCING_T1C) -> torch.Tensor:
    """Per-pixel L1 weights (B, 1, S, S): ``tumour_weight`` on the tumour masks grown by
    ``margin_px`` pixels (where the blurred PET uptake of a lesion lies), 1 elsewhere;
    with ``small_lesion_area_px`` or ``non_enhancing_gain``, a lesion's weight is raised
    by its :func:`lesion_gain` (grown with it).

    Needs the dataset's ``tumour_labels`` (phantoms, or a site's segmentations).
    """
    labels = data.get("tumour_labels")[idx]
    t1c = data.t1c[idx] if non_enhancing_gain != 1.0 else None
    gain = lesion_gain(labels, small_lesion_area_px, small_lesion_max_gain, t1c,
                       non_enhancing_gain, enhancing_t1c)
    lesion = torch.from_numpy(np.where(labels > 0, float(tumour_weight) * gain, 0.0)
                              .astype(np.float32)).unsqueeze(1)
    if margin_px > 0:
        lesion = F.max_pool2d(lesion, kernel_size=2 * margin_px + 1, stride=1,
                              padding=margin_px)
    return torch.clamp(lesion, min=1.0) if tumour_weight >= 1.0 else torch.where(
        lesion > 0, lesion, torch.ones_like(lesion))


def sampling_weights(has_tumour: NDArray[np.bool_], tumour_oversample: float,
                     slice_gain: NDArray[np.float32] | None = None) -> torch.Tensor:
    """Per-slice sampling weight: tumour slices ``tumour_oversample`` times as likely,
    and with ``slice_gain`` (a slice's largest small-lesion gain) that many times more."""
    weights = np.where(has_tumour, float(tumour_oversample), 1.0)
    if slice_gain is not None:
        weights = weights * slice_gain
    return torch.from_numpy(weights.astype(np.float64))


def lesion_slice_gain(data: PairedDataset, idx: NDArray[np.int64],
                      small_lesion_area_px: int, max_gain: float,
                      chunk: int = 2048, non_enhancing_gain: float = 1.0,
                      enhancing_t1c: float = ENHANCING_T1C) -> NDArray[np.float32]:
    """Each slice's largest :func:`lesion_gain` (1 for a slice without a lesion)."""
    labels = data.get("tumour_labels")
    t1c = data.t1c if non_enhancing_gain != 1.0 else None
    out = np.ones(len(idx), dtype=np.float32)
    for start in range(0, len(idx), chunk):
        rows = idx[start:start + chunk]
        part = labels[rows]
        out[start:start + chunk] = lesion_gain(
            part, small_lesion_area_px, max_gain, None if t1c is None else t1c[rows],
            non_enhancing_gain, enhancing_t1c).reshape(len(part), -1).max(axis=1)
    return out


def epoch_order(n: int, weights: torch.Tensor | None, seed: int, epoch: int) -> torch.Tensor:
    """The positions (into the training split) drawn for one epoch, reproducible.

    Without weights, a permutation; with weights, ``n`` draws with replacement. The
    order depends only on (seed, epoch), which makes a resumed run skip exactly the
    batches it already trained on.
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if weights is None:
        return torch.randperm(n, generator=gen)
    return torch.multinomial(weights, n, replacement=True, generator=gen)
