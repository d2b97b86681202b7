"""Scanning a folder of DICOM studies for training: headers, the series to use, slice pairs.

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
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from dicom_node.config import SelectionConfig
from dicom_node.series.selection import select_headers
from dicom_node.series.volume import slice_normal

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


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
        normal = slice_normal(t1c[0].orientation)
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


# --- ground truth -----------------------------------------------------------------------------


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
