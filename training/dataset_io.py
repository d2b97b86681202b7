"""A training dataset on disk: writing it (atomically) and reading its pairs back.

On-disk format (the training code reads exactly this)::

    DSDIR/pairs.npz
        t1c               float16 (N, S, S)     windowed T1C in [0, t1c_ceiling] (dataset.json; 1 before 3.3)
        t1c_backdrop      uint8   (N, S, S)     the T1C as the fusion shows it: the windowed
                                                T1C as uint8 grey at the native matrix,
                                                resampled like the fusion (the exact pixels
                                                of the fusion where no uptake is drawn)
        fusion            uint8   (N, S, S, 3)  RGB fusion target
        patient_id        str     (N,)          PatientID of every pair
        study_uid         str     (N,)          StudyInstanceUID
        slice_position_mm float32 (N,)          ImagePositionPatient . T1C slice normal
        has_tumour        bool    (N,)          tumour on the slice (ground truth; else False)
      only when every study's target is a PET series:
        pet_suv           float16 (N, S, S)     the PET's SUVbw (training/suv.py) resampled
                                                into the T1C plane (training/pet_volume.py),
                                                then to the network size like ``uptake``
      only when every study has ground truth:
        uptake            float16 (N, S, S)     noisy PET uptake (SUV-like)
        oracle_fusion     uint8   (N, S, S, 3)  fusion of the oracle uptake, rendered at the
                                                native matrix and resampled like the fusion
        oracle_uptake     float16 (N, S, S)     the oracle uptake, resampled like ``uptake``
                                                (evaluation renders it at the network size,
                                                exactly as it renders an uptake model's
                                                output)
        tumour_labels     uint8   (N, S, S)     0 none, k lesion k
        brain_mask, striatum_mask, oedema  bool (N, S, S)
    DSDIR/splits.json
        {"method": "patient"|"slice", "seed": int, "leaks_patients": bool,
         "train": [indices], "val": [...], "test": [...],
         "patients": {"train": [ids], "val": [...], "test": [...]}}
    DSDIR/dataset.json
        size, pairing rules, source dir, counts, fusion style, per study its target,
        pairing method and SUV derivation, refused studies with their reasons and
        unpaired slices with theirs (docs/datasets.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import NDArray

from storage.file_store import atomic_writer
from training.pair_arrays import Splits


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    with atomic_writer(path) as handle:
        write(handle)


def write_json(path: Path, document: dict[str, object]) -> None:
    data = json.dumps(document, indent=2).encode()
    write_atomic(path, lambda handle: handle.write(data))


def write_dataset(out: Path, arrays: dict[str, NDArray[np.generic]], splits: Splits,
                  info: dict[str, object]) -> None:
    """``pairs.npz``, ``splits.json`` and ``dataset.json`` (``info``) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "pairs.npz",
                 lambda handle: np.savez_compressed(handle, **arrays))  # type: ignore[arg-type]
    write_json(out / "splits.json", splits.as_dict())
    write_json(out / "dataset.json", info)


@dataclass(frozen=True)
class DatasetSummary:
    out_dir: Path
    pairs: int
    studies_used: int
    skipped: list[dict[str, str]]
    unpaired: list[dict[str, object]]
    splits: Splits
    has_tumour: NDArray[np.bool_]
    patient_id: NDArray[np.str_]


def load_pairs(dataset_dir: Path) -> dict[str, NDArray[Any]]:
    """All arrays of ``pairs.npz`` (no pickled objects)."""
    with np.load(Path(dataset_dir) / "pairs.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def summary_table(summary: DatasetSummary) -> str:
    lines = [f"{'split':<6} {'pairs':>6} {'patients':>9} {'tumour slices':>14}"]
    for name in ("train", "val", "test"):
        idx = getattr(summary.splits, name)
        lines.append(f"{name:<6} {len(idx):>6} {len(set(summary.patient_id[idx].tolist())):>9} "
                     f"{int(summary.has_tumour[idx].sum()):>14}")
    lines.append(f"{'all':<6} {summary.pairs:>6} {len(set(summary.patient_id.tolist())):>9} "
                 f"{int(summary.has_tumour.sum()):>14}")
    return "\n".join(lines)
