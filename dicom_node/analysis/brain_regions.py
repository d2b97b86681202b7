"""Anatomical regions for TBR measurement, found from the volume itself.

Arrays are axial volumes indexed (slice, row, column), spacing in mm in the same
order. Nothing here assumes the head is centred or straight in the field of view:

- :func:`brain_mask`: tissue where uptake was drawn (and, when given, where the
  T1C shows tissue), holes filled slice by slice, largest 3D component.
- :func:`estimate_midline`: the mid-sagittal plane as the left-right mirror axis
  that maximises the self-similarity of an edge image of the brain (all slices
  summed), searched over in-plane angle and offset (FFT over offsets, a coarse
  then fine angle grid).
- :func:`find_striatum`: FDOPA's physiological striatal uptake, found from the
  uptake: voxels above ``factor x background`` that lie deep (away from the brain
  surface), near the midline, and whose mirror image across the midline is hot too
  (bilateral symmetric uptake), grown by a margin within warm tissue.
- :func:`find_ventricles`: dark CSF inside the brain (T1C well below the brain's
  median, or uptake well below the background when no T1C is given).
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from dicom_node.analysis.mask_morphology import (
    bounding_box,
    close_in_plane,
    dilate_cross,
    fill_holes_in_plane,
    grown_box,
    open_2x2_in_plane,
)

BoolVolume = NDArray[np.bool_]
FloatVolume = NDArray[np.float32]
Spacing = tuple[float, float, float]

MIDLINE_MAX_ANGLE_DEG = 20.0
STRIATUM_FACTOR = 1.5          # x background: striatal uptake detection level
STRIATUM_MAX_LATERAL_MM = 40.0  # caudate and putamen lie within about 35 mm of the midline
STRIATUM_MIN_DEPTH_MM = 15.0   # distance from the brain surface
STRIATUM_MARGIN_MM = 6.0       # about one PET FWHM plus misregistration
VENTRICLE_T1C_FRACTION = 0.55  # x median T1C grey of the brain
VENTRICLE_UPTAKE_FRACTION = 0.5  # x background, when no T1C is given
DEPTH_TASKS = 8                # groups of slices for depth_mm on a thread pool


@dataclass(frozen=True)
class Midline:
    """The mid-sagittal plane in the (row, column) plane, the same on every slice.

    A voxel's signed distance (mm) is positive on the side of higher column
    indices. ``angle_deg`` is the in-plane tilt of the plane against the columns'
    normal; ``column_at_centre_row`` is where it crosses the central row.
    """

    angle_deg: float
    column_at_centre_row: float
    centre_row: float
    score: float

    def signed_distance_mm(self, shape: tuple[int, int], spacing_rc: tuple[float, float]
                           ) -> NDArray[np.float32]:
        """Signed distance (mm) of every pixel of a (rows, cols) slice to the plane."""
        rows = (np.arange(shape[0], dtype=np.float32) - self.centre_row) * spacing_rc[0]
        cols = (np.arange(shape[1], dtype=np.float32) - self.column_at_centre_row) * spacing_rc[1]
        theta = np.deg2rad(self.angle_deg)
        turned: NDArray[np.float32] = (cols[None, :] * np.cos(theta)
                                       - rows[:, None] * np.sin(theta)).astype(np.float32)
        return turned

    def mirror(self, rows: NDArray[np.number], cols: NDArray[np.number],
               spacing_rc: tuple[float, float]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Row and column indices of the mirror images of the given pixels."""
        theta = np.deg2rad(self.angle_deg)
        y = (np.asarray(rows, dtype=np.float64) - self.centre_row) * spacing_rc[0]
        x = (np.asarray(cols, dtype=np.float64) - self.column_at_centre_row) * spacing_rc[1]
        n_y, n_x = -np.sin(theta), np.cos(theta)
        d = x * n_x + y * n_y
        y2, x2 = y - 2 * d * n_y, x - 2 * d * n_x
        return y2 / spacing_rc[0] + self.centre_row, x2 / spacing_rc[1] + self.column_at_centre_row


