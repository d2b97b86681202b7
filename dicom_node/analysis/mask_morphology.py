"""Binary morphology on boolean volumes, fast enough to run on every series.

Each function gives exactly the voxels of the scipy operation named in its docstring
(tests/test_tbr.py compares them, also where shapes touch the volume's faces), but:

- small structuring elements are applied as shifted copies combined with in-place
  ``|=`` / ``&=`` (a 3x3 cross on a 176 x 242 x 216 volume: 10 ms instead of 130 ms
  for ``maximum_filter1d`` and 280 ms for ``binary_dilation``);
- work that only concerns a few voxels (the lesions, a grown margin around them) runs
  on their bounding box, not on the whole volume.

Voxels beyond the volume's faces count as False, as with scipy's default
``mode="constant", cval=0`` / ``border_value=0``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

BoolVolume = NDArray[np.bool_]
Box = tuple[slice, ...]


def _pair(axis: int, offset: int, n: int, ndim: int) -> tuple[Box, Box]:
    """(target, source) index tuples so that ``target`` voxels read the voxel
    ``offset`` further along ``axis``; both cover only the overlapping part."""
    target = [slice(None)] * ndim
    source = [slice(None)] * ndim
    if offset >= 0:
        target[axis], source[axis] = slice(0, n - offset), slice(offset, n)
    else:
        target[axis], source[axis] = slice(-offset, n), slice(0, n + offset)
    return tuple(target), tuple(source)


def _or_shifted(out: BoolVolume, src: BoolVolume, axis: int, offset: int) -> None:
    """out[i] |= src[i + offset] along ``axis`` (False beyond the faces)."""
    n = src.shape[axis]
    if abs(offset) >= n:
        return
    target, source = _pair(axis, offset, n, src.ndim)
    out[target] |= src[source]


def _and_shifted(out: BoolVolume, src: BoolVolume, axis: int, offset: int) -> None:
    """out[i] &= src[i + offset] along ``axis`` (False beyond the faces)."""
    n = src.shape[axis]
    if abs(offset) >= n:
        out[...] = False
        return
    target, source = _pair(axis, offset, n, src.ndim)
    out[target] &= src[source]
    beyond = [slice(None)] * src.ndim
    beyond[axis] = slice(n - offset, n) if offset > 0 else slice(0, -offset)
    out[tuple(beyond)] = False


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def dilate_cross(mask: BoolVolume, steps: int) -> BoolVolume:
    """``ndimage.binary_dilation(mask, iterations=steps)`` (6-connected cross), steps >= 1
    (scipy reads fewer as "until nothing changes")."""
    _check_steps(steps)
    out = np.array(mask, dtype=bool)
    for _ in range(steps):
        grown = out.copy()
        for axis in range(out.ndim):
            _or_shifted(grown, out, axis, 1)
            _or_shifted(grown, out, axis, -1)
        out = grown
    return out


def _in_plane_window(mask: BoolVolume, radius: int,
                     combine: Callable[[BoolVolume, BoolVolume, int, int], None]) -> BoolVolume:
    """Maximum (``combine`` = :func:`_or_shifted`) or minimum (:func:`_and_shifted`) over
    a (1, 2r+1, 2r+1) window, separable: rows, then columns."""
    out = np.array(mask, dtype=bool)
    for axis in (1, 2):
        src = out.copy()
        for d in range(1, radius + 1):
            combine(out, src, axis, d)
            combine(out, src, axis, -d)
    return out


def close_in_plane(mask: BoolVolume, steps: int) -> BoolVolume:
    """``ndimage.binary_closing(mask, np.ones((1, 3, 3)), iterations=steps)``, steps >= 1:
    a (1, 2s+1, 2s+1) maximum then minimum filter, both with False beyond the faces."""
    _check_steps(steps)
    return _in_plane_window(_in_plane_window(mask, steps, _or_shifted), steps, _and_shifted)


def open_2x2_in_plane(mask: BoolVolume) -> BoolVolume:
    """``ndimage.binary_opening(mask, np.ones((1, 2, 2)))``: erosion over the pixel and
    its predecessors in row and column, then dilation over it and its successors."""
    eroded = np.array(mask, dtype=bool)
    for axis in (1, 2):
        _and_shifted(eroded, eroded.copy(), axis, -1)
    opened = eroded.copy()
    for axis in (1, 2):
        _or_shifted(opened, opened.copy(), axis, 1)
    return opened


def fill_holes_in_plane(mask: BoolVolume) -> BoolVolume:
    """``ndimage.binary_fill_holes`` with 4-connectivity within each slice: background
    not connected to a slice's edge becomes foreground."""
    mask = np.asarray(mask, dtype=bool)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    labels, count = ndimage.label(~mask, structure=in_plane)
    touches_edge = np.zeros(count + 1, dtype=bool)
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        touches_edge[face] = True
    touches_edge[0] = True  # label 0 is the mask itself
    return np.asarray(mask | ~touches_edge[labels], dtype=bool)


def bounding_box(mask: BoolVolume, margin: list[int] | None = None) -> Box | None:
    """The smallest box holding every True voxel of ``mask``, grown by ``margin`` voxels
    per axis and clipped to the volume; None when nothing is True."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        m = 0 if margin is None else margin[axis]
        box.append(slice(max(0, int(hit[0]) - m), min(mask.shape[axis], int(hit[-1]) + m + 1)))
    return tuple(box)


def grown_box(mask: BoolVolume, margin: list[int]) -> BoolVolume:
    """``ndimage.maximum_filter(mask, size=2 * margin + 1)`` (a box grown by ``margin``
    voxels per axis), computed on the mask's bounding box plus the margin only."""
    return grown_box_of_part(mask, tuple(slice(0, n) for n in mask.shape), mask.shape, margin)


def grown_box_of_part(part: BoolVolume, box: Box, shape: tuple[int, ...],
                      margin: list[int]) -> BoolVolume:
    """:func:`grown_box` of the volume of ``shape`` that is ``part`` inside ``box`` and
    False elsewhere, without building that volume first."""
    grown = np.zeros(shape, dtype=bool)
    inner = bounding_box(part)
    if inner is None:
        return grown
    # the part's True voxels' box in volume coordinates, grown by the margin
    region = tuple(slice(max(0, int(b.start) + int(i.start) - m),
                         min(n, int(b.start) + int(i.stop) + m))
                   for b, i, m, n in zip(box, inner, margin, shape, strict=True))
    placed = np.zeros(tuple(int(r.stop) - int(r.start) for r in region), dtype=bool)
    src = tuple(slice(int(b.start) + int(i.start) - int(r.start),
                      int(b.start) + int(i.stop) - int(r.start))
                for b, i, r in zip(box, inner, region, strict=True))
    placed[src] = part[inner]
    grown[region] = ndimage.maximum_filter(placed, size=tuple(2 * m + 1 for m in margin),
                                           mode="constant", cval=0)
    return grown
