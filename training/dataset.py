"""``dicom-node-train dataset``: paired T1C / fusion slices from a folder of DICOM studies.

    dicom-node-train dataset --studies DIR --out DSDIR --size 128 [--split patient|slice]
                             [--seed 0] [--node-config config.toml]

Every file under ``DIR`` is read header-only first and grouped by study and series. In
each study the T1C series is a series the node itself would select
(:func:`dicom_node.series.selection.select_headers`, the rules of ``select_series``, with
the ``[selection]`` of ``--node-config``'s TOML or the node's defaults); among several, one
with a ContrastBolusAgent, then the one with more slices. A study without one is skipped
with the node's reason for each series of its modality. Its target is the study's RGB
Secondary Capture series (one whose description says "fusion" first) or, failing that, its
PET series (PT), which is resampled into the T1C plane and rendered with
:func:`dicom_node.inference.fusion.fuse`.

Slices are paired by position along the T1C slice normal (ImagePositionPatient . normal,
nearest target within half the T1C slice spacing). A Secondary Capture without geometry
is paired through its SourceImageSequence references to T1C instances, or else by equal
InstanceNumber. Unpaired T1C slices are skipped and listed in ``dataset.json``.

The T1C grey values are :func:`dicom_node.inference.fusion.window_t1c` over the whole series, then
:func:`dicom_node.inference.resampling.to_network` to the network size; the fusion is resampled per
channel the same way. A phantom study (``ground_truth.json`` with the study's UID in the
series folder or one of its parents, up to ``DIR``) also contributes uptake, the oracle
fusion (rendered with ``fuse()`` from ``oracle_uptake``) and masks (nearest neighbour).

On-disk format (the training code reads exactly this)::

    DSDIR/pairs.npz
        t1c               float16 (N, S, S)     windowed T1C in [0, 1]
        t1c_backdrop      uint8   (N, S, S)     the T1C as the fusion shows it: the windowed
                                                T1C as uint8 grey at the native matrix,
                                                resampled like the fusion (the exact pixels
                                                of the fusion where no uptake is drawn)
        fusion            uint8   (N, S, S, 3)  RGB fusion target
        patient_id        str     (N,)          PatientID of every pair
        study_uid         str     (N,)          StudyInstanceUID
        slice_position_mm float32 (N,)          ImagePositionPatient . T1C slice normal
        has_tumour        bool    (N,)          tumour on the slice (ground truth; else False)
      only when every study has ground truth:
        uptake            float16 (N, S, S)     noisy PET uptake (SUV-like)
        oracle_fusion     uint8   (N, S, S, 3)  fusion of the oracle uptake, rendered at the
                                                native matrix and resampled like the fusion
        oracle_uptake     float16 (N, S, S)     the oracle uptake, resampled like ``uptake``
                                                (evaluation renders it at the network size,
                                                exactly as it renders an uptake model's
                                                output)
        tumour_labels     uint8   (N, S, S)     0 none, k lesion k
        brain_mask, striatum_mask, oedema  bool (N, S, S)
    DSDIR/splits.json
        {"method": "patient"|"slice", "seed": int, "leaks_patients": bool,
         "train": [indices], "val": [...], "test": [...],
         "patients": {"train": [ids], "val": [...], "test": [...]}}
    DSDIR/dataset.json
        size, source dir, counts, fusion style, skipped studies and unpaired slices.

Splits are seeded. ``patient`` (default): patients shuffled, 1/10 to test, then 1/5 of
the rest to validation, every set getting at least one patient where there are enough.
``slice`` reproduces the published study's random slice split; it lets slices of one
patient sit in both train and test (``leaks_patients`` is true and a warning is shown).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from scipy import ndimage
from tqdm import tqdm

from dicom_node.config import SelectionConfig, load_config
from dicom_node.errors import ConfigError
from dicom_node.inference.fusion import fuse, to_uint8, window_t1c
from dicom_node.inference.fusion_style import FusionStyle
from dicom_node.inference.resampling import padding_for, to_network
from dicom_node.series.selection import select_headers
from storage.file_store import atomic_writer

logger = logging.getLogger(__name__)

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
SPLIT_METHODS = ("patient", "slice")
GROUND_TRUTH_ARRAYS = ("uptake", "oracle_fusion", "oracle_uptake", "tumour_labels",
                       "brain_mask", "striatum_mask", "oedema")


class PatientLeakWarning(UserWarning):
    """A split puts slices of one patient in more than one set."""


@dataclass(frozen=True)
class SliceHeader:
    """What the header of one instance says, read without pixel data."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    samples_per_pixel: int
    source_refs: tuple[str, ...]
    #: The header itself, for the node's selection rules (``select_headers``).
    header: Dataset = field(compare=False, repr=False)


