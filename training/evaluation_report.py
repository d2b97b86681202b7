"""The files of an evaluation report: report.md, metrics.csv, tbr.csv, the figures and
summary.json (what :func:`training.evaluate.evaluate` writes)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from training import data as ds
from training.evaluation import IMAGE_METRICS, UPTAKE_METRICS, Method, Roi, example_slices
from training.metrics import FSIM_NAME, PSNR_CAP_DB, Correlation

STUDY: dict[str, Any] = {"psnr": (31.075, 3.976), "mse": (0.001, 0.001), "ssim": (0.868, 0.079),
         "fsim": (0.922, 0.044), "r_tbrmax": 0.706, "r_tbrmean": 0.901}
COMPARABILITY = (
    "Phantom figures are not comparable with the study's clinical figures: the phantom's "
    "anatomy, noise, tumour-uptake model and fusion rendering are simplified constructs of "
    "ours (and the study split slices at random, so one patient's slices sat in both train "
    "and test), which is why the model is judged against the oracle and the baselines on "
    "the same slices rather than against the published numbers."
)


def _fmt(value: Any, sd: Any = None, digits: int = 3) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a"
    text = f"{value:.{digits}f}"
    if isinstance(sd, int | float) and math.isfinite(sd):
        text += f" ± {sd:.{digits}f}"
    return text


def write_report(out: Path, summary: dict[str, dict[str, Any]], check: dict[str, Any],
                 meta: dict[str, Any]) -> None:
    methods = list(summary)
    lines = [f"# Evaluation: {meta['weights_name']} on the {meta['split']} split", ""]
    lines += [f"- Weights: `{meta['weights']}` (sha256 `{meta['sha256']}`), "
              f"{meta['architecture']}, ngf {meta['ngf']}, output {meta['output_kind']}",
              f"- Dataset: `{meta['dataset']}` (split method {meta['split_method']}); "
              f"{meta['n_slices']} slices of {meta['n_patients']} patients, "
              f"{meta['n_tumour_slices']} with tumour; TBR ROIs: {meta['n_roi_slices']} "
              f"slice ROIs, {meta['n_roi_patients']} patient lesions",
              f"- Command: `{meta['command']}`",
              ("- The model's uptake is smoothed along the slice normal (Gaussian SD "
               f"{meta['slice_smoothing_mm']:g} mm; each run of contiguous slices at its "
               f"own spacing, here a median {meta['slice_spacing_mm']:g} mm) before it is "
               "fused, as the node does with this model card."
               if meta.get("slice_smoothing_mm") else
               "- The model's output is not smoothed along the slice normal."),
              f"- FSIM: {FSIM_NAME} (data_range 1.0). SSIM: skimage structural_similarity, "
              "channel_axis=-1, data_range=1.0. Images scaled to [0, 1]; PSNR capped at "
              f"{PSNR_CAP_DB:.0f} dB for identical images.",
              "- Uptake for the PET-specific metrics and TBR is de-fused from each fusion "
              "with `dicom_node.inference.fusion.defuse` (real fusion -> real uptake), scaled by "
              f"1/{meta['uptake_scale']:g}; brain = brain mask, tumour = ground-truth "
              "tumour labels; TBR background = brain & ~tumour & ~oedema & ~striatum of "
              "the slice (of the patient's slices when the slice has too little).",
              *(["- `oracle`: the oracle uptake (resampled to the network size like the "
                 "real uptake) fused exactly as the model's uptake is, at the network size; "
                 "the checks compare with it. `oracle_native`: the phantom's oracle fusion, "
                 "drawn at the native matrix and resampled like the reference, so its "
                 "overlay edges are anti-aliased as the reference's are, which no fusion "
                 "drawn at the network size can be (shown for comparison only)."]
                if "oracle_native" in summary else []),
              "", "## Results", ""]
    header = "| metric | " + " | ".join(methods) + " | published study |"
    lines += [header, "|" + "---|" * (len(methods) + 2)]
    rows: list[tuple[str, str, Any]] = [
            ("PSNR (dB)", "psnr", f"{STUDY['psnr'][0]} ± {STUDY['psnr'][1]}"),
            ("MSE", "mse", f"{STUDY['mse'][0]} ± {STUDY['mse'][1]}"),
            ("SSIM", "ssim", f"{STUDY['ssim'][0]} ± {STUDY['ssim'][1]}"),
            ("FSIM", "fsim", f"{STUDY['fsim'][0]} ± {STUDY['fsim'][1]}"),
            ("uptake PSNR brain (dB)", "uptake_psnr_brain", "-"),
            ("uptake SSIM brain", "uptake_ssim_brain", "-"),
            ("uptake PSNR tumour (dB)", "uptake_psnr_tumour", "-"),
            ("uptake SSIM tumour", "uptake_ssim_tumour", "-")]
    for label, key, study in rows:
        digits = 4 if key == "mse" else 3
        cells = [_fmt(summary[m].get(key), summary[m].get(f"{key}_sd"), digits) for m in methods]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {study} |")
    for label, key, study in (("r TBRmax, slices", "r_tbrmax_slices", STUDY["r_tbrmax"]),
                              ("r TBRmean, slices", "r_tbrmean_slices", STUDY["r_tbrmean"]),
                              ("r TBRmax, patients", "r_tbrmax_patients", "-"),
                              ("r TBRmean, patients", "r_tbrmean_patients", "-")):
        cells = [_fmt(summary[m].get(key)) for m in methods]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {study} |")
    lines += ["", COMPARABILITY, "", "## TBR agreement (real vs synthetic, Pearson)", "",
              "| method | level | TBRmax r [95% CI], p, n | TBRmean r [95% CI], p, n |",
              "|---|---|---|---|"]
    for m in methods:
        for level in ("slices", "patients"):
            cells = []
            for key in ("tbrmax", "tbrmean"):
                corr = summary[m].get(f"corr_{key}_{level}")
                cells.append(Correlation(**corr).text() if corr else "n/a")
            lines.append(f"| {m} | {level} | {cells[0]} | {cells[1]} |")
    lines += ["", "## Checks (issue 3, section 5)", ""]
    if not check:
        lines.append("No checks could be run (no phantom masks in the dataset).")
    for item in check.values():
        lines.append(f"- **{'PASS' if item['pass'] else 'FAIL'}**: {item['text']}")
        lines += [f"  - {d}" for d in item["detail"]]
    if "oracle" not in summary:
        lines.append("- oracle checks: n/a (the dataset has no oracle_fusion)")
    lines += ["", "## Files", "",
              "- `metrics.csv`: per slice and method; `tbr.csv`: per ROI and method; "
              "`summary.json`: the figures above",
              "- `tbr_scatter.png`, `tbr_bland_altman.png` (model, slice ROIs), "
              "`tbr_scatter_patients.png`, `examples.png`, `methods.png`", ""]
    (out / "report.md").write_text("\n".join(lines))


def json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_tables(out: Path, methods: list[Method], rois: list[Roi],
                 real_tbr: dict[str, dict[str, NDArray[np.float64]]]) -> None:
    """``metrics.csv`` (per slice and method) and ``tbr.csv`` (per ROI and method)."""
    keys = ["method", "index", "patient_id", "slice_position_mm", "has_tumour",
            *IMAGE_METRICS, *UPTAKE_METRICS]
    with (out / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, restval="")
        writer.writeheader()
        for method in methods:
            writer.writerows(method.rows)
    with (out / "tbr.csv").open("w", newline="") as handle:
        tbr_writer = csv.writer(handle)
        tbr_writer.writerow(["method", "level", "patient_id", "lesion", "TBRmax_real",
                         "TBRmax_synthetic", "TBRmean_real", "TBRmean_synthetic"])
        for method in methods:
            for level, tbrs in (("slice", method.tbr_slices), ("patient", method.tbr_patients)):
                if not tbrs:
                    continue
                level_rois = [r for r in rois if r.level == level]
                reference = real_tbr["slices" if level == "slice" else "patients"]
                for k, roi in enumerate(level_rois):
                    tbr_writer.writerow([method.name, level, roi.patient_id, roi.label,
                                     reference["TBRmax"][k], tbrs["TBRmax"][k],
                                     reference["TBRmean"][k], tbrs["TBRmean"][k]])


def write_figures(out: Path, methods: list[Method],
                  real_tbr: dict[str, dict[str, NDArray[np.float64]]],
                  summary: dict[str, dict[str, Any]], data: ds.PairedDataset,
                  idx: NDArray[np.int64], grey: NDArray[np.float32], real: NDArray[np.uint8],
                  examples: int) -> None:
    """The TBR plots of the model (the first method), the example grid and the method bars."""
    from training import plots

    model_method = methods[0]
    fusion = model_method.fusion
    if real_tbr and model_method.tbr_slices:
        plots.tbr_scatter(real_tbr["slices"], model_method.tbr_slices, out / "tbr_scatter.png",
                          "model vs real, tumour-bearing slices")
        plots.tbr_bland_altman(real_tbr["slices"], model_method.tbr_slices,
                               out / "tbr_bland_altman.png", "model vs real, slices")
        plots.tbr_scatter(real_tbr["patients"], model_method.tbr_patients,
                          out / "tbr_scatter_patients.png", "model vs real, patient lesions")
    picks = example_slices(data, idx, examples)
    plots.example_grid(grey[picks], real[picks].astype(np.float32) / 255.0,
                       fusion[picks].astype(np.float32) / 255.0,
                       [f"{data.patient_id[idx[p]]} z={data.slice_position_mm[idx[p]]:.0f}"
                        + (" T" if data.has_tumour[idx[p]] else "") for p in picks],
                       out / "examples.png")
    plots.method_bars(summary, ["psnr", "ssim", "fsim", "uptake_psnr_brain",
                                "uptake_ssim_tumour", "r_tbrmean_slices"], out / "methods.png")


def write_summary(out: Path, meta: dict[str, Any], summary: dict[str, dict[str, Any]],
                  check: dict[str, Any]) -> dict[str, Any]:
    """``report.md`` and ``summary.json``; the summary as written."""
    write_report(out, summary, check, meta)
    result = json_safe({"meta": meta, "methods": summary, "checks": check,
                        "published_study": STUDY})
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return dict(result)
