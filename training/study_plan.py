"""What a study will contribute to a dataset, decided from headers alone, or why not.

:func:`plan_study` is what ``dataset`` does before it reads a pixel and all that
``dataset --check`` does: choose the T1C and target series (:func:`training.scanning.choose_series`,
the node's own selection rules), then refuse what it cannot trust, each with a reason:

- PET and T1C in different frames of reference (FrameOfReferenceUID) without a spatial
  registration (a REG object whose RegistrationSequence relates both frames); with one,
  its RIGID or RIGID_SCALE matrix maps the T1C's coordinates into the PET's
  (:func:`registration_matrix`); other matrix types and deformable registrations are
  refused with the reason.
- PET and T1C not simultaneous: the T1C's acquisition time more than
  ``max_pet_mr_gap_min`` (default 30) minutes outside the PET's acquisition
  (first AcquisitionDateTime to the last plus ActualFrameDuration); missing times refuse.
- PET slices missing over the brain: a gap of more than 1.5 slice spacings in the PET stack
  inside the T1C's extent (a T1C series is brain).
- PET slices that do not form one stack (orientation, spacing, matrix, sheared positions).
- PET values that do not give SUVbw by the book (:func:`training.suv.suv_scale`).
- A fusion export whose slices cannot be matched to the T1C: with no usable
  SourceImageSequence references, only equal InstanceNumbers pair it, and only when the
  fusion has as many slices as the T1C and its instance numbers are those of the T1C;
  references that put two fusion slices on one T1C slice are refused too.

T1C slices outside the PET's axial extent are not refused: they are left unpaired, listed
with their reason in ``dataset.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
from numpy.typing import NDArray

from dicom_node.config import SelectionConfig
from training.pet_volume import (
    GeometryError,
    PlaneGeometry,
    StackGeometry,
    slice_gaps,
    stack_geometry,
    transform_points,
)
from training.scanning import (
    Pairing,
    SeriesHeaders,
    SliceHeader,
    StudyHeaders,
    choose_series,
    pair_slices,
    t1c_order,
    t1c_reason,
)
from training.suv import SuvRefused, SuvScale, parse_dt, suv_scale


@dataclass(frozen=True)
class PairingRules:
    """What ``dataset`` accepts as a trustworthy pair (``--max-pet-mr-gap-min``)."""

    max_pet_mr_gap_min: float = 30.0
    gap_factor: float = 1.5

    def __post_init__(self) -> None:
        if self.max_pet_mr_gap_min < 0:
            raise ValueError("max_pet_mr_gap_min must not be negative")


@dataclass
class StudyPlan:
    """A study that will be built: its series, its pairs and, for PET, geometry and SUV."""

    study: StudyHeaders
    t1c: SeriesHeaders
    target: SeriesHeaders
    target_kind: str
    pairing: Pairing
    unpaired_reasons: dict[int, str] = field(default_factory=dict)
    stack: StackGeometry | None = None
    suv: SuvScale | None = None
    #: T1C patient coordinates -> PET patient coordinates (a spatial registration), or None.
    t1c_to_pet: NDArray[np.float64] | None = None


@dataclass(frozen=True)
class Refusal:
    """A study that will not be built, and why (with the series it would have paired,
    where it got that far)."""

    reason: str
    t1c_uid: str = ""
    target_uid: str = ""


def plane_of(s: SliceHeader) -> PlaneGeometry | None:
    """A slice header's plane geometry, or None if the header lacks it."""
    if s.position is None or s.orientation is None or s.pixel_spacing is None:
        return None
    rows, cols = int(s.header.get("Rows", 0) or 0), int(s.header.get("Columns", 0) or 0)
    if len(s.orientation) != 6 or rows < 1 or cols < 1:
        return None
    return PlaneGeometry(position=s.position, orientation=s.orientation,
                         pixel_spacing=s.pixel_spacing, shape=(rows, cols))