@dataclass
class SeriesHeaders:
    uid: str
    modality: str
    description: str
    contrast_agent: str
    sop_class_uid: str
    slices: list[SliceHeader] = field(default_factory=list)


@dataclass
class StudyHeaders:
    uid: str
    patient_id: str
    series: dict[str, SeriesHeaders] = field(default_factory=dict)


@dataclass(frozen=True)
class Pairing:
    """Indices into the T1C and target slice lists, and T1C slices left unpaired."""

    pairs: tuple[tuple[int, int], ...]
    unpaired: tuple[int, ...]
    method: str


@dataclass
class StudyPairs:
    """Network-size arrays of one study's pairs."""

    patient_id: str
    study_uid: str
    t1c: NDArray[np.float16]
    t1c_backdrop: NDArray[np.uint8]
    fusion: NDArray[np.uint8]
    slice_position_mm: NDArray[np.float32]
    has_tumour: NDArray[np.bool_]
    ground_truth: dict[str, NDArray[np.generic]] | None
    unpaired: list[dict[str, object]]
    target: str
    pairing: str


@dataclass(frozen=True)
class Splits:
    method: str
    seed: int
    leaks_patients: bool
    train: list[int]
    val: list[int]
    test: list[int]
    patients: dict[str, list[str]]

    def as_dict(self) -> dict[str, object]:
        return {"method": self.method, "seed": self.seed, "leaks_patients": self.leaks_patients,
                "train": self.train, "val": self.val, "test": self.test,
                "patients": self.patients}


# --- scanning ---------------------------------------------------------------------------------


def _floats(value: object) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None


