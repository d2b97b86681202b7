"""A received series as slices in space: headers, geometry and the pixel volume.

Classic single-frame MR instances give one slice each; an Enhanced MR instance
gives one slice per frame. Slices are sorted by their position along the slice
normal (not by InstanceNumber, which senders get wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset, dcmread


class VolumeError(Exception):
    """The series cannot be assembled into a volume (the reason says why)."""


@dataclass(frozen=True)
class SliceInfo:
    path: Path
    frame_index: int | None  # None: single-frame instance
    sop_uid: str
    sop_class_uid: str
    rows: int
    columns: int
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None

    @property
    def normal(self) -> NDArray[np.float64]:
        return slice_normal(self.orientation)


def slice_normal(orientation: Any) -> NDArray[np.float64]:
    """The unit slice normal (row x column direction) of an ImageOrientationPatient: the one
    place the node and training compute it (the receiver's header reader does the same
    product in plain Python, to stay free of numpy on its hot path)."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    return normal / norm if norm > 0 else normal


def _floats(value: Any, count: int, what: str) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{what} is not numeric: {value!r}") from exc
    if len(numbers) != count:
        raise VolumeError(f"{what} has {len(numbers)} values, expected {count}")
    return numbers


def checked(info: SliceInfo) -> SliceInfo:
    """The slice, if its geometry can place pixels in space: a matrix, finite positive
    pixel spacing, a finite position, and row and column directions that are unit vectors
    at right angles (PS3.3 C.7.6.2.1.1). Raises :class:`VolumeError` saying what is wrong.
    """
    where = f"instance {info.sop_uid}" + (f" frame {info.frame_index + 1}"
                                          if info.frame_index is not None else "")
    if info.rows <= 0 or info.columns <= 0:
        raise VolumeError(f"{where} has no pixel matrix (Rows {info.rows}, Columns "
                          f"{info.columns})")
    spacing = np.array(info.pixel_spacing)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise VolumeError(f"{where}: PixelSpacing {list(info.pixel_spacing)} is not two "
                          f"positive numbers")
    if not np.all(np.isfinite(info.position)):
        raise VolumeError(f"{where}: ImagePositionPatient {list(info.position)} is not finite")
    row, col = np.array(info.orientation[:3]), np.array(info.orientation[3:])
    if (not np.all(np.isfinite(info.orientation)) or abs(np.linalg.norm(row) - 1) > 0.01
            or abs(np.linalg.norm(col) - 1) > 0.01 or abs(float(np.dot(row, col))) > 0.01):
        raise VolumeError(f"{where}: ImageOrientationPatient {list(info.orientation)} is not "
                          f"two orthogonal unit vectors")
    if info.slice_thickness is not None and not (np.isfinite(info.slice_thickness)
                                                 and info.slice_thickness >= 0):
        raise VolumeError(f"{where}: SliceThickness {info.slice_thickness} is not a "
                          f"non-negative number")
    return info


def slices_of(ds: Dataset, path: Path) -> list[SliceInfo]:
    """The slices one instance contributes (one, or one per frame), each
    :func:`checked`."""
    return [checked(info) for info in _slices_of(ds, path)]


def _slices_of(ds: Dataset, path: Path) -> list[SliceInfo]:
    rows = int(ds.get("Rows", 0))
    columns = int(ds.get("Columns", 0))
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    sop_class = str(ds.get("SOPClassUID", ""))
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
        out = []
        for index, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
            def item(name: str, frame: Dataset = frame) -> Dataset | None:
                for source in (frame, shared):
                    if name in source and len(source[name].value):
                        found: Dataset = source[name].value[0]
                        return found
                return None
            pos = item("PlanePositionSequence")
            ori = item("PlaneOrientationSequence")
            meas = item("PixelMeasuresSequence")
            if pos is None or ori is None or meas is None:
                raise VolumeError(f"frame {index + 1} of {sop_uid} lacks plane geometry")
            thickness = meas.get("SliceThickness")
            out.append(SliceInfo(
                path=path, frame_index=index, sop_uid=sop_uid, sop_class_uid=sop_class,
                rows=rows, columns=columns,
                position=_floats(pos.ImagePositionPatient, 3, "ImagePositionPatient"),  # type: ignore[arg-type]
                orientation=_floats(ori.ImageOrientationPatient, 6, "ImageOrientationPatient"),  # type: ignore[arg-type]
                pixel_spacing=_floats(meas.PixelSpacing, 2, "PixelSpacing"),  # type: ignore[arg-type]
                slice_thickness=float(thickness) if thickness not in (None, "") else None))
        return out
    for name in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if name not in ds:
            raise VolumeError(f"instance {sop_uid} has no {name}")
    thickness = ds.get("SliceThickness")
    return [SliceInfo(
        path=path, frame_index=None, sop_uid=sop_uid, sop_class_uid=sop_class,
        rows=rows, columns=columns,
        position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient"),  # type: ignore[arg-type]
        orientation=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient"),  # type: ignore[arg-type]
        pixel_spacing=_floats(ds.PixelSpacing, 2, "PixelSpacing"),  # type: ignore[arg-type]
        slice_thickness=float(thickness) if thickness not in (None, "") else None)]