def plan_study(study: StudyHeaders, rules: SelectionConfig | None = None,
               pairing_rules: PairingRules | None = None) -> StudyPlan | Refusal:
    """The study's plan or the reason it is refused (see the module docstring)."""
    pairing_rules = pairing_rules or PairingRules()
    chosen = choose_series(study, rules)
    if isinstance(chosen, str):
        return Refusal(chosen)
    t1c, target, kind = chosen
    plan = (_plan_fusion(study, t1c, target) if kind == "fusion"
            else _plan_pet(study, t1c, target, pairing_rules))
    if isinstance(plan, Refusal):
        return Refusal(plan.reason, t1c_uid=t1c.uid, target_uid=target.uid)
    return plan


def _plan_fusion(study: StudyHeaders, t1c: SeriesHeaders, fusion: SeriesHeaders
                 ) -> StudyPlan | Refusal:
    pairing = pair_slices(t1c.slices, fusion.slices)
    if pairing.method == "source-reference":
        targets = [j for _, j in pairing.pairs]
        by_t1c: dict[str, int] = {}
        for s in fusion.slices:
            for ref in {r for r in s.source_refs if r in {t.sop_instance_uid for t in t1c.slices}}:
                by_t1c[ref] = by_t1c.get(ref, 0) + 1
        doubled = sorted(k for k, v in by_t1c.items() if v > 1)
        if doubled or len(set(targets)) != len(targets):
            return Refusal(f"fusion export: {len(doubled) or 'several'} T1C slices are "
                           "referenced by more than one fusion slice: cannot match")
    elif pairing.method == "instance-number":
        numbers = [s.instance_number for s in fusion.slices]
        t1c_numbers = sorted(s.instance_number for s in t1c.slices)
        if len(fusion.slices) != len(t1c.slices):
            return Refusal(f"fusion export has {len(fusion.slices)} slices, the T1C "
                           f"{len(t1c.slices)}, and no SourceImageSequence references to the "
                           "T1C: cannot match slice count")
        if sorted(numbers) != t1c_numbers:
            return Refusal("fusion export without references to the T1C: its InstanceNumbers "
                           "are not the T1C's (duplicated or renumbered): cannot match order")
    if not pairing.pairs:
        return Refusal("no slice of the fusion series pairs with the T1C series")
    reasons = {i: f"no fusion slice ({pairing.method})" for i in pairing.unpaired}
    return StudyPlan(study=study, t1c=t1c, target=fusion, target_kind="fusion",
                     pairing=pairing, unpaired_reasons=reasons)


def _acquired(s: SliceHeader) -> datetime | None:
    h = s.header
    return (parse_dt(h.get("AcquisitionDate") or h.get("SeriesDate"), h.get("AcquisitionTime"))
            or parse_dt(h.get("AcquisitionDateTime"))
            or parse_dt(h.get("SeriesDate"), h.get("SeriesTime")))


def pet_window(pet: SeriesHeaders) -> tuple[datetime, datetime] | None:
    """(start, end) of the PET acquisition: earliest acquisition time to the latest plus
    ActualFrameDuration."""
    spans = []
    for s in pet.slices:
        start = _acquired(s)
        if start is None:
            continue
        duration_ms = float(s.header.get("ActualFrameDuration", 0) or 0)
        spans.append((start, start + timedelta(milliseconds=duration_ms)))
    if not spans:
        return None
    return min(a for a, _ in spans), max(b for _, b in spans)


def time_gap_min(t1c: SeriesHeaders, pet: SeriesHeaders) -> float | None:
    """Minutes between the T1C's acquisition and the PET's acquisition window (0 inside);
    None when either lacks times."""
    window = pet_window(pet)
    times = [t for t in (_acquired(s) for s in t1c.slices) if t is not None]
    if window is None or not times:
        return None
    start, end = window
    first, last = min(times), max(times)
    if last < start:
        return (start - last).total_seconds() / 60.0
    if first > end:
        return (first - end).total_seconds() / 60.0
    return 0.0