def read_header(path: Path) -> tuple[str, str, str, SeriesHeaders, SliceHeader] | None:
    """(study uid, patient id, series uid, series, slice) of a DICOM file, or None."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError):
        return None
    if "PixelData" not in ds and "SOPInstanceUID" not in ds:
        return None
    study = str(ds.get("StudyInstanceUID", ""))
    series_uid = str(ds.get("SeriesInstanceUID", ""))
    if not study or not series_uid:
        return None
    position = _floats(ds.get("ImagePositionPatient"))
    spacing = _floats(ds.get("PixelSpacing"))
    refs = tuple(str(item.get("ReferencedSOPInstanceUID", ""))
                 for item in ds.get("SourceImageSequence", []))
    header = SliceHeader(
        path=path,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        instance_number=int(ds.get("InstanceNumber", 0) or 0),
        position=position if position is not None and len(position) == 3 else None,
        orientation=_floats(ds.get("ImageOrientationPatient")),
        pixel_spacing=spacing if spacing is not None and len(spacing) == 2 else None,
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1),
        source_refs=refs,
        header=ds,
    )
    series = SeriesHeaders(
        uid=series_uid,
        modality=str(ds.get("Modality", "")),
        description=str(ds.get("SeriesDescription", "")),
        contrast_agent=str(ds.get("ContrastBolusAgent", "") or ""),
        sop_class_uid=header.sop_class_uid,
    )
    return study, str(ds.get("PatientID", "")), series_uid, series, header


def scan_studies(root: Path, progress: bool = True) -> list[StudyHeaders]:
    """Every DICOM study under ``root``, grouped by series, header-only."""
    files = sorted(p for p in Path(root).rglob("*")
                   if p.is_file() and not p.name.startswith(".")
                   and not p.name.startswith("ground_truth."))
    studies: dict[str, StudyHeaders] = {}
    for path in tqdm(files, desc="headers", unit="file", disable=not progress):
        found = read_header(path)
        if found is None:
            continue
        study_uid, patient_id, series_uid, series, header = found
        study = studies.setdefault(study_uid, StudyHeaders(uid=study_uid, patient_id=patient_id))
        study.series.setdefault(series_uid, series).slices.append(header)
    return [studies[k] for k in sorted(studies)]


# --- selection --------------------------------------------------------------------------------


def slice_normal(orientation: Sequence[float]) -> NDArray[np.float64]:
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    normal = np.cross(row, col)
    return normal / (np.linalg.norm(normal) or 1.0)


def t1c_reason(series: SeriesHeaders, rules: SelectionConfig) -> str | None:
    """Why the node would not select the series (None: it would), or why its instances
    cannot be paired slice by slice (multi-frame or colour)."""
    selection = select_headers([(s.path, s.header) for s in series.slices], rules)
    if not selection.accepted:
        return selection.reason
    if any(s.position is None or s.samples_per_pixel != 1 for s in series.slices):
        return "multi-frame or colour instances: training pairs single-frame grey slices"
    return None


def is_fusion(series: SeriesHeaders) -> bool:
    """RGB Secondary Capture series."""
    return (series.sop_class_uid.startswith(SECONDARY_CAPTURE_PREFIX)
            and bool(series.slices) and series.slices[0].samples_per_pixel == 3)


def is_pet(series: SeriesHeaders) -> bool:
    return (series.modality == "PT" and bool(series.slices)
            and all(s.position is not None and s.orientation is not None for s in series.slices))


def choose_series(study: StudyHeaders, rules: SelectionConfig | None = None
                  ) -> tuple[SeriesHeaders, SeriesHeaders, str] | str:
    """(T1C series, target series, "fusion" | "pet"), or the reason the study is skipped.

    The T1C series is one the node would select with ``rules`` (default: the node's
    defaults)."""
    rules = rules or SelectionConfig()
    t1c: list[SeriesHeaders] = []
    rejected: list[str] = []
    for series in study.series.values():
        if series.modality not in rules.modalities:
            continue
        reason = t1c_reason(series, rules)
        if reason is None:
            t1c.append(series)
        else:
            rejected.append(f"{series.description!r}: {reason}")
    if not t1c:
        return ("no series the node would select as axial post-contrast T1"
                + (f" ({'; '.join(rejected)})" if rejected else
                   f" (no {'/'.join(rules.modalities)} series)"))
    chosen = max(t1c, key=lambda s: (bool(s.contrast_agent.strip()), len(s.slices)))
    fusions = [s for s in study.series.values() if is_fusion(s)]
    if fusions:
        target = max(fusions, key=lambda s: ("fusion" in s.description.lower(), len(s.slices)))
        return chosen, target, "fusion"
    pets = [s for s in study.series.values() if is_pet(s)]
    if pets:
        return chosen, max(pets, key=lambda s: len(s.slices)), "pet"
    return "no fusion (RGB Secondary Capture) or PET series"


# --- pairing ----------------------------------------------------------------------------------


def t1c_order(t1c: Sequence[SliceHeader]) -> tuple[NDArray[np.float64], float]:
    """Positions along the T1C normal (per slice, input order) and the slice spacing."""
    first = t1c[0]
    assert first.orientation is not None
    normal = slice_normal(first.orientation)
    positions = np.array([float(np.dot(s.position, normal)) for s in t1c  # type: ignore[arg-type]
                          ], dtype=np.float64)
    diffs = np.diff(np.sort(positions))
    diffs = diffs[diffs > 1e-3]
    spacing = float(np.median(diffs)) if diffs.size else 1.0
    return positions, spacing


def pair_slices(t1c: Sequence[SliceHeader], target: Sequence[SliceHeader]) -> Pairing:
    """Pair T1C slices with target slices (see the module docstring for the rules)."""
    positions, spacing = t1c_order(t1c)
    pairs: list[tuple[int, int]] = []
    if all(s.position is not None and s.orientation is not None for s in target) and target:
        normal = slice_normal(t1c[0].orientation)  # type: ignore[arg-type]
        target_pos = np.array([float(np.dot(s.position, normal)) for s in target  # type: ignore[arg-type]
                               ])
        for i, p in enumerate(positions):
            j = int(np.argmin(np.abs(target_pos - p)))
            if abs(target_pos[j] - p) <= spacing / 2.0 + 1e-3:
                pairs.append((i, j))
        method = "position"
    else:
        by_uid = {s.sop_instance_uid: i for i, s in enumerate(t1c)}
        referenced = {by_uid[ref]: j for j, s in enumerate(target) for ref in s.source_refs
                      if ref in by_uid}
        if referenced:
            pairs = sorted(referenced.items())
            method = "source-reference"
        else:
            by_number = {s.instance_number: j for j, s in enumerate(target)}
            pairs = [(i, by_number[s.instance_number]) for i, s in enumerate(t1c)
                     if s.instance_number in by_number]
            method = "instance-number"
    paired = {i for i, _ in pairs}
    unpaired = tuple(i for i in range(len(t1c)) if i not in paired)
    order = np.argsort(positions, kind="stable")
    rank = {int(i): r for r, i in enumerate(order)}
    pairs.sort(key=lambda ij: rank[ij[0]])
    return Pairing(pairs=tuple(pairs), unpaired=tuple(sorted(unpaired, key=lambda i: rank[i])),
                   method=method)


# --- pixels -----------------------------------------------------------------------------------


def _read_pixels(path: Path) -> tuple[NDArray[np.float32], pydicom.Dataset]:
    ds = pydicom.dcmread(path)
    data = np.asarray(ds.pixel_array)
    if data.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1:
        data = data[0]
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    values = data.astype(np.float32)
    if data.ndim == 2 and (slope != 1.0 or intercept != 0.0):
        values = values * np.float32(slope) + np.float32(intercept)
    return values, ds


def _resample_into(pet: NDArray[np.float32], pet_header: SliceHeader, t1c_header: SliceHeader,
                   shape: tuple[int, int]) -> NDArray[np.float32]:
    """PET slice values at the T1C slice's pixel centres (in-plane, bilinear)."""
    assert t1c_header.orientation and t1c_header.position and t1c_header.pixel_spacing
    assert pet_header.orientation and pet_header.position and pet_header.pixel_spacing
    t_row, t_col = (np.asarray(t1c_header.orientation[:3]), np.asarray(t1c_header.orientation[3:]))
    p_row, p_col = (np.asarray(pet_header.orientation[:3]), np.asarray(pet_header.orientation[3:]))
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    points = (np.asarray(t1c_header.position)[:, None, None]
              + t_row[:, None, None] * cols * t1c_header.pixel_spacing[1]
              + t_col[:, None, None] * rows * t1c_header.pixel_spacing[0])
    offset = points - np.asarray(pet_header.position)[:, None, None]
    pet_c = np.tensordot(p_row, offset, axes=1) / pet_header.pixel_spacing[1]
    pet_r = np.tensordot(p_col, offset, axes=1) / pet_header.pixel_spacing[0]
    return np.asarray(ndimage.map_coordinates(pet, [pet_r, pet_c], order=1, cval=0.0),
                      dtype=np.float32)


