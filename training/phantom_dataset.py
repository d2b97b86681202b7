"""``dicom-node-train phantom-dataset``: a phantom cohort built straight into a dataset.

    dicom-node-train phantom-dataset --patients 1200 --seed 100 --out ds \\
        --tumour-count-p 0,0.4,0.6 --normal-slice-fraction 0.2 --lean --workers 2

The same arrays as ``phantom`` followed by ``dataset`` (the T1C windowed over the whole
series and resampled with :func:`dicom_node.inference.resampling.to_network`, the uptake and the
masks resampled as :mod:`training.pair_arrays` resamples them), computed in memory without
writing DICOM files: about 1.1 s a patient on 2 cores instead of about 4.5 s. Meant for
training cohorts, which are large; evaluation cohorts go through the node itself
(``dicom-node-train benchmark``).

Training cohorts may differ from the population on purpose, and ``dataset.json`` says how:

- ``--tumour-count-p P0,P1,P2``: the probabilities of 0, 1 and 2 tumours per patient
  (default the phantom's own, 0.1,0.6,0.3); enriching the cohort with tumours gives the
  network more lesions to learn the T1C -> uptake relation from, instead of more passes
  over the same few (which it memorises).
- ``--normal-slice-fraction F``: keep every slice within ``--tumour-reach-slices`` of a
  tumour, and a seeded fraction F of the other slices (default 1: every slice).
- ``--lean``: leave out the RGB arrays (``fusion``, ``oracle_fusion``) and the backdrop,
  which an uptake model does not train on (a fifth of the memory).
- ``--pet-layout scanner`` (the default, as ``phantom``'s): adds ``pet_suv``, the uptake
  target an uptake model learns (:func:`training.data.uptake_array`), made the way a
  site's exports are: the PET series a PET/MR writes (own grid, Bq/mL, per-slice
  RescaleSlope, :func:`training.phantom_dicom.scanner_pet_series`), SUVbw by the book
  (:func:`training.suv.suv_scale`) and trilinear resampling into the T1C planes
  (:func:`training.pet_volume.resample_to_planes`), exactly as ``dataset`` reads those files.
  ``same-grid``: the PET on the T1C's grid in SUV units (the layout of fdopa-demo <= 3.3).

Splits: the last ``--val-patients`` patients are the validation split (for the training
curves only; model choices are made with ``benchmark`` on a separate cohort), the rest
train; there is no test split.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from dicom_node.inference.fusion import (
    NETWORK_T1C_CEILING,
    check_ceiling,
    display_grey,
    fuse,
    to_uint8,
    window_t1c,
)
from dicom_node.inference.fusion_style import FusionStyle
from dicom_node.inference.resampling import to_network
from dicom_node.series.volume import modality_values
from training.dataset_io import write_atomic, write_json
from training.pair_arrays import grey_to_network, nearest_to_network, rgb_to_network
from training.pet_volume import PlaneGeometry, resample_to_planes, stack_geometry
from training.phantom import NUMBER_OF_TUMOURS_P, PhantomGeometry, PhantomPatient, generate_patient
from training.phantom_dicom import (
    AXIAL_ORIENTATION,
    PET_LAYOUTS,
    ScannerPet,
    patient_uids,
    scanner_pet_series,
)
from training.suv import suv_scale

LEAN_LEAVES_OUT = ("fusion", "oracle_fusion", "t1c_backdrop")


@dataclass(frozen=True)
class CohortSpec:
    """How a phantom training cohort is drawn."""

    seed: int
    size: int = 128
    slice_spacing_mm: float = 3.0
    tumour_count_p: tuple[float, float, float] = NUMBER_OF_TUMOURS_P
    normal_slice_fraction: float = 1.0
    tumour_reach_slices: int = 2
    lean: bool = False
    pet_layout: str = "scanner"
    t1c_ceiling: float = NETWORK_T1C_CEILING  # the stored grey's clip (window_t1c)

    def __post_init__(self) -> None:
        check_ceiling(self.t1c_ceiling)
        if self.pet_layout not in PET_LAYOUTS:
            raise ValueError(f"pet_layout must be one of {PET_LAYOUTS}, got {self.pet_layout!r}")
        p = self.tumour_count_p
        if len(p) != 3 or min(p) < 0 or abs(sum(p) - 1.0) > 1e-6:
            raise ValueError("tumour_count_p must be three probabilities summing to 1")
        if not 0.0 <= self.normal_slice_fraction <= 1.0:
            raise ValueError("normal_slice_fraction must lie in [0, 1]")
        if self.tumour_reach_slices < 0:
            raise ValueError("tumour_reach_slices must be >= 0")

    @property
    def geometry(self) -> PhantomGeometry:
        return PhantomGeometry(slice_spacing_mm=self.slice_spacing_mm)


def kept_slices(labels: NDArray[np.uint8], spec: CohortSpec, index: int) -> NDArray[np.int64]:
    """Slices kept of one patient: those within reach of a tumour, and a seeded fraction of
    the others (the same for a patient whatever the cohort's size)."""
    tumour: NDArray[np.bool_] = np.asarray(labels.reshape(len(labels), -1).any(axis=1))
    near = tumour.copy()
    for shift in range(1, spec.tumour_reach_slices + 1):
        near[shift:] |= tumour[:-shift]
        near[:-shift] |= tumour[shift:]
    rng = np.random.default_rng([spec.seed, index, 7])
    others = rng.random(len(labels)) < spec.normal_slice_fraction
    return np.flatnonzero(near | others).astype(np.int64)


def _float_list(values: object) -> tuple[float, ...]:
    return tuple(float(v) for v in values)  # type: ignore[attr-defined]


def _xyz(values: object) -> tuple[float, float, float]:
    x, y, z = _float_list(values)
    return (x, y, z)


def scanner_layout_uptake(patient: PhantomPatient, keep: NDArray[np.int64],
                          grid: ScannerPet | None = None) -> NDArray[np.float32]:
    """SUVbw on the kept T1C planes, read from the scanner-layout PET series as ``dataset``
    reads those files: stored values times RescaleSlope, times the series' SUV factors,
    trilinear into each T1C plane (same frame of reference: no registration)."""
    series = scanner_pet_series(patient, grid or ScannerPet())
    scale = suv_scale(series)
    planes = [PlaneGeometry(position=_xyz(ds.ImagePositionPatient),
                            orientation=_float_list(ds.ImageOrientationPatient),
                            pixel_spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
                            shape=(int(ds.Rows), int(ds.Columns))) for ds in series]
    stack = stack_geometry(planes)
    pet = []
    for j in stack.order:
        ds = series[j]
        pet.append(modality_values(ds, ds.pixel_array) * np.float32(scale.factors[j]))
    g = patient.geometry
    t1c_planes = [PlaneGeometry(position=_xyz([round(v, 4) for v in g.image_position(int(k))]),
                                orientation=tuple(AXIAL_ORIENTATION),
                                pixel_spacing=(g.pixel_spacing_mm, g.pixel_spacing_mm),
                                shape=(g.rows, g.cols)) for k in keep]
    suv, _ = resample_to_planes(np.stack(pet), stack, t1c_planes)
    return suv


def patient_arrays(index: int, spec: CohortSpec) -> dict[str, NDArray[np.generic]]:
    """The dataset arrays of patient ``index`` (what ``phantom`` + ``dataset`` would store)."""
    torch.set_num_threads(1)
    patient = generate_patient(index, spec.seed, spec.geometry,
                               tumour_count_p=spec.tumour_count_p)
    size = spec.size
    keep = kept_slices(patient.tumour_labels, spec, index)
    net_grey = window_t1c(patient.t1c, spec.t1c_ceiling)
    grey = display_grey(net_grey)
    uids = patient_uids(patient)
    z = patient.geometry.axis_mm(0)[keep].astype(np.float32)
    labels = patient.tumour_labels[keep].astype(np.uint8)
    out: dict[str, NDArray[np.generic]] = {
        "t1c": np.clip(to_network(net_grey[keep], size)[0][:, 0].numpy(), 0.0,
                       spec.t1c_ceiling).astype(np.float16),
        "patient_id": np.array([patient.patient_id] * len(keep), dtype=str),
        "study_uid": np.array([uids.study] * len(keep), dtype=str),
        "slice_position_mm": z,
        "has_tumour": np.asarray(labels.reshape(len(keep), -1).any(axis=1)),
        "uptake": to_network(patient.uptake[keep].astype(np.float32), size)[0][:, 0]
        .numpy().astype(np.float16),
        "oracle_uptake": to_network(patient.oracle_uptake[keep].astype(np.float32), size)[0][
            :, 0].numpy().astype(np.float16),
        "tumour_labels": nearest_to_network(labels, size),
        "brain_mask": nearest_to_network(patient.brain_mask[keep], size),
        "striatum_mask": nearest_to_network(patient.striatum_mask[keep], size),
        "oedema": nearest_to_network(patient.oedema[keep], size),
    }
    measured = scanner_layout_uptake(patient, keep) if spec.pet_layout == "scanner" else None
    if measured is not None:  # the measured PET, what an uptake model learns
        out["pet_suv"] = to_network(measured, size)[0][:, 0].numpy().astype(np.float16)
    if not spec.lean:
        style = patient.fusion_style
        out["t1c_backdrop"] = grey_to_network(grey[keep], size)
        out["fusion"] = rgb_to_network(
            patient.fusion[keep] if measured is None
            else to_uint8(fuse(grey[keep], measured, style)), size)
        out["oracle_fusion"] = rgb_to_network(
            to_uint8(fuse(grey[keep], patient.oracle_uptake[keep], style)), size)
    out["tumours"] = np.array([len(patient.tumours)], dtype=np.int64)
    return out


def build_phantom_dataset(spec: CohortSpec, patients: int, out_dir: Path, val_patients: int = 0,
                          workers: int = 1, progress: bool = True) -> dict[str, object]:
    """Generate ``patients`` patients of ``spec`` and write the dataset folder."""
    if patients < 1:
        raise ValueError("patients must be at least 1")
    if not 0 <= val_patients < patients:
        raise ValueError("val_patients must lie in [0, patients)")
    started = time.perf_counter()
    make = partial(patient_arrays, spec=spec)
    indices = range(patients)
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(tqdm(pool.map(make, indices, chunksize=4), total=patients,
                              desc="phantoms", unit="patient", disable=not progress))
    else:
        parts = [make(i) for i in tqdm(indices, desc="phantoms", unit="patient",
                                       disable=not progress)]
    tumours = [int(p.pop("tumours")[0]) for p in parts]
    arrays = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    counts = [len(p["t1c"]) for p in parts]
    boundary = sum(counts[: patients - val_patients])
    n = len(arrays["t1c"])
    val_ids = sorted({str(x) for x in arrays["patient_id"][boundary:]})
    train_ids = sorted({str(x) for x in arrays["patient_id"][:boundary]})
    splits = {"method": "patient", "seed": spec.seed, "leaks_patients": False,
              "train": list(range(boundary)), "val": list(range(boundary, n)), "test": [],
              "patients": {"train": train_ids, "val": val_ids, "test": []}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "pairs.npz", lambda handle: np.savez(handle, **arrays))  # type: ignore[arg-type]
    write_json(out / "splits.json", splits)
    info: dict[str, object] = {
        "size": spec.size,
        "t1c_ceiling": spec.t1c_ceiling,
        "source": f"phantom-dataset seed {spec.seed}",
        "phantom_cohort": {"seed": spec.seed, "patients": patients,
                           "slice_spacing_mm": spec.slice_spacing_mm,
                           "tumour_count_p": list(spec.tumour_count_p),
                           "normal_slice_fraction": spec.normal_slice_fraction,
                           "tumour_reach_slices": spec.tumour_reach_slices,
                           "lean": spec.lean, "pet_layout": spec.pet_layout,
                           "left_out": list(LEAN_LEAVES_OUT) if spec.lean else []},
        "counts": {"pairs": n, "patients": patients, "tumours": sum(tumours),
                   "tumour_slices": int(np.asarray(arrays["has_tumour"]).sum())},
        "ground_truth": True,
        "fusion_style": FusionStyle().as_dict(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out / "dataset.json", info)
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patients", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True, help="cohort seed")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--slice-spacing-mm", type=float, default=3.0)
    parser.add_argument("--tumour-count-p", default=",".join(f"{p:g}" for p in NUMBER_OF_TUMOURS_P),
                        help="probabilities of 0, 1, 2 tumours (default the phantom's)")
    parser.add_argument("--normal-slice-fraction", type=float, default=1.0)
    parser.add_argument("--tumour-reach-slices", type=int, default=2)
    parser.add_argument("--lean", action="store_true",
                        help="leave out the RGB arrays and backdrop (uptake training only)")
    parser.add_argument("--pet-layout", choices=PET_LAYOUTS, default="scanner",
                        help="the uptake target read from the PET as a PET/MR scanner writes "
                             "it (scanner, default) or on the T1C grid (same-grid)")
    parser.add_argument("--t1c-ceiling", type=float, default=NETWORK_T1C_CEILING,
                        help="clip of the stored T1C grey (1 = the display window, as "
                             "datasets before 3.3 were; default %(default)s keeps enhancement)")
    parser.add_argument("--val-patients", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    try:
        p = tuple(float(v) for v in str(args.tumour_count_p).split(","))
        spec = CohortSpec(seed=args.seed, size=args.size, slice_spacing_mm=args.slice_spacing_mm,
                          tumour_count_p=p,  # type: ignore[arg-type]
                          normal_slice_fraction=args.normal_slice_fraction,
                          tumour_reach_slices=args.tumour_reach_slices, lean=args.lean,
                          pet_layout=args.pet_layout, t1c_ceiling=args.t1c_ceiling)
        info = build_phantom_dataset(spec, args.patients, args.out, args.val_patients,
                                     args.workers)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    print(json.dumps(info["counts"]), f"{info['seconds']} s, written to {args.out}")
    return 0
