"""``dicom-node-train evaluate``: weights on a dataset split -> report.md, CSV, PNG.

What is compared and measured: :mod:`training.evaluation`; the files written:
:mod:`training.evaluation_report`.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from dicom_node.errors import WeightsError
from dicom_node.inference.fusion import display_grey
from dicom_node.inference.model_weights import load_weights
from training import data as ds
from training.evaluation import (
    Method,
    checks,
    defuse_uptake,
    evaluation_runs,
    grey_fusion,
    image_rows,
    measure_tbr,
    oracle_methods,
    population_mean_fusion,
    predict,
    summarise,
    tbr_rois,
)
from training.evaluation_report import write_figures, write_summary, write_tables
from training.metrics import FSIM_NAME

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, type=Path, help="dataset folder")
    parser.add_argument("--weights", required=True, type=Path, help="weights file (.pt)")
    parser.add_argument("--split", choices=ds.SPLITS, default="test")
    parser.add_argument("--out", required=True, type=Path, help="report folder")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bin-mm", type=float, default=5.0,
                        help="slice-position bin of the population-mean baseline (%(default)s)")
    parser.add_argument("--examples", type=int, default=6, help="rows of the example grid")
    parser.add_argument("--slice-smoothing-mm", type=float, default=None,
                        help="smoothing of an uptake model's output along the slice normal "
                             "(Gaussian SD, mm) instead of the model card's: to choose it "
                             "on the validation split")


def command_line(args: argparse.Namespace) -> str:
    parts = ["dicom-node-train", "evaluate", "--dataset", str(args.dataset), "--weights",
             str(args.weights), "--split", args.split, "--out", str(args.out)]
    if args.bin_mm != 5.0:
        parts += ["--bin-mm", str(args.bin_mm)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if device == "auto":
        device = "cpu"
    try:
        summary = evaluate(args.dataset, args.weights, args.split, args.out, device=device,
                           batch_size=args.batch_size, bin_mm=args.bin_mm,
                           examples=args.examples, command=command_line(args),
                           slice_smoothing_mm=args.slice_smoothing_mm)
    except (ds.DatasetError, WeightsError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    print((args.out / "report.md").read_text())
    checks = summary.get("checks", {})
    print(f"report: {args.out / 'report.md'}; checks passed: "
          f"{sum(1 for c in checks.values() if c['pass'])}/{len(checks)}")
    return 0


def evaluate(dataset: Path, weights: Path, split: str, out: Path, device: str = "cpu",
             batch_size: int = 16, bin_mm: float = 5.0, examples: int = 6,
             command: str = "", slice_smoothing_mm: float | None = None) -> dict[str, Any]:
    """Evaluate ``weights`` on ``split`` of ``dataset``; writes the report into ``out``.
    ``slice_smoothing_mm`` replaces the model card's smoothing along the slice normal."""
    out.mkdir(parents=True, exist_ok=True)
    data = ds.load_dataset(dataset)
    idx = data.indices(split)
    if len(idx) == 0:
        raise ValueError(f"split {split!r} of {dataset} is empty")
    model = load_weights(weights, device)
    style = data.fusion_style
    if style.as_dict() != model.card.fusion_style.as_dict():
        log.warning("fusion style of the dataset %s differs from the model card's %s",
                    style.as_dict(), model.card.fusion_style.as_dict())
    if data.t1c_ceiling != model.card.t1c_input_ceiling:
        raise ValueError(f"the dataset's T1C grey is clipped at {data.t1c_ceiling:g}, the "
                         f"model reads "
                         f"it clipped at {model.card.t1c_input_ceiling:g}: build the dataset "
                         "with the model's --t1c-ceiling")
    uptake_scale = float(model.card.uptake_scale)
    grey = display_grey(data.t1c[idx])
    backdrop = data.backdrop(idx)
    real = data.fusion[idx]
    if slice_smoothing_mm is not None:  # checked like a model card's own value
        replace(model.card, slice_smoothing_mm=slice_smoothing_mm).validate()
    smoothing_mm = (model.card.slice_smoothing_mm if slice_smoothing_mm is None
                    else slice_smoothing_mm)
    fusion, _ = predict(model, data.input_grey(idx, model.card.context_slices), style,
                        batch_size, backdrop=backdrop, runs=evaluation_runs(data, idx),
                        positions_mm=data.slice_position_mm[idx],
                        slice_smoothing_mm=smoothing_mm)
    methods = [Method("model", fusion),
               *oracle_methods(data, idx, model.card.output_kind, style, backdrop)]
    methods.append(Method("t1c_grey", grey_fusion(backdrop)))
    methods.append(Method("population_mean", population_mean_fusion(data, idx, bin_mm)))

    has_masks = data.has("brain_mask")
    real_uptake = None
    if has_masks:
        real_uptake = defuse_uptake(real, backdrop, style)
        for method in tqdm(methods, desc="de-fusion", unit="method", leave=False):
            method.uptake = defuse_uptake(method.fusion, backdrop, style)
    rois = tbr_rois(data, idx)
    real_tbr: dict[str, dict[str, NDArray[np.float64]]] = {}
    if rois and real_uptake is not None:
        real_tbr = {"slices": measure_tbr(real_uptake, rois, "slice"),
                    "patients": measure_tbr(real_uptake, rois, "patient")}
    summary: dict[str, dict[str, Any]] = {}
    for method in methods:
        image_rows(method, real, real_uptake, data, idx, uptake_scale)
        if real_tbr and method.uptake is not None:
            method.tbr_slices = measure_tbr(method.uptake, rois, "slice")
            method.tbr_patients = measure_tbr(method.uptake, rois, "patient")
        summary[method.name] = summarise(method, real_tbr)
    check = checks(summary) if has_masks else {}

    write_tables(out, methods, rois, real_tbr)
    write_figures(out, methods, real_tbr, summary, data, idx, grey, real, examples)
    meta = {
        "weights": str(weights), "weights_name": model.card.name, "sha256": model.sha256,
        "architecture": model.card.architecture, "ngf": model.card.ngf,
        "output_kind": model.card.output_kind, "dataset": str(dataset), "split": split,
        "split_method": data.split_method, "n_slices": len(idx),
        "n_patients": len(set(data.patient_id[idx].tolist())),
        "n_tumour_slices": int(data.has_tumour[idx].sum()),
        "n_roi_slices": sum(1 for r in rois if r.level == "slice"),
        "n_roi_patients": sum(1 for r in rois if r.level == "patient"),
        "command": command or f"evaluate(dataset={dataset}, weights={weights}, split={split})",
        "uptake_scale": uptake_scale, "fsim": FSIM_NAME,
        "slice_smoothing_mm": smoothing_mm, "slice_spacing_mm": data.slice_spacing_mm(),
    }
    return write_summary(out, meta, summary, check)