def _plan_pet(study: StudyHeaders, t1c: SeriesHeaders, pet: SeriesHeaders,
              rules: PairingRules) -> StudyPlan | Refusal:
    t1c_for = {str(s.header.get("FrameOfReferenceUID", "")) for s in t1c.slices}
    pet_for = {str(s.header.get("FrameOfReferenceUID", "")) for s in pet.slices}
    if "" in t1c_for or "" in pet_for:
        return Refusal("FrameOfReferenceUID missing in the "
                       f"{'T1C' if '' in t1c_for else 'PET'} series: cannot tell whether PET "
                       "and T1C share a frame of reference")
    if len(t1c_for) != 1 or len(pet_for) != 1:
        return Refusal("more than one FrameOfReferenceUID within the T1C or PET series")
    to_pet: NDArray[np.float64] | None = None
    if t1c_for != pet_for:
        registrations = [s for s in study.series.values() if s.modality == "REG"]
        if not registrations:
            return Refusal("PET and T1C are in different frames of reference "
                           f"({'/'.join(sorted(pet_for))} vs {'/'.join(sorted(t1c_for))}) and "
                           "the study has no spatial registration: not a simultaneous PET/MR "
                           "pair")
        found = registration_matrix(registrations, next(iter(t1c_for)), next(iter(pet_for)))
        if isinstance(found, str):
            return Refusal("PET and T1C are in different frames of reference and the study's "
                           f"spatial registration cannot be applied: {found}")
        to_pet = found
    gap = time_gap_min(t1c, pet)
    if gap is None:
        return Refusal("PET or T1C acquisition times missing: cannot tell whether they were "
                       "acquired together")
    if gap > rules.max_pet_mr_gap_min:
        return Refusal(f"T1C acquired {gap:.1f} min outside the PET acquisition (limit "
                       f"{rules.max_pet_mr_gap_min:g} min): not simultaneous")
    planes = [plane_of(s) for s in pet.slices]
    if any(p is None for p in planes):
        return Refusal("PET slices without complete geometry (position, orientation, "
                       "spacing, matrix)")
    try:
        stack = stack_geometry([p for p in planes if p is not None])
    except GeometryError as exc:
        return Refusal(f"PET slices are not one volume: {exc}")
    try:
        suv = suv_scale([s.header for s in pet.slices])
    except SuvRefused as exc:
        return Refusal(f"PET: {exc}")
    # Where the T1C slices lie along the PET's normal (their centre pixels).
    centres = []
    for s in t1c.slices:
        plane = plane_of(s)
        if plane is None:
            return Refusal("T1C slice without complete geometry")
        rows, cols = plane.shape
        orient = np.asarray(plane.orientation)
        centre = (np.asarray(plane.position) + orient[:3] * (cols - 1) / 2 * plane.pixel_spacing[1]
                  + orient[3:] * (rows - 1) / 2 * plane.pixel_spacing[0])
        centre = transform_points(to_pet, centre.reshape(3, 1))[:, 0]
        centres.append(float(np.dot(centre, stack.normal)))
    along = np.asarray(centres)
    for low, high in slice_gaps(stack, rules.gap_factor):
        inside = np.flatnonzero((along > low) & (along < high))
        if inside.size:
            numbers = sorted(t1c.slices[int(i)].instance_number for i in inside)
            return Refusal(f"PET slices missing between {low:.1f} and {high:.1f} mm along its "
                           f"normal, over {inside.size} T1C slices (instances {numbers[0]}-"
                           f"{numbers[-1]}) of the brain")
    half = stack.spacing_mm / 2.0
    pairs, unpaired, reasons = [], [], {}
    for i, a in enumerate(along):
        if stack.positions_mm[0] - half <= a <= stack.positions_mm[-1] + half:
            j = stack.order[int(np.argmin(np.abs(stack.positions_mm - a)))]
            pairs.append((i, j))
        else:
            unpaired.append(i)
            reasons[i] = "outside the PET's axial extent"
    if not pairs:
        return Refusal("the PET does not cover any T1C slice")
    positions, _ = t1c_order(t1c.slices)
    rank = {int(i): r for r, i in enumerate(np.argsort(positions, kind="stable"))}
    pairs.sort(key=lambda ij: rank[ij[0]])
    unpaired.sort(key=lambda i: rank[i])
    pairing = Pairing(pairs=tuple(pairs), unpaired=tuple(unpaired), method="geometry")
    return StudyPlan(study=study, t1c=t1c, target=pet, target_kind="pet", pairing=pairing,
                     unpaired_reasons=reasons, stack=stack, suv=suv, t1c_to_pet=to_pet)


