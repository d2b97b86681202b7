"""Is a ready series an axial post-contrast T1 the model can use?

Rules come from ``[selection]`` in the config. The first rule a series fails is
the reason it is skipped, written to the audit log.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.config import SelectionConfig
from dicom_node.series.volume import (
    SliceInfo,
    VolumeError,
    positions_along_normal,
    read_header,
    slices_of,
    sort_slices,
)


@dataclass(frozen=True)
class Selection:
    accepted: bool
    reason: str
    slices: list[SliceInfo] = field(default_factory=list)


def has_contrast(ds: Dataset, rules: SelectionConfig) -> bool:
    agent = str(ds.get("ContrastBolusAgent", "") or "").strip()
    if agent:
        return True
    if "ContrastBolusAgentSequence" in ds and len(ds.ContrastBolusAgentSequence):
        return True
    for seq_name in ("SharedFunctionalGroupsSequence",):
        for group in ds.get(seq_name, []):
            for item in group.get("ContrastBolusUsageSequence", []):
                if str(item.get("ContrastBolusAgentAdministered", "")).upper() == "YES":
                    return True
    description = str(ds.get("SeriesDescription", ""))
    return bool(re.search(rules.contrast_description_regex, description))


def _modality_reason(ds: Dataset, rules: SelectionConfig) -> str | None:
    modality = str(ds.get("Modality", ""))
    if modality not in rules.modalities:
        return f"modality {modality!r} is not one of {list(rules.modalities)}"
    return None


def select_series(paths: list[Path], rules: SelectionConfig) -> Selection:
    """Apply the selection rules to the instances of one series."""
    if not paths:
        return Selection(False, "series has no instances")
    headers: list[tuple[Path, Dataset]] = []
    for path in paths:
        try:
            headers.append((path, read_header(path)))
        except (InvalidDicomError, OSError) as exc:
            return Selection(False, f"unreadable instance {path.name}: {exc}")
        if len(headers) == 1:  # a CT or a report routed with the study: one header says so
            reason = _modality_reason(headers[0][1], rules)
            if reason is not None:
                return Selection(False, reason)
    return select_headers(headers, rules)


def select_headers(headers: Sequence[tuple[Path, Dataset]], rules: SelectionConfig
                   ) -> Selection:
    """Apply the selection rules to the already-read headers (``stop_before_pixels``) of
    one series' instances: what :func:`select_series` does after reading them, and what
    training uses to choose a study's T1C series, so the node and its training data agree."""
    if not headers:
        return Selection(False, "series has no instances")
    reason = _modality_reason(headers[0][1], rules)
    if reason is not None:
        return Selection(False, reason)
    first = headers[0][1]
    description = str(first.get("SeriesDescription", ""))
    if rules.description_include and not any(
            re.search(p, description) for p in rules.description_include):
        return Selection(False, f"SeriesDescription {description!r} matches no include rule")
    for pattern in rules.description_exclude:
        if re.search(pattern, description):
            return Selection(False, f"SeriesDescription {description!r} matches exclude "
                                    f"rule {pattern!r}")
    if rules.require_contrast and not has_contrast(first, rules):
        return Selection(False, "no contrast agent recorded (ContrastBolusAgent empty and "
                                "description does not say post-contrast)")
    slices: list[SliceInfo] = []
    try:
        for path, ds in headers:
            slices.extend(slices_of(ds, path))
    except VolumeError as exc:
        return Selection(False, f"geometry missing or invalid: {exc}")
    sizes = {(s.rows, s.columns) for s in slices}
    if len(sizes) != 1:
        return Selection(False, f"inconsistent matrix sizes in one series: {sorted(sizes)}")
    spacings = {tuple(round(v, 4) for v in s.pixel_spacing) for s in slices}
    if len(spacings) != 1:
        return Selection(False, f"inconsistent PixelSpacing in one series: {sorted(spacings)}")
    normal = slices[0].normal
    cos_tol = math.cos(math.radians(rules.axial_tolerance_deg))
    if abs(float(normal[2])) < cos_tol:
        angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
        return Selection(False, f"not axial: slice normal is {angle:.0f} deg from the "
                                f"S-I axis (tolerance {rules.axial_tolerance_deg:g})")
    for s in slices:
        if float(np.dot(s.normal, normal)) < cos_tol:
            return Selection(False, "slices of the series have different orientations")
    if len(slices) < rules.min_slices:
        return Selection(False, f"{len(slices)} slices, fewer than min_slices "
                                f"{rules.min_slices}")
    ordered = sort_slices(slices)
    positions = positions_along_normal(ordered)
    if len(set(np.round(positions, 3))) != len(positions):
        return Selection(False, "two or more slices share one position (mixed series?)")
    return Selection(True, "axial post-contrast T1", ordered)