def read_header(path: Path) -> Dataset:
    return dcmread(path, stop_before_pixels=True)


def sort_slices(slices: list[SliceInfo]) -> list[SliceInfo]:
    """Sort by position along the common slice normal (inferior to superior for axial)."""
    if not slices:
        return slices
    normal = slices[0].normal
    return sorted(slices, key=lambda s: float(np.dot(normal, s.position)))


def positions_along_normal(slices: list[SliceInfo]) -> NDArray[np.float64]:
    """Each slice's position (mm) along the first slice's normal, in the given order."""
    if not slices:
        return np.zeros(0)
    normal = slices[0].normal
    return np.array([float(np.dot(normal, s.position)) for s in slices])


def slice_spacing_mm(slices: list[SliceInfo]) -> float:
    """Median distance between neighbouring sorted slices along the normal."""
    if len(slices) < 2:
        return slices[0].slice_thickness or 1.0 if slices else 1.0
    gaps = np.diff(np.sort(positions_along_normal(slices)))
    spacing = float(np.median(gaps))
    return spacing if spacing > 0 else (slices[0].slice_thickness or 1.0)


@dataclass(frozen=True)
class Volume:
    """Pixel data (N, rows, columns) float32 in stored-value units after rescale."""

    pixels: NDArray[np.float32]
    slices: list[SliceInfo]
    datasets: list[Dataset]  # one full dataset per distinct instance, in slice order
    spacing_mm: tuple[float, float, float]  # (slice, row, column)

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing_mm)) / 1000.0

    @property
    def positions_mm(self) -> NDArray[np.float64]:
        """Each slice's position along the slice normal, in slice order."""
        return positions_along_normal(self.slices)

    @property
    def columns_toward_patient_left(self) -> bool:
        """Do image columns run toward the patient's left (the row direction's x > 0 in
        LPS)? The TBR analysis needs it to name a lesion's side."""
        return self.slices[0].orientation[0] > 0


def modality_values(ds: Dataset, stored: NDArray[Any]) -> NDArray[np.float32]:
    """Stored pixel values as float32 modality values: x RescaleSlope + RescaleIntercept
    (absent, empty or 1 / 0: the stored values)."""
    values = np.asarray(stored, dtype=np.float32)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if slope != 1.0 or intercept != 0.0:
        values = values * np.float32(slope) + np.float32(intercept)
    return values


def load_volume(slices: list[SliceInfo]) -> Volume:
    """Decode every slice (any transfer syntax pydicom can decode) into one volume."""
    ordered = sort_slices(slices)
    cache: dict[Path, Dataset] = {}
    ds: Dataset
    frames: dict[Path, NDArray[Any]] = {}
    pixels = np.empty((len(ordered), ordered[0].rows, ordered[0].columns), dtype=np.float32)
    datasets: list[Dataset] = []
    for index, info in enumerate(ordered):
        if info.path not in cache:
            try:
                ds = dcmread(info.path)
                array = ds.pixel_array
            except Exception as exc:  # pydicom raises many types for bad pixel data
                raise VolumeError(f"cannot decode pixel data of {info.sop_uid}: {exc}") from exc
            cache[info.path] = ds
            frames[info.path] = array
            datasets.append(ds)
        ds = cache[info.path]
        array = frames[info.path]
        plane = array[info.frame_index] if info.frame_index is not None else array
        if plane.shape != (info.rows, info.columns):
            raise VolumeError(f"slice {info.sop_uid} has shape {plane.shape}, "
                              f"expected {(info.rows, info.columns)}")
        pixels[index] = modality_values(ds, plane)
    spacing = (slice_spacing_mm(ordered), ordered[0].pixel_spacing[0], ordered[0].pixel_spacing[1])
    return Volume(pixels=pixels, slices=ordered, datasets=datasets, spacing_mm=spacing)
