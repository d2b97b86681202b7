"""The arrays of a training dataset: one study's pairs at the network size, and the splits.

The T1C grey values are :func:`dicom_node.inference.fusion.window_t1c` over the whole series
(clipped at the dataset's ``t1c_ceiling``: 2 keeps enhancement above the display window), then
:func:`dicom_node.inference.resampling.to_network` to the network size; the fusion is resampled per
channel the same way. A phantom study (``ground_truth.json`` with the study's UID in the
series folder or one of its parents, up to ``DIR``) also contributes uptake, the oracle
fusion (rendered with ``fuse()`` from ``oracle_uptake``) and masks (nearest neighbour).

Splits are seeded. ``patient`` (default): patients shuffled, 1/10 to test, then 1/5 of
the rest to validation, every set getting at least one patient where there are enough.
``slice`` reproduces the published study's random slice split; it lets slices of one
patient sit in both train and test (``leaks_patients`` is true and a warning is shown).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from dicom_node.config import SelectionConfig
from dicom_node.inference.fusion import display_grey, fuse, to_uint8, window_t1c
from dicom_node.inference.fusion_style import FusionStyle
from dicom_node.inference.resampling import padding_for, to_network
from dicom_node.series.volume import modality_values
from training.pet_volume import resample_to_planes
from training.scanning import (
    SliceHeader,
    StudyHeaders,
    find_ground_truth,
    t1c_order,
)
from training.study_plan import PairingRules, Refusal, StudyPlan, plan_study, plane_of

logger = logging.getLogger(__name__)

SPLIT_METHODS = ("patient", "slice")
GROUND_TRUTH_ARRAYS = ("uptake", "oracle_fusion", "oracle_uptake", "tumour_labels",
                       "brain_mask", "striatum_mask", "oedema")


class PatientLeakWarning(UserWarning):
    """A split puts slices of one patient in more than one set."""


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
    #: The PET's SUVbw resampled into the T1C plane, network size (PET targets only).
    pet_suv: NDArray[np.float16] | None = None
    #: How the SUV was derived (:meth:`training.suv.SuvScale.as_dict`; PET targets only).
    suv: dict[str, object] | None = None


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


# --- pixels -----------------------------------------------------------------------------------


def _read_pixels(path: Path) -> tuple[NDArray[np.float32], pydicom.Dataset]:
    try:
        ds = pydicom.dcmread(path)
        data = np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises many types for undecodable pixel data
        raise PixelError(f"cannot decode pixel data of {Path(path).name}: "
                         f"{type(exc).__name__}: {exc}") from exc
    if data.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1:
        data = data[0]
    # Colour (RGB) pixels carry no modality rescale.
    values = modality_values(ds, data) if data.ndim == 2 else data.astype(np.float32)
    return values, ds


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


class PixelError(ValueError):
    """An instance's pixel data cannot be decoded."""


def build_study_pairs(study: StudyHeaders, root: Path, size: int, style: FusionStyle,
                      rules: SelectionConfig | None = None,
                      pairing_rules: PairingRules | None = None,
                      t1c_ceiling: float = 1.0) -> StudyPairs | str:
    """The network-size pairs of one study, or why it was skipped (:func:`plan_study`;
    pixel data that cannot be decoded, as the node's ``load_volume`` would refuse it)."""
    plan = plan_study(study, rules, pairing_rules)
    if isinstance(plan, Refusal):
        return plan.reason
    try:
        return _build_planned(study, plan, root, size, style, t1c_ceiling)
    except PixelError as exc:
        return str(exc)


