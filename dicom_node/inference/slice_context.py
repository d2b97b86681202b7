"""Neighbouring T1C slices as extra input channels (a "2.5D" generator input).

A PET voxel's value depends on the tracer within a few millimetres in every direction
(PET resolution is about 4-5 mm FWHM, slices are often 3 mm apart): on the first and
last slices of a lesion the uptake comes mostly from the slices above or below, which a
one-slice generator never sees. A model trained with ``context_slices = k`` takes the
T1C slices ``z - k*step .. z + k*step`` as ``2k + 1`` channels (the slice itself in the
middle); ``k = 0`` is the published one-channel input.

The same rules serve training (rows of a paired dataset) and the node (slices of a
series volume): neighbours beyond the end of a run of contiguous slices repeat the last
slice of the run, and ``step`` keeps the neighbours at the training spacing when a
series has thinner slices.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

# Two consecutive slices further apart than this many median spacings are not neighbours.
GAP_FACTOR = 1.5


def input_channels(context_slices: int) -> int:
    if context_slices < 0:
        raise ValueError(f"context_slices must be >= 0, got {context_slices}")
    return 2 * context_slices + 1


def context_step(series_spacing_mm: float | None, trained_spacing_mm: float) -> int:
    """How many series slices apart the neighbours are taken: the training spacing in
    slices of this series (at least 1; 1 when either spacing is unknown)."""
    if not series_spacing_mm or series_spacing_mm <= 0 or trained_spacing_mm <= 0:
        return 1
    return max(1, round(trained_spacing_mm / series_spacing_mm))


def neighbour_rows(count: int, context_slices: int, step: int = 1) -> NDArray[np.int64]:
    """(count, 2k+1) indices into a run of ``count`` ordered slices, ends repeated."""
    offsets = np.arange(-context_slices, context_slices + 1, dtype=np.int64) * step
    rows = np.arange(count, dtype=np.int64)[:, None] + offsets[None, :]
    clipped: NDArray[np.int64] = np.clip(rows, 0, max(count - 1, 0))
    return clipped


def contiguous_runs(groups: NDArray[np.str_], positions_mm: NDArray[np.floating]
                    ) -> list[NDArray[np.int64]]:
    """Row indices of each run of contiguous slices, ordered by position: the rows of one
    group (a study's slices), split where a gap is larger than ``GAP_FACTOR`` times the
    group's median spacing (a missing slice)."""
    positions = np.asarray(positions_mm, dtype=np.float64)
    runs: list[NDArray[np.int64]] = []
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        members = members[np.argsort(positions[members], kind="stable")]
        gaps = np.diff(positions[members])
        spacing = float(np.median(gaps)) if gaps.size else 0.0
        breaks: NDArray[np.int64] = (np.flatnonzero(gaps > GAP_FACTOR * spacing) + 1
                                     if spacing > 0 else np.zeros(0, dtype=np.int64))
        runs.extend(np.split(members, breaks))
    return runs


def restrict_runs(runs: list[NDArray[np.int64]], rows: NDArray[np.int64]
                  ) -> list[NDArray[np.int64]]:
    """Runs of a whole dataset restricted to some of its ``rows`` (a split), as positions
    into ``rows``: a run is cut wherever one of its slices is not among them, so slices
    that were not neighbours in the study never become neighbours in the subset."""
    position_of = {int(row): k for k, row in enumerate(np.asarray(rows).tolist())}
    restricted: list[NDArray[np.int64]] = []
    for run in runs:
        kept = np.array([position_of.get(int(row), -1) for row in run.tolist()],
                        dtype=np.int64)
        pieces = np.split(kept, np.flatnonzero(kept < 0))  # each missing row starts a piece
        restricted += [piece[piece >= 0] for piece in pieces if (piece >= 0).any()]
    return restricted


def group_rows(groups: NDArray[np.str_], positions_mm: NDArray[np.floating],
               context_slices: int) -> NDArray[np.int64]:
    """(N, 2k+1) row indices of each row's neighbours within its run of contiguous
    slices (:func:`contiguous_runs`), so no slice borrows a neighbour from another study
    or from across a missing slice."""
    n = len(groups)
    result = np.repeat(np.arange(n, dtype=np.int64)[:, None], input_channels(context_slices),
                       axis=1)
    if context_slices == 0 or n == 0:
        return result
    for run in contiguous_runs(groups, positions_mm):
        result[run] = run[neighbour_rows(len(run), context_slices)]
    return result


def stack_context(slices: torch.Tensor, rows: NDArray[np.int64]) -> torch.Tensor:
    """(N, 1, H, W) slices and (N, C) neighbour rows -> (N, C, H, W)."""
    if slices.ndim != 4 or slices.shape[1] != 1:
        raise ValueError(f"expected (N, 1, H, W) slices, got {tuple(slices.shape)}")
    if rows.shape[1] == 1:
        return slices
    index = torch.from_numpy(np.ascontiguousarray(rows))
    return slices[:, 0][index]