def rgb_to_network(rgb: NDArray[np.uint8], size: int) -> NDArray[np.uint8]:
    """(N, H, W, 3) uint8 -> (N, size, size, 3) uint8, per channel like the T1C."""
    n, height, width, _ = rgb.shape
    planes = np.moveaxis(rgb.astype(np.float32) / 255.0, -1, 1).reshape(n * 3, height, width)
    resized, _ = to_network(planes, size)
    out = resized[:, 0].reshape(n, 3, size, size).permute(0, 2, 3, 1).numpy()
    return to_uint8(out)


def grey_to_network(grey: NDArray[np.floating], size: int) -> NDArray[np.uint8]:
    """(N, H, W) windowed grey -> (N, size, size) uint8 as a fusion image's grey pixels:
    quantised at the native matrix, then resampled like :func:`rgb_to_network`."""
    resized, _ = to_network(to_uint8(grey).astype(np.float32) / 255.0, size)
    return to_uint8(resized[:, 0].numpy())


def nearest_to_network(volume: NDArray[np.generic], size: int) -> NDArray[np.generic]:
    """(N, H, W) labels/masks -> (N, size, size), padded like to_network, nearest neighbour."""
    n, height, width = volume.shape
    pad = padding_for(height, width)
    square = np.zeros((n, pad.side, pad.side), dtype=volume.dtype)
    square[:, pad.top:pad.top + height, pad.left:pad.left + width] = volume
    if pad.side == size:
        return square
    tensor = torch.from_numpy(square.astype(np.float32))[:, None]
    resized = F.interpolate(tensor, size=(size, size), mode="nearest")[:, 0].numpy()
    return resized.astype(volume.dtype)