def _build_planned(study: StudyHeaders, plan: StudyPlan, root: Path, size: int,
                   style: FusionStyle, t1c_ceiling: float = 1.0) -> StudyPairs | str:
    t1c_series, target_series, target_kind = plan.t1c, plan.target, plan.target_kind
    t1c = t1c_series.slices
    target = target_series.slices
    pairing = plan.pairing
    positions, _ = t1c_order(t1c)
    unpaired = [{"study_uid": study.uid, "patient_id": study.patient_id,
                 "series_uid": t1c_series.uid, "sop_instance_uid": t1c[i].sop_instance_uid,
                 "instance_number": t1c[i].instance_number,
                 "position_mm": round(float(positions[i]), 3),
                 "reason": plan.unpaired_reasons.get(i, f"no {target_kind} slice")}
                for i in pairing.unpaired]

    read = [_read_pixels(s.path) for s in t1c]
    shapes = {v.shape for v, _ in read}
    if len(shapes) != 1:
        return f"T1C slices differ in matrix size: {sorted(shapes)}"
    volume = np.stack([v for v, _ in read])
    net_grey = window_t1c(volume, t1c_ceiling)
    grey = display_grey(net_grey)
    t1c_idx = [i for i, _ in pairing.pairs]
    grey_paired = grey[t1c_idx]

    fusion_native: NDArray[np.uint8]
    suv_net: NDArray[np.float16] | None = None
    if target_kind == "fusion":
        raw = np.stack([_read_pixels(target[j].path)[0] for _, j in pairing.pairs])
        fusion_native = np.clip(raw, 0, 255).astype(np.uint8)
        if fusion_native.ndim != 4 or fusion_native.shape[-1] != 3:
            return f"fusion pixels have shape {fusion_native.shape}, expected (H, W, 3)"
    else:
        assert plan.stack is not None and plan.suv is not None
        pet = [_read_pixels(target[j].path)[0] * np.float32(plan.suv.factors[j])
               for j in plan.stack.order]
        planes = [plane_of(t1c[i]) for i in t1c_idx]
        suv, _ = resample_to_planes(np.stack(pet), plan.stack,
                                    [p for p in planes if p is not None], plan.t1c_to_pet)
        fusion_native = to_uint8(fuse(grey_paired, suv, style))
        suv_net = to_network(suv, size)[0][:, 0].numpy().astype(np.float16)

    t1c_net = to_network(net_grey[t1c_idx], size)[0][:, 0].numpy()
    ground_truth = None
    has_tumour = np.zeros(len(t1c_idx), dtype=bool)
    npz_path = find_ground_truth(study, [t1c[0].path], root)
    if npz_path is not None:
        ground_truth, has_tumour = _ground_truth_arrays(npz_path, t1c, t1c_idx, grey, size,
                                                         style)
    return StudyPairs(
        patient_id=study.patient_id, study_uid=study.uid,
        t1c=np.clip(t1c_net, 0.0, t1c_ceiling).astype(np.float16),
        t1c_backdrop=grey_to_network(grey_paired, size),
        fusion=rgb_to_network(fusion_native, size),
        slice_position_mm=positions[t1c_idx].astype(np.float32),
        has_tumour=has_tumour, ground_truth=ground_truth, unpaired=unpaired,
        target=target_kind, pairing=pairing.method, pet_suv=suv_net,
        suv=plan.suv.as_dict() if plan.suv is not None else None)


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


def concatenate_pairs(built: Sequence[StudyPairs]) -> tuple[dict[str, NDArray[np.generic]], bool]:
    """The arrays of ``pairs.npz`` from the studies' pairs, and whether they hold ground
    truth (only when every study has it)."""
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
    if all(b.pet_suv is not None for b in built):
        arrays["pet_suv"] = np.concatenate([b.pet_suv for b in built
                                            ])
    with_truth = [b.ground_truth is not None for b in built]
    if all(with_truth):
        for key in GROUND_TRUTH_ARRAYS:
            arrays[key] = np.concatenate([b.ground_truth[key] for b in built  # type: ignore[index]
                                          ])
    elif any(with_truth):
        logger.warning("only %d of %d studies have ground truth; ground truth left out",
                       sum(with_truth), len(built))
    return arrays, all(with_truth)


def split_pairs(patient_ids: NDArray[np.generic], method: str, seed: int) -> Splits:
    """:func:`split_indices` without the slice split's warning (the caller reports it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatientLeakWarning)
        return split_indices([str(p) for p in patient_ids], method, seed)
