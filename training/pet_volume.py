"""A PET series as a 3D volume in patient coordinates, and its values in the T1C's plane.

The PET series is taken on its own grid, as PET/MR scanners write it: its own
ImageOrientationPatient, PixelSpacing, matrix and ImagePositionPatient per slice (for
example 2.09 mm pixels, 172 x 172, 2.03 mm slices, starting elsewhere than the T1C).
:func:`stack_geometry` orders the slices along the PET's own normal and checks that they
form one stack (same orientation, spacing and matrix, every position on the line through
the first along the normal); :func:`resample_to_planes` evaluates the volume at the
centres of the T1C's pixels by trilinear interpolation on that geometry, the patient
coordinate of T1C pixel (r, c) of a slice being ``IPP + c * dc * row_dir + r * dr * col_dir``
(PS3.3 C.7.6.2.1.1). Nothing assumes that PET and T1C are both axial or share a grid.

Points more than half a PET voxel outside the stack are "not covered" (value 0, flagged);
inside, the stack's slices may be irregularly spaced (interpolation between neighbours
along the normal); gaps are found by :func:`slice_gaps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from dicom_node.series.volume import slice_normal


class GeometryError(ValueError):
    """The PET slices do not form one volume; the message says why."""


@dataclass(frozen=True)
class PlaneGeometry:
    """What one single-frame slice's header says about where its pixels are."""

    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    shape: tuple[int, int]


@dataclass(frozen=True)
class StackGeometry:
    """A stack of parallel slices, ordered along its normal (``order``: input indices)."""

    origin: NDArray[np.float64]
    row_dir: NDArray[np.float64]
    col_dir: NDArray[np.float64]
    normal: NDArray[np.float64]
    pixel_spacing: tuple[float, float]
    shape: tuple[int, int]
    positions_mm: NDArray[np.float64]
    order: tuple[int, ...]

    @property
    def spacing_mm(self) -> float:
        diffs = np.diff(self.positions_mm)
        return float(np.median(diffs)) if diffs.size else 1.0


def stack_geometry(planes: Sequence[PlaneGeometry], tolerance_mm: float = 0.05
                   ) -> StackGeometry:
    """The slices' stack geometry, or :class:`GeometryError` if they are not one stack."""
    if not planes:
        raise GeometryError("no slices")
    first = planes[0]
    orient = np.asarray(first.orientation, dtype=np.float64)
    for p in planes:
        if len(p.orientation) != 6 or not np.allclose(p.orientation, orient, atol=1e-4):
            raise GeometryError("slices differ in ImageOrientationPatient")
        if not np.allclose(p.pixel_spacing, first.pixel_spacing, rtol=1e-4):
            raise GeometryError("slices differ in PixelSpacing")
        if p.shape != first.shape:
            raise GeometryError("slices differ in matrix size")
    normal = slice_normal(orient)
    positions = np.array([float(np.dot(p.position, normal)) for p in planes])
    order = np.argsort(positions, kind="stable")
    if np.any(np.diff(positions[order]) < tolerance_mm):
        raise GeometryError("two slices at the same position")
    origin = np.asarray(planes[int(order[0])].position, dtype=np.float64)
    for i in order:
        where = np.asarray(planes[int(i)].position, dtype=np.float64)
        lateral = (where - origin) - normal * float(np.dot(where - origin, normal))
        if float(np.linalg.norm(lateral)) > tolerance_mm:
            raise GeometryError("slice positions are not on one line along the normal "
                                "(sheared or mixed stacks)")
    return StackGeometry(origin=origin, row_dir=orient[:3] / np.linalg.norm(orient[:3]),
                         col_dir=orient[3:] / np.linalg.norm(orient[3:]), normal=normal,
                         pixel_spacing=(float(first.pixel_spacing[0]),
                                        float(first.pixel_spacing[1])),
                         shape=first.shape, positions_mm=positions[order],
                         order=tuple(int(i) for i in order))


