"""``dicom-node-train dataset``: paired T1C / fusion slices from a folder of DICOM studies.

    dicom-node-train dataset --studies DIR --out DSDIR --size 128 [--split patient|slice]
                             [--seed 0] [--node-config config.toml] [--max-pet-mr-gap-min 30]
    dicom-node-train dataset --studies DIR --check [--node-config config.toml]

The series chosen and the slices paired: :mod:`training.scanning` and
:mod:`training.study_plan` (which also refuses what it cannot trust, with a reason in
``dataset.json`` and on the console); the arrays and splits: :mod:`training.pair_arrays`;
the files written: :mod:`training.dataset_io` (the on-disk format).

``--check`` is the dry run a researcher runs first on a folder of exports: headers only,
per study which series were found, which T1C and target were chosen and how many slices
pair, or why the study is refused; nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dicom_node.config import SelectionConfig, load_config
from dicom_node.errors import ConfigError
from dicom_node.inference.fusion import NETWORK_T1C_CEILING, check_ceiling
from dicom_node.inference.fusion_style import FusionStyle
from training.dataset_io import DatasetSummary, summary_table, write_dataset
from training.pair_arrays import (
    SPLIT_METHODS,
    StudyPairs,
    build_study_pairs,
    concatenate_pairs,
    split_pairs,
)
from training.scanning import scan_studies
from training.study_plan import PairingRules, Refusal, StudyPlan, plan_study, series_report

logger = logging.getLogger(__name__)


def build_dataset(studies_dir: Path, out_dir: Path, size: int = 128, split: str = "patient",
                  seed: int = 0, style: FusionStyle | None = None, progress: bool = True,
                  workers: int = 1, selection: SelectionConfig | None = None,
                  pairing_rules: PairingRules | None = None,
                  t1c_ceiling: float = NETWORK_T1C_CEILING) -> DatasetSummary:
    """Scan, pair, resample, split and write a dataset (see the module docstring).

    ``workers`` > 1 builds that many studies at once in worker processes; the result is
    the same as with one. ``selection``: the node's series selection rules (default: the
    node's defaults). ``t1c_ceiling``: the clip of the stored T1C grey (window_t1c).
    """
    style = style or FusionStyle()
    if size < 16:
        raise ValueError("size must be at least 16")
    check_ceiling(t1c_ceiling)
    studies = scan_studies(studies_dir, progress=progress)
    built: list[StudyPairs] = []
    skipped: list[dict[str, str]] = []
    pairing_rules = pairing_rules or PairingRules()
    build = partial(build_study_pairs, root=Path(studies_dir), size=size, style=style,
                    rules=selection or SelectionConfig(), pairing_rules=pairing_rules,
                    t1c_ceiling=t1c_ceiling)
    pool_or_none = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=torch.set_num_threads, initargs=(1,))
                    if workers > 1 else nullcontext())
    with pool_or_none as pool:
        results: Iterable[StudyPairs | str] = (
            pool.map(build, studies) if pool is not None else map(build, studies))
        collected = list(tqdm(zip(studies, results, strict=True), total=len(studies),
                              desc="studies", unit="study", disable=not progress))
    for study, result in collected:
        if isinstance(result, str):
            skipped.append({"study_uid": study.uid, "patient_id": study.patient_id,
                            "reason": result})
            logger.info("study %s skipped: %s", study.uid, result)
        else:
            built.append(result)
    if not built:
        reasons = "; ".join(sorted({s["reason"] for s in skipped})) or "no DICOM study"
        raise ValueError(f"no usable study under {studies_dir}: {reasons}")
    arrays, with_truth = concatenate_pairs(built)
    splits = split_pairs(arrays["patient_id"], split, seed)
    unpaired = [u for b in built for u in b.unpaired]
    out = Path(out_dir)
    write_dataset(out, arrays, splits, {
        "size": size,
        "t1c_ceiling": t1c_ceiling,
        "pairing_rules": {"max_pet_mr_gap_min": pairing_rules.max_pet_mr_gap_min,
                          "gap_factor": pairing_rules.gap_factor},
        "source_dir": str(Path(studies_dir).resolve()),
        "counts": {"studies_found": len(studies), "studies_used": len(built),
                   "studies_skipped": len(skipped), "pairs": len(arrays["t1c"]),
                   "patients": len(set(arrays["patient_id"].tolist())),
                   "tumour_slices": int(arrays["has_tumour"].sum()),
                   "unpaired_t1c_slices": len(unpaired)},
        "ground_truth": with_truth,
        "fusion_style": style.as_dict(),
        "studies": [{"study_uid": b.study_uid, "patient_id": b.patient_id, "target": b.target,
                     "pairing": b.pairing, "pairs": len(b.t1c), "suv": b.suv}
                    for b in built],
        "skipped_studies": skipped,
        "unpaired_slices": unpaired,
    })
    return DatasetSummary(out_dir=out, pairs=len(arrays["t1c"]), studies_used=len(built),
                          skipped=skipped, unpaired=unpaired, splits=splits,
                          has_tumour=np.asarray(arrays["has_tumour"], dtype=bool),
                          patient_id=np.asarray(arrays["patient_id"], dtype=str))


def check_studies(studies_dir: Path, selection: SelectionConfig | None = None,
                  pairing_rules: PairingRules | None = None, progress: bool = False
                  ) -> list[dict[str, object]]:
    """The dry run: per study, its series and their roles, and what would be paired or why
    the study is refused. Reads headers only and writes nothing."""
    rows: list[dict[str, object]] = []
    for study in scan_studies(studies_dir, progress=progress):
        plan = plan_study(study, selection, pairing_rules)
        row: dict[str, object] = {"study_uid": study.uid, "patient_id": study.patient_id,
                                  "series": series_report(study, plan, selection)}
        if isinstance(plan, Refusal):
            row["refused"] = plan.reason
        else:
            assert isinstance(plan, StudyPlan)
            row.update({"target": plan.target_kind, "pairing": plan.pairing.method,
                        "pairs": len(plan.pairing.pairs),
                        "unpaired": {str(plan.t1c.slices[i].instance_number):
                                     plan.unpaired_reasons.get(i, "unpaired")
                                     for i in plan.pairing.unpaired},
                        "suv": plan.suv.as_dict() if plan.suv is not None else None})
        rows.append(row)
    return rows


def check_report(rows: list[dict[str, object]]) -> str:
    """The dry run as text, one block per study."""
    lines = []
    for row in rows:
        head = f"study {row['study_uid']} (patient {row['patient_id']})"
        if "refused" in row:
            lines.append(f"{head}: REFUSED: {row['refused']}")
        else:
            unpaired = row["unpaired"]
            assert isinstance(unpaired, dict)
            suv = row["suv"]
            suv_text = (f"; SUV: {suv['method']}" if isinstance(suv, dict) else "")
            lines.append(f"{head}: {row['pairs']} pairs with the {row['target']} series "
                         f"({row['pairing']}), {len(unpaired)} T1C slices unpaired{suv_text}")
            reasons = sorted(set(unpaired.values()))
            for reason in reasons:
                numbers = [k for k, v in unpaired.items() if v == reason]
                lines.append(f"    unpaired: {reason}: instances {', '.join(numbers)}")
        series = row["series"]
        assert isinstance(series, list)
        for s in series:
            lines.append(f"    {s['modality']:<3} {s['instances']:>4} x {s['description']!r}: "
                         f"{s['role']}  [{s['series_uid']}]")
    used = sum(1 for r in rows if "refused" not in r)
    lines.append(f"{len(rows)} studies found: {used} would be used, {len(rows) - used} refused "
                 "(dry run: nothing written)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--studies", type=Path, required=True, help="folder of DICOM studies")
    parser.add_argument("--out", type=Path, default=None,
                        help="dataset folder to write (required unless --check)")
    parser.add_argument("--check", action="store_true",
                        help="dry run: list per study the series found, paired and refused "
                             "(and why); write nothing")
    parser.add_argument("--max-pet-mr-gap-min", type=float, default=30.0,
                        help="refuse a PET whose acquisition is more than this many minutes "
                             "from the T1C's (not simultaneous; default 30)")
    parser.add_argument("--size", type=int, default=128, help="network size (default 128)")
    parser.add_argument("--t1c-ceiling", type=float, default=NETWORK_T1C_CEILING,
                        help="clip of the stored T1C grey, 1 = the display window "
                             "(default %(default)s: enhancement above the window is kept)")
    parser.add_argument("--split", choices=SPLIT_METHODS, default="patient",
                        help="patient (default) or slice (the paper's; leaks patients)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument("--workers", type=int, default=1,
                        help="studies built at once in worker processes (default 1)")
    parser.add_argument("--node-config", type=Path, default=None, metavar="PATH",
                        help="the node's TOML: choose T1C series with its [selection] rules "
                             "(default: the node's default rules)")


def run(args: argparse.Namespace) -> int:
    try:
        selection = (load_config(args.node_config).selection
                     if args.node_config is not None else SelectionConfig())
    except ConfigError as exc:
        print(f"dataset: --node-config: {exc}", file=sys.stderr)
        return 2
    try:
        pairing_rules = PairingRules(max_pet_mr_gap_min=args.max_pet_mr_gap_min)
    except ValueError as exc:
        print(f"dataset: {exc}", file=sys.stderr)
        return 2
    if args.check:
        rows = check_studies(args.studies, selection, pairing_rules)
        print(check_report(rows))
        return 0 if any("refused" not in r for r in rows) else 1
    if args.out is None:
        print("dataset: --out is required (or --check for a dry run)", file=sys.stderr)
        return 2
    try:
        summary = build_dataset(args.studies, args.out, size=args.size, split=args.split,
                                seed=args.seed, workers=max(1, args.workers),
                                selection=selection, pairing_rules=pairing_rules,
                                t1c_ceiling=args.t1c_ceiling)
    except ValueError as exc:
        print(f"dataset: {exc}", file=sys.stderr)
        return 2
    print()
    print(summary_table(summary))
    print(f"{summary.studies_used} studies used, {len(summary.skipped)} skipped, "
          f"{len(summary.unpaired)} unpaired T1C slices skipped; written to {summary.out_dir}")
    for item in summary.skipped:
        print(f"  refused study {item['study_uid']} (patient {item['patient_id']}): "
              f"{item['reason']}")
    reasons = sorted({str(u["reason"]) for u in summary.unpaired})
    for reason in reasons:
        count = sum(1 for u in summary.unpaired if u["reason"] == reason)
        print(f"  {count} T1C slices unpaired: {reason}")
    if summary.splits.leaks_patients:
        print(f"WARNING: --split {summary.splits.method} puts slices of the same patient in "
              "train, validation and test: test metrics are optimistic for new patients "
              "(use --split patient).", file=sys.stderr)
    return 0