RIGID_TYPES = ("RIGID", "RIGID_SCALE")


def registration_matrix(registrations: list[SeriesHeaders], t1c_for: str, pet_for: str
                        ) -> NDArray[np.float64] | str:
    """The 4 x 4 matrix from T1C patient coordinates to PET patient coordinates from a
    Spatial Registration (PS3.3 C.20.2): each RegistrationSequence item's matrix maps its
    FrameOfReferenceUID into the registration's own, so T1C -> PET is
    ``inv(M_pet) @ M_t1c`` (identity for the registration's own frame). Only RIGID and
    RIGID_SCALE matrices are applied; otherwise the reason as a string."""
    for series in registrations:
        for s in series.slices:
            reg = s.header
            own = str(reg.get("FrameOfReferenceUID", ""))
            matrices: dict[str, NDArray[np.float64]] = {}
            if own:
                matrices[own] = np.eye(4)
            for item in reg.get("RegistrationSequence", []) or []:
                frame = str(item.get("FrameOfReferenceUID", ""))
                for mreg in item.get("MatrixRegistrationSequence", []) or []:
                    for m in mreg.get("MatrixSequence", []) or []:
                        kind = str(m.get("FrameOfReferenceTransformationMatrixType", ""))
                        values = m.get("FrameOfReferenceTransformationMatrix")
                        if kind not in RIGID_TYPES:
                            return f"matrix type {kind or '(empty)'} is not RIGID/RIGID_SCALE"
                        if values is None or len(values) != 16:
                            return "transformation matrix missing or not 16 values"
                        matrix = np.asarray([float(v) for v in values]).reshape(4, 4)
                        matrices[frame] = matrix @ matrices.get(frame, np.eye(4))
            if t1c_for in matrices and pet_for in matrices:
                pet = matrices[pet_for]
                if abs(float(np.linalg.det(pet[:3, :3]))) < 1e-6:
                    return "singular transformation matrix"
                result: NDArray[np.float64] = np.linalg.inv(pet) @ matrices[t1c_for]
                return result
    return "no registration relates the T1C's and the PET's frames of reference"


def series_report(study: StudyHeaders, plan: StudyPlan | Refusal,
                  rules: SelectionConfig | None = None) -> list[dict[str, object]]:
    """Per series of the study: modality, description, instances and its role (``t1c``,
    ``target``, or why it is not used)."""
    rules = rules or SelectionConfig()
    used = ({plan.t1c.uid: "T1C", plan.target.uid: f"target ({plan.target_kind})"}
            if isinstance(plan, StudyPlan) else
            {plan.t1c_uid: "T1C (study refused)", plan.target_uid: "target (study refused)"})
    rows: list[dict[str, object]] = []
    for series in study.series.values():
        role = used.get(series.uid)
        if role is None:
            if series.modality in rules.modalities:
                reason = t1c_reason(series, rules)
                role = (f"not T1C: {reason}" if reason else
                        "T1C candidate not chosen (another has contrast or more slices)")
            else:
                role = "not used"
        rows.append({"series_uid": series.uid, "modality": series.modality,
                     "description": series.description, "instances": len(series.slices),
                     "role": role})
    return rows