def find_ground_truth(study: StudyHeaders, paths: Iterable[Path], root: Path
                      ) -> Path | None:
    """The ground_truth.npz of a phantom study: beside its files or in a parent up to root."""
    root = Path(root).resolve()
    seen: set[Path] = set()
    for path in paths:
        folder = Path(path).resolve().parent
        while folder not in seen:
            seen.add(folder)
            doc = folder / "ground_truth.json"
            if doc.is_file() and (folder / "ground_truth.npz").is_file():
                try:
                    uid = json.loads(doc.read_text()).get("study_instance_uid")
                except (OSError, json.JSONDecodeError):
                    uid = None
                if uid == study.uid:
                    return folder / "ground_truth.npz"
            if folder == root or folder.parent == folder:
                break
            folder = folder.parent
    return None


def build_study_pairs(study: StudyHeaders, root: Path, size: int, style: FusionStyle,
                      rules: SelectionConfig | None = None) -> StudyPairs | str:
    """The network-size pairs of one study, or why it was skipped."""
    chosen = choose_series(study, rules)
    if isinstance(chosen, str):
        return chosen
    t1c_series, target_series, target_kind = chosen
    t1c = t1c_series.slices
    target = target_series.slices
    pairing = pair_slices(t1c, target)
    positions, _ = t1c_order(t1c)
    unpaired = [{"study_uid": study.uid, "patient_id": study.patient_id,
                 "series_uid": t1c_series.uid, "sop_instance_uid": t1c[i].sop_instance_uid,
                 "instance_number": t1c[i].instance_number,
                 "position_mm": round(float(positions[i]), 3),
                 "reason": f"no {target_kind} slice ({pairing.method})"}
                for i in pairing.unpaired]
    if not pairing.pairs:
        return f"no slice of the {target_kind} series pairs with the T1C series"

    read = [_read_pixels(s.path) for s in t1c]
    shapes = {v.shape for v, _ in read}
    if len(shapes) != 1:
        return f"T1C slices differ in matrix size: {sorted(shapes)}"
    volume = np.stack([v for v, _ in read])
    grey = window_t1c(volume)
    t1c_idx = [i for i, _ in pairing.pairs]
    grey_paired = grey[t1c_idx]

    fusion_native: NDArray[np.uint8]
    if target_kind == "fusion":
        raw = np.stack([_read_pixels(target[j].path)[0] for _, j in pairing.pairs])
        fusion_native = np.clip(raw, 0, 255).astype(np.uint8)
        if fusion_native.ndim != 4 or fusion_native.shape[-1] != 3:
            return f"fusion pixels have shape {fusion_native.shape}, expected (H, W, 3)"
    else:
        uptake = np.stack([
            _resample_into(_read_pixels(target[j].path)[0], target[j], t1c[i], grey.shape[1:])
            for i, j in pairing.pairs])
        fusion_native = to_uint8(fuse(grey_paired, uptake, style))

    t1c_net = to_network(grey_paired, size)[0][:, 0].numpy()
    ground_truth = None
    has_tumour = np.zeros(len(t1c_idx), dtype=bool)
    npz_path = find_ground_truth(study, [t1c[0].path], root)
    if npz_path is not None:
        ground_truth, has_tumour = _ground_truth_arrays(npz_path, t1c, t1c_idx, grey, size,
                                                         style)
    return StudyPairs(
        patient_id=study.patient_id, study_uid=study.uid,
        t1c=np.clip(t1c_net, 0.0, 1.0).astype(np.float16),
        t1c_backdrop=grey_to_network(grey_paired, size),
        fusion=rgb_to_network(fusion_native, size),
        slice_position_mm=positions[t1c_idx].astype(np.float32),
        has_tumour=has_tumour, ground_truth=ground_truth, unpaired=unpaired,
        target=target_kind, pairing=pairing.method)