def brain_mask(uptake: FloatVolume, display_threshold: float,
               t1c_grey: FloatVolume | None = None) -> BoolVolume:
    """Brain: drawn uptake (or T1C tissue), closed, filled per slice, largest component."""
    tissue = uptake >= display_threshold
    if t1c_grey is not None:
        grey = np.asarray(t1c_grey, dtype=np.float32)
        inside = grey[tissue]
        if inside.size:
            tissue |= dilate_cross(tissue, 2) & (grey > 0.25 * float(np.median(inside)))
    if not tissue.any():
        return tissue
    tissue = fill_holes_in_plane(close_in_plane(tissue, 2))
    labels, count = ndimage.label(tissue)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        tissue = labels == int(np.argmax(sizes))
    return np.asarray(tissue, dtype=bool)


def _rotate(image: NDArray[np.float32], angle_deg: float) -> NDArray[np.float32]:
    """Sample ``image`` on a grid turned by ``angle_deg`` about the image centre.

    Output pixel (i, j) takes input at ``centre + M @ ((i, j) - centre)`` with
    ``M = [[cos, -sin], [sin, cos]]`` (row, column), so a vertical line of the
    output is the input line along direction (cos, sin).
    """
    theta = np.deg2rad(angle_deg)
    m = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    centre = (np.asarray(image.shape, dtype=np.float64) - 1) / 2
    offset = centre - m @ centre
    moved: NDArray[np.float32] = ndimage.affine_transform(image, m, offset=offset, order=1,
                                                          mode="constant")
    return moved