def slice_gaps(stack: StackGeometry, factor: float = 1.5) -> list[tuple[float, float]]:
    """(from, to) positions along the normal between neighbouring slices more than
    ``factor`` times the stack's median spacing apart: missing slices."""
    diffs = np.diff(stack.positions_mm)
    limit = factor * stack.spacing_mm
    return [(float(stack.positions_mm[i]), float(stack.positions_mm[i + 1]))
            for i in np.flatnonzero(diffs > limit)]


def plane_points(plane: PlaneGeometry) -> NDArray[np.float64]:
    """(3, rows, cols) patient coordinates (mm) of a slice's pixel centres."""
    orient = np.asarray(plane.orientation, dtype=np.float64)
    row_dir, col_dir = orient[:3], orient[3:]
    rows, cols = np.mgrid[0:plane.shape[0], 0:plane.shape[1]].astype(np.float64)
    points: NDArray[np.float64] = (np.asarray(plane.position, dtype=np.float64)[:, None, None]
            + row_dir[:, None, None] * cols * plane.pixel_spacing[1]
            + col_dir[:, None, None] * rows * plane.pixel_spacing[0])
    return points


def stack_indices(stack: StackGeometry, points: NDArray[np.float64]
                  ) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Fractional (slice, row, col) indices of patient points (3, ...) in the stack, and
    whether each lies within half a voxel of it."""
    offset = points - stack.origin.reshape(3, *([1] * (points.ndim - 1)))
    col = np.tensordot(stack.row_dir, offset, axes=1) / stack.pixel_spacing[1]
    row = np.tensordot(stack.col_dir, offset, axes=1) / stack.pixel_spacing[0]
    along = np.tensordot(stack.normal, offset, axes=1) + stack.positions_mm[0]
    n = len(stack.positions_mm)
    half = stack.spacing_mm / 2.0
    k = np.interp(along, stack.positions_mm, np.arange(n, dtype=np.float64))
    # Outside the stack: the index extrapolated (the values are held at the end slices).
    k = np.where(along < stack.positions_mm[0],
                 (along - stack.positions_mm[0]) / stack.spacing_mm, k)
    k = np.where(along > stack.positions_mm[-1],
                 n - 1 + (along - stack.positions_mm[-1]) / stack.spacing_mm, k)
    inside = ((along >= stack.positions_mm[0] - half) & (along <= stack.positions_mm[-1] + half)
              & (row >= -0.5) & (row <= stack.shape[0] - 0.5)
              & (col >= -0.5) & (col <= stack.shape[1] - 0.5))
    return np.stack([k, row, col]), inside


def transform_points(matrix: NDArray[np.float64] | None, points: NDArray[np.float64]
                     ) -> NDArray[np.float64]:
    """Points (3, ...) through a 4 x 4 homogeneous matrix (None: unchanged)."""
    if matrix is None:
        return points
    flat = points.reshape(3, -1)
    moved = matrix[:3, :3] @ flat + matrix[:3, 3:4]
    return np.asarray(moved.reshape(points.shape), dtype=np.float64)


def resample_to_planes(volume: NDArray[np.floating], stack: StackGeometry,
                       planes: Sequence[PlaneGeometry],
                       to_stack: NDArray[np.float64] | None = None
                       ) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """The volume (slices in ``stack`` order, rows, cols) at the pixel centres of each of
    ``planes`` (trilinear), and which of those pixels the stack covers (0 elsewhere).
    ``to_stack``: a 4 x 4 matrix from the planes' patient coordinates to the stack's, when
    they are in different frames of reference (a spatial registration)."""
    values: list[NDArray[np.float32]] = []
    covered: list[NDArray[np.bool_]] = []
    data = np.asarray(volume, dtype=np.float32)
    for plane in planes:
        coords, inside = stack_indices(stack, transform_points(to_stack, plane_points(plane)))
        sampled = ndimage.map_coordinates(data, coords, order=1, mode="nearest")
        values.append(np.where(inside, sampled, 0.0).astype(np.float32))
        covered.append(inside)
    return np.stack(values), np.stack(covered)