def _ground_truth_arrays(npz_path: Path, t1c: Sequence[SliceHeader], t1c_idx: list[int],
                         grey: NDArray[np.float32], size: int, style: FusionStyle
                         ) -> tuple[dict[str, NDArray[np.generic]] | None, NDArray[np.bool_]]:
    """Ground-truth arrays of the paired slices; the npz's slice k is InstanceNumber k + 1."""
    with np.load(npz_path) as gt:
        arrays = {key: gt[key] for key in gt.files}
    slices = [t1c[i].instance_number - 1 for i in t1c_idx]
    n_gt = arrays["uptake"].shape[0]
    if any(k < 0 or k >= n_gt for k in slices) or arrays["uptake"].shape[1:] != grey.shape[1:]:
        logger.warning("ground truth %s does not match its T1C series; ignored", npz_path)
        return None, np.zeros(len(t1c_idx), dtype=bool)
    uptake = arrays["uptake"][slices].astype(np.float32)
    oracle = arrays["oracle_uptake"][slices].astype(np.float32)
    labels = arrays["tumour_labels"][slices]
    out: dict[str, NDArray[np.generic]] = {
        "uptake": to_network(uptake, size)[0][:, 0].numpy().astype(np.float16),
        "oracle_fusion": rgb_to_network(to_uint8(fuse(grey[t1c_idx], oracle, style)), size),
        "oracle_uptake": to_network(oracle, size)[0][:, 0].numpy().astype(np.float16),
        "tumour_labels": nearest_to_network(labels.astype(np.uint8), size),
    }
    for key in ("brain_mask", "striatum_mask", "oedema"):
        out[key] = nearest_to_network(arrays[key][slices].astype(bool), size)
    return out, labels.reshape(len(slices), -1).any(axis=1)


# --- splits -----------------------------------------------------------------------------------


def split_indices(patient_ids: Sequence[str], method: str = "patient", seed: int = 0) -> Splits:
    """Seeded train/val/test split of pair indices: 9:1 train/test, then train 4:1 train/val."""
    if method not in SPLIT_METHODS:
        raise ValueError(f"split method must be one of {SPLIT_METHODS}, got {method!r}")
    rng = np.random.default_rng(seed)
    ids = np.asarray(patient_ids, dtype=str)
    sets: dict[str, list[int]] = {}
    if method == "patient":
        patients = sorted(set(ids.tolist()))
        order = [patients[i] for i in rng.permutation(len(patients))]
        n_test, n_val = _split_counts(len(order))
        groups = {"test": order[:n_test], "val": order[n_test:n_test + n_val],
                  "train": order[n_test + n_val:]}
        for name, members in groups.items():
            chosen = set(members)
            sets[name] = [int(i) for i in np.flatnonzero([p in chosen for p in ids])]
    else:
        order_i = rng.permutation(len(ids))
        n_test = round(len(ids) / 10)
        n_val = round((len(ids) - n_test) / 5)
        sets = {"test": sorted(int(i) for i in order_i[:n_test]),
                "val": sorted(int(i) for i in order_i[n_test:n_test + n_val]),
                "train": sorted(int(i) for i in order_i[n_test + n_val:])}
    patients_of = {name: sorted(set(ids[idx].tolist())) for name, idx in sets.items()}
    shared = ((set(patients_of["train"]) & set(patients_of["test"]))
              | (set(patients_of["train"]) & set(patients_of["val"]))
              | (set(patients_of["val"]) & set(patients_of["test"])))
    leaks = method == "slice" or bool(shared)
    if method == "slice":
        warnings.warn(
            "slice-level split (as in the published study): slices of one patient are in "
            f"more than one of train/val/test ({len(shared)} patients shared), so test "
            "metrics overestimate performance on new patients", PatientLeakWarning,
            stacklevel=2)
    return Splits(method=method, seed=seed, leaks_patients=leaks, train=sets["train"],
                  val=sets["val"], test=sets["test"],
                  patients={k: patients_of[k] for k in ("train", "val", "test")})


