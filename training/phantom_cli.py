"""``dicom-node-train phantom``: write a seeded cohort of phantom PET/MR studies.

    dicom-node-train phantom --patients 30 --seed 0 --out var/phantoms
        [--pet-layout scanner|same-grid] [--fusion none|t1c-refs|bare]
        [--pet-matrix 172] [--pet-pixel-spacing-mm 2.09] [--pet-slice-spacing-mm 2.03]

One folder per patient (``<out>/PH0001/DICOM/{T1C,PET[,FUSION]}`` plus
``ground_truth.json`` / ``ground_truth.npz``). The PET is written as a PET/MR scanner
writes it (``--pet-layout scanner``, the default: its own grid, Bq/mL, no fusion unless
``--fusion`` asks) or on the T1C's grid in SUV-like units with a fusion series
(``--pet-layout same-grid``, the layout the shipped model was trained on); patient ``i`` depends only on
``(seed, i, geometry)``, so a larger cohort with the same seed extends a smaller one.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from tqdm import tqdm

from training.phantom import PhantomGeometry, generate_patient
from training.phantom_dicom import FUSION_EXPORTS, PET_LAYOUTS, ScannerPet, write_patient

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patients", type=int, required=True, help="number of patients")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--first-index", type=int, default=0,
                        help="index of the first patient (default 0 -> PH0001)")
    parser.add_argument("--slice-spacing-mm", type=float, default=2.0,
                        help="slice thickness and spacing in mm (default 2)")
    parser.add_argument("--slices", type=int, default=None,
                        help="number of slices (default: cover 170 mm)")
    parser.add_argument("--matrix", type=int, default=256, help="rows = columns (default 256)")
    parser.add_argument("--pixel-spacing-mm", type=float, default=None,
                        help="in-plane pixel spacing (default 256 mm / matrix)")
    parser.add_argument("--pet-layout", choices=PET_LAYOUTS, default="scanner",
                        help="scanner (default): PET on its own grid in Bq/mL; same-grid: "
                             "PET on the T1C grid in SUV-like units plus a fusion series")
    parser.add_argument("--fusion", choices=FUSION_EXPORTS, default=None,
                        help="fusion export: none, t1c-refs (RGB SC referencing the T1C) or "
                             "bare (no references); default none for scanner, the T1C+PET "
                             "referencing fusion for same-grid")
    parser.add_argument("--pet-matrix", type=int, default=172,
                        help="scanner layout: PET rows = columns (default 172)")
    parser.add_argument("--pet-pixel-spacing-mm", type=float, default=2.09,
                        help="scanner layout: PET pixel spacing (default 2.09)")
    parser.add_argument("--pet-slice-spacing-mm", type=float, default=2.03,
                        help="scanner layout: PET slice spacing (default 2.03)")
    parser.add_argument("--workers", type=int, default=1,
                        help="patients generated at once in worker processes (default 1); "
                             "the output is the same with any number")


Row = tuple[str, int, str, str, str, float]


def make_patient(index: int, seed: int, geometry: PhantomGeometry, out: Path,
                 pet_layout: str = "same-grid", scanner: ScannerPet | None = None,
                 fusion: str | None = None) -> Row:
    """Generate and write patient ``index``; its summary row."""
    tick = time.perf_counter()
    patient = generate_patient(index, seed, geometry)
    write_patient(patient, out, pet_layout=pet_layout, scanner=scanner, fusion=fusion)
    kinds = ",".join(t.kind.value.split("_")[0] for t in patient.tumours) or "-"
    tbr_max = ",".join(f"{t.tbr_max:.2f}" for t in patient.tumours) or "-"
    tbr_mean = ",".join(f"{t.tbr_mean:.2f}" for t in patient.tumours) or "-"
    return (patient.patient_id, len(patient.tumours), kinds, tbr_max, tbr_mean,
            time.perf_counter() - tick)


def run(args: argparse.Namespace) -> int:
    if args.patients < 1:
        print("--patients must be at least 1")
        return 2
    pixel = args.pixel_spacing_mm or 256.0 / args.matrix
    geometry = PhantomGeometry(rows=args.matrix, cols=args.matrix, pixel_spacing_mm=pixel,
                               slice_spacing_mm=args.slice_spacing_mm, n_slices=args.slices)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    indices = range(args.first_index, args.first_index + args.patients)
    try:
        scanner = ScannerPet(matrix=args.pet_matrix, pixel_spacing_mm=args.pet_pixel_spacing_mm,
                             slice_spacing_mm=args.pet_slice_spacing_mm)
    except ValueError as exc:
        print(f"phantom: {exc}")
        return 2
    make = partial(make_patient, seed=args.seed, geometry=geometry, out=out,
                   pet_layout=args.pet_layout, scanner=scanner, fusion=args.fusion)
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(tqdm(pool.map(make, indices), total=len(indices), desc="phantoms",
                             unit="patient"))
    else:
        rows = [make(index) for index in tqdm(indices, desc="phantoms", unit="patient")]
    elapsed = time.perf_counter() - started
    print()
    print(f"{'patient':<8} {'tumours':>7}  {'types':<22} {'TBRmax':<12} {'TBRmean':<12} {'s':>5}")
    for pid, n, kinds, tmax, tmean, seconds in rows:
        print(f"{pid:<8} {n:>7}  {kinds:<22} {tmax:<12} {tmean:<12} {seconds:>5.1f}")
    with_tumour = sum(1 for r in rows if r[1] > 0)
    print(f"{len(rows)} patients ({with_tumour} with tumour), {geometry.slices} slices of "
          f"{geometry.rows}x{geometry.cols} each, PET layout {args.pet_layout}, "
          f"{elapsed:.1f} s, written to {out}")
    return 0