def estimate_midline(brain: BoolVolume, spacing: Spacing,
                     t1c_grey: FloatVolume | None = None,
                     max_angle_deg: float = MIDLINE_MAX_ANGLE_DEG) -> Midline:
    """Symmetry-plane estimate: mirror axis maximising edge self-similarity.

    The edge image (gradient magnitude of the smoothed brain mask, plus of the T1C
    inside the brain when given) is summed over slices, resampled to square pixels
    of about 2 mm, and for every trial angle the mirror correlation over all
    column offsets comes from one FFT (self-convolution along columns).
    """
    shape_rc = brain.shape[1:]
    if not brain.any():
        return Midline(0.0, (shape_rc[1] - 1) / 2, (shape_rc[0] - 1) / 2, 0.0)
    step = 2.0
    stride = (max(1, int(step // spacing[1])), max(1, int(step // spacing[2])))
    sub = (slice(None), slice(None, None, stride[0]), slice(None, None, stride[1]))
    sub_spacing = (spacing[1] * stride[0], spacing[2] * stride[1])
    zoom = (sub_spacing[0] / step, sub_spacing[1] / step)
    weights = brain.sum(axis=(1, 2)).astype(np.float64)
    keep = weights >= 0.25 * weights.max()
    brain_sub = brain[keep][sub]
    sigma_vox = (0.0, 2.0 / sub_spacing[0], 2.0 / sub_spacing[1])
    image = np.zeros(brain_sub.shape[1:], dtype=np.float32)
    mask_f = ndimage.gaussian_filter(brain_sub.astype(np.float32), sigma_vox)
    edges = np.sqrt(ndimage.sobel(mask_f, axis=1) ** 2 + ndimage.sobel(mask_f, axis=2) ** 2)
    image += edges.sum(axis=0)
    if t1c_grey is not None:
        grey = ndimage.gaussian_filter(np.where(brain_sub, t1c_grey[keep][sub], 0.0)
                                       .astype(np.float32), sigma_vox)
        g_edges = np.sqrt(ndimage.sobel(grey, axis=1) ** 2 + ndimage.sobel(grey, axis=2) ** 2)
        g_edges *= ndimage.binary_erosion(brain_sub, structure=np.ones((1, 3, 3), bool),
                                          iterations=2)
        image += g_edges.sum(axis=0) * (edges.sum() / max(float(g_edges.sum()), 1e-6))
    small = ndimage.zoom(image, zoom, order=1).astype(np.float32)
    small -= float(small.mean())
    n_cols = small.shape[1]
    pad = 2 * n_cols

    def best_for(angle: float) -> tuple[float, float]:
        rotated = _rotate(small, angle)
        spectrum = np.fft.rfft(rotated, n=pad, axis=1)
        conv = np.fft.irfft((spectrum * spectrum).sum(axis=0), n=pad)
        energy = float((rotated * rotated).sum())
        s = int(np.argmax(conv[: 2 * n_cols - 1]))
        # sub-pixel peak
        if 0 < s < 2 * n_cols - 2:
            a, b, c = conv[s - 1], conv[s], conv[s + 1]
            denom = a - 2 * b + c
            frac = 0.5 * (a - c) / denom if denom != 0 else 0.0
        else:
            frac = 0.0
        return float(conv[s]) / max(energy, 1e-9), (s + frac) / 2.0

    coarse = np.arange(-max_angle_deg, max_angle_deg + 1e-6, 2.0)
    scores = [best_for(a) for a in coarse]
    k = int(np.argmax([s for s, _ in scores]))
    fine = np.arange(coarse[k] - 2.0, coarse[k] + 2.0 + 1e-6, 0.25)
    fine_scores = [best_for(a) for a in fine]
    j = int(np.argmax([s for s, _ in fine_scores]))
    angle = float(fine[j])
    score, axis_col_small = fine_scores[j]
    # Axis in the rotated small grid: column axis_col_small, direction (cos, sin) in input.
    centre_small = (np.asarray(small.shape, dtype=np.float64) - 1) / 2
    theta = np.deg2rad(angle)
    m = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    point_small = centre_small + m @ np.array([0.0, axis_col_small - centre_small[1]])
    # back to full-resolution indices (zoom maps index i -> i * (n_out - 1)/(n_in - 1))
    scale_r = (image.shape[0] - 1) / max(small.shape[0] - 1, 1) * stride[0]
    scale_c = (image.shape[1] - 1) / max(small.shape[1] - 1, 1) * stride[1]
    point = np.array([point_small[0] * scale_r, point_small[1] * scale_c])
    # direction in mm is (cos, sin) (rows, cols) since the small grid is square in mm
    centre_row = (shape_rc[0] - 1) / 2
    dy_mm = (centre_row - point[0]) * spacing[1]
    col_at_centre = point[1] + dy_mm * np.tan(theta) / spacing[2]
    return Midline(angle_deg=angle, column_at_centre_row=float(col_at_centre),
                   centre_row=float(centre_row), score=float(score))


def signed_distance(midline: Midline, shape: tuple[int, int, int], spacing: Spacing
                    ) -> NDArray[np.float32]:
    """Signed distance (mm) of every pixel of a slice to the midline, shape (rows, cols)."""
    return midline.signed_distance_mm(shape[1:], (spacing[1], spacing[2]))


def depth_mm(brain: BoolVolume, spacing: Spacing,
             pool: Executor | None = None) -> NDArray[np.float32]:
    """In-slice distance (mm) of every brain voxel to the brain's outline on its slice.

    With ``pool``, groups of slices run on its threads (scipy's distance transform
    releases the GIL); the result is the same."""
    out = np.zeros(brain.shape, dtype=np.float32)

    def fill(indices: NDArray[np.intp]) -> None:
        for k in indices:
            # On the slice's brain box plus one pixel of background (clipped to the
            # slice): a background pixel outside that ring is never nearer than one on it.
            box = bounding_box(brain[k], [1, 1])
            assert box is not None  # only slices with brain are passed
            out[k][box] = ndimage.distance_transform_edt(brain[k][box],
                                                         sampling=(spacing[1], spacing[2]))

    indices = np.flatnonzero(brain.any(axis=(1, 2)))
    if pool is None:
        fill(indices)
    else:
        list(pool.map(fill, np.array_split(indices, DEPTH_TASKS)))
    return out


def find_striatum(uptake: FloatVolume, brain: BoolVolume, background: float,
                  midline: Midline, distance: NDArray[np.float32], depth: NDArray[np.float32],
                  spacing: Spacing, factor: float = STRIATUM_FACTOR) -> BoolVolume:
    """Bilateral symmetric hot deep grey-matter structures near the midline."""
    hot = brain & (uptake >= factor * background)
    candidate = hot & (np.abs(distance)[None] <= STRIATUM_MAX_LATERAL_MM) & (
        depth >= STRIATUM_MIN_DEPTH_MM)
    if not candidate.any():
        return np.zeros(brain.shape, dtype=bool)
    k, r, c = np.nonzero(candidate)
    mr, mc = midline.mirror(r, c, (spacing[1], spacing[2]))
    # mirror partner hot within about 4 mm (misregistration, tilt)
    tolerance = max(1, round(4.0 / min(spacing[1], spacing[2])))
    near_hot = grown_box(hot, [0, tolerance, tolerance])
    mri = np.clip(np.rint(mr).astype(np.intp), 0, brain.shape[1] - 1)
    mci = np.clip(np.rint(mc).astype(np.intp), 0, brain.shape[2] - 1)
    symmetric = near_hot[k, mri, mci]
    seeds = np.zeros(brain.shape, dtype=bool)
    seeds[k[symmetric], r[symmetric], c[symmetric]] = True
    # keep only seed components of a plausible size (> 0.2 mL) and with partners on
    # both sides of the midline in the same slab
    voxel_ml = float(np.prod(spacing)) / 1000.0
    seed_box = bounding_box(seeds)
    if seed_box is None:
        return seeds
    labels, _ = ndimage.label(seeds[seed_box], structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel()) * voxel_ml
    keep = sizes >= 0.2
    keep[0] = False
    seeds = np.zeros(brain.shape, dtype=bool)
    seeds[seed_box] = keep[labels]
    if not seeds.any():
        return seeds
    left = seeds & (distance[None] > 0)
    right = seeds & (distance[None] < 0)
    if not (left.any() and right.any()):
        return np.zeros(brain.shape, dtype=bool)
    # grow by the margin within warm tissue (the blurred shoulders of the nuclei),
    # inside the seeds' bounding box padded by the margin
    pad = [int(np.ceil(STRIATUM_MARGIN_MM / s)) + 1 for s in spacing]
    nz = np.nonzero(seeds)
    box = tuple(slice(max(0, int(ax.min()) - p), int(ax.max()) + p + 1)
                for ax, p in zip(nz, pad, strict=True))
    steps = max(1, round(STRIATUM_MARGIN_MM / min(spacing[1], spacing[2])))
    warm = brain[box] & (uptake[box] >= 1.1 * background)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    structure[0, 1, 1] = structure[2, 1, 1] = spacing[0] <= STRIATUM_MARGIN_MM
    grown_in_box = ndimage.binary_dilation(seeds[box], structure=structure, iterations=steps,
                                        mask=warm)
    grown = np.zeros(brain.shape, dtype=bool)
    grown[box] = grown_in_box | seeds[box]
    return grown


def find_ventricles(brain: BoolVolume, uptake: FloatVolume, background: float,
                    depth: NDArray[np.float32], t1c_grey: FloatVolume | None = None) -> BoolVolume:
    """Dark CSF inside the brain (deeper than 5 mm from the outline)."""
    deep = brain & (depth > 5.0)
    if t1c_grey is not None:
        grey = np.asarray(t1c_grey, dtype=np.float32)
        level = float(np.median(grey[brain])) if brain.any() else 0.0
        dark = deep & (grey < VENTRICLE_T1C_FRACTION * level)
    else:
        dark = deep & (uptake < VENTRICLE_UPTAKE_FRACTION * background)
    return np.asarray(open_2x2_in_plane(dark) | (dark & dilate_cross(dark, 1)), dtype=bool)