def _split_counts(n_patients: int) -> tuple[int, int]:
    """(test, val) patient counts: 1/10 to test, 1/5 of the rest to val, each >= 1 if n >= 3."""
    if n_patients < 2:
        return 0, 0
    n_test = max(1, round(n_patients / 10))
    rest = n_patients - n_test
    n_val = max(1, round(rest / 5)) if rest >= 2 else 0
    return n_test, n_val


# --- writing ----------------------------------------------------------------------------------


def _atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    with atomic_writer(path) as handle:
        write(handle)


def _write_json(path: Path, document: dict[str, object]) -> None:
    data = json.dumps(document, indent=2).encode()
    _atomic(path, lambda handle: handle.write(data))


@dataclass(frozen=True)
class DatasetSummary:
    out_dir: Path
    pairs: int
    studies_used: int
    skipped: list[dict[str, str]]
    unpaired: list[dict[str, object]]
    splits: Splits
    has_tumour: NDArray[np.bool_]
    patient_id: NDArray[np.str_]


def build_dataset(studies_dir: Path, out_dir: Path, size: int = 128, split: str = "patient",
                  seed: int = 0, style: FusionStyle | None = None, progress: bool = True,
                  workers: int = 1, selection: SelectionConfig | None = None
                  ) -> DatasetSummary:
    """Scan, pair, resample, split and write a dataset (see the module docstring).

    ``workers`` > 1 builds that many studies at once in worker processes; the result is
    the same as with one. ``selection``: the node's series selection rules (default: the
    node's defaults).
    """
    style = style or FusionStyle()
    if size < 16:
        raise ValueError("size must be at least 16")
    studies = scan_studies(studies_dir, progress=progress)
    built: list[StudyPairs] = []
    skipped: list[dict[str, str]] = []
    build = partial(build_study_pairs, root=Path(studies_dir), size=size, style=style,
                    rules=selection or SelectionConfig())
    pool_or_none = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=torch.set_num_threads, initargs=(1,))
                    if workers > 1 else nullcontext())
    with pool_or_none as pool:
        results: Iterable[StudyPairs | str] = (
            pool.map(build, studies) if pool is not None else map(build, studies))
        collected = list(tqdm(zip(studies, results, strict=True), total=len(studies),
                              desc="studies", unit="study", disable=not progress))
    for study, result in collected:
        if isinstance(result, str):
            skipped.append({"study_uid": study.uid, "patient_id": study.patient_id,
                            "reason": result})
            logger.info("study %s skipped: %s", study.uid, result)
        else:
            built.append(result)
    if not built:
        reasons = "; ".join(sorted({s["reason"] for s in skipped})) or "no DICOM study"
        raise ValueError(f"no usable study under {studies_dir}: {reasons}")
    arrays: dict[str, NDArray[np.generic]] = {
        "t1c": np.concatenate([b.t1c for b in built]),
        "t1c_backdrop": np.concatenate([b.t1c_backdrop for b in built]),
        "fusion": np.concatenate([b.fusion for b in built]),
        "patient_id": np.array([b.patient_id for b in built for _ in range(len(b.t1c))],
                               dtype=str),
        "study_uid": np.array([b.study_uid for b in built for _ in range(len(b.t1c))],
                              dtype=str),
        "slice_position_mm": np.concatenate([b.slice_position_mm for b in built]),
        "has_tumour": np.concatenate([b.has_tumour for b in built]),
    }
    with_truth = [b.ground_truth is not None for b in built]
    if all(with_truth):
        for key in GROUND_TRUTH_ARRAYS:
            arrays[key] = np.concatenate([b.ground_truth[key] for b in built  # type: ignore[index]
                                          ])
    elif any(with_truth):
        logger.warning("only %d of %d studies have ground truth; ground truth left out",
                       sum(with_truth), len(built))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatientLeakWarning)
        splits = split_indices([str(p) for p in arrays["patient_id"]], split, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic(out / "pairs.npz",
            lambda handle: np.savez_compressed(handle, **arrays))  # type: ignore[arg-type]
    _write_json(out / "splits.json", splits.as_dict())
    unpaired = [u for b in built for u in b.unpaired]
    _write_json(out / "dataset.json", {
        "size": size,
        "source_dir": str(Path(studies_dir).resolve()),
        "counts": {"studies_found": len(studies), "studies_used": len(built),
                   "studies_skipped": len(skipped), "pairs": len(arrays["t1c"]),
                   "patients": len(set(arrays["patient_id"].tolist())),
                   "tumour_slices": int(arrays["has_tumour"].sum()),
                   "unpaired_t1c_slices": len(unpaired)},
        "ground_truth": all(with_truth),
        "fusion_style": style.as_dict(),
        "studies": [{"study_uid": b.study_uid, "patient_id": b.patient_id, "target": b.target,
                     "pairing": b.pairing, "pairs": len(b.t1c)} for b in built],
        "skipped_studies": skipped,
        "unpaired_slices": unpaired,
    })
    return DatasetSummary(out_dir=out, pairs=len(arrays["t1c"]), studies_used=len(built),
                          skipped=skipped, unpaired=unpaired, splits=splits,
                          has_tumour=np.asarray(arrays["has_tumour"], dtype=bool),
                          patient_id=np.asarray(arrays["patient_id"], dtype=str))


def load_pairs(dataset_dir: Path) -> dict[str, NDArray[Any]]:
    """All arrays of ``pairs.npz`` (no pickled objects)."""
    with np.load(Path(dataset_dir) / "pairs.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def summary_table(summary: DatasetSummary) -> str:
    lines = [f"{'split':<6} {'pairs':>6} {'patients':>9} {'tumour slices':>14}"]
    for name in ("train", "val", "test"):
        idx = getattr(summary.splits, name)
        lines.append(f"{name:<6} {len(idx):>6} {len(set(summary.patient_id[idx].tolist())):>9} "
                     f"{int(summary.has_tumour[idx].sum()):>14}")
    lines.append(f"{'all':<6} {summary.pairs:>6} {len(set(summary.patient_id.tolist())):>9} "
                 f"{int(summary.has_tumour.sum()):>14}")
    return "\n".join(lines)


# --- CLI --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--studies", type=Path, required=True, help="folder of DICOM studies")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    parser.add_argument("--size", type=int, default=128, help="network size (default 128)")
    parser.add_argument("--split", choices=SPLIT_METHODS, default="patient",
                        help="patient (default) or slice (the paper's; leaks patients)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument("--workers", type=int, default=1,
                        help="studies built at once in worker processes (default 1)")
    parser.add_argument("--node-config", type=Path, default=None, metavar="PATH",
                        help="the node's TOML: choose T1C series with its [selection] rules "
                             "(default: the node's default rules)")


def run(args: argparse.Namespace) -> int:
    try:
        selection = (load_config(args.node_config).selection
                     if args.node_config is not None else SelectionConfig())
    except ConfigError as exc:
        print(f"dataset: --node-config: {exc}", file=sys.stderr)
        return 2
    try:
        summary = build_dataset(args.studies, args.out, size=args.size, split=args.split,
                                seed=args.seed, workers=max(1, args.workers),
                                selection=selection)
    except ValueError as exc:
        print(f"dataset: {exc}", file=sys.stderr)
        return 2
    print()
    print(summary_table(summary))
    print(f"{summary.studies_used} studies used, {len(summary.skipped)} skipped, "
          f"{len(summary.unpaired)} unpaired T1C slices skipped; written to {summary.out_dir}")
    for item in summary.skipped:
        print(f"  skipped study {item['study_uid']}: {item['reason']}")
    if summary.splits.leaks_patients:
        print(f"WARNING: --split {summary.splits.method} puts slices of the same patient in "
              "train, validation and test: test metrics are optimistic for new patients "
              "(use --split patient).", file=sys.stderr)
    return 0
