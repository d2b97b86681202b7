"""``dicom-node-train export``: a training checkpoint's generator as the node's weights file.

The weights file is :func:`dicom_node.inference.model_weights.save_weights` (fp16 by default)
with a :class:`~dicom_node.inference.model_weights.ModelCard` describing the architecture, the
output kind, the fusion style of the training data, how it was trained and the
validation (and, with ``--metrics``, test) figures. Prints the file's sha256.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.analysis.uncertainty import conformal_scores
from dicom_node.errors import WeightsError
from dicom_node.inference.generator import build_generator
from dicom_node.inference.model_weights import ModelCard, save_weights
from training.checkpoint import load_checkpoint

OUTPUT_KIND = {"fusion": "fusion_rgb", "uptake": "uptake"}
INTERVAL_FORMS = ("gaussian", "shifted", "conformal")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="RUNDIR/checkpoint.pt")
    parser.add_argument("--out", required=True, type=Path, help="weights file to write (.pt)")
    parser.add_argument("--name", default=None, help="model name (default from the target)")
    parser.add_argument("--version", default="1", help="model version (%(default)s)")
    parser.add_argument("--metrics", type=Path, default=None,
                        help="summary.json of an evaluate report: its figures go into the card")
    parser.add_argument("--fp32", action="store_true", help="keep float32 weights (default fp16)")
    parser.add_argument("--slice-smoothing-mm", type=float, default=0.0,
                        help="an uptake model's output smoothed along the slice normal by a "
                             "Gaussian of this SD (mm) wherever it is used; choose it on the "
                             "validation split with `evaluate --slice-smoothing-mm` "
                             "(default %(default)s: none)")
    parser.add_argument("--uptake-contrast-gain", type=float, default=1.0,
                        help="an uptake model's excess over its median drawn uptake "
                             "multiplied by this gain wherever it is used "
                             "(dicom_node/inference/uptake_contrast.py); choose it on the "
                             "validation cohort with `benchmark` (default %(default)s: none)")
    parser.add_argument("--test-weights", action="store_true",
                        help="mark the card as test weights (not a trained model)")
    parser.add_argument("--training-seeds", default="",
                        help="phantom cohort seeds trained on, comma-separated (the card's "
                             "cohorts; `benchmark` refuses them as test cohorts)")
    parser.add_argument("--validation-seeds", default="",
                        help="cohort seeds every choice was made on, comma-separated")
    parser.add_argument("--sealed-test-seed", type=int, default=None,
                        help="the sealed test cohort's seed, drawn after the choices were "
                             "frozen; `benchmark --cohort sealed-test` evaluates it once")
    parser.add_argument("--validation-benchmark", type=Path, action="append", default=[],
                        help="summary.json of `benchmark --cohort validation`, repeatable: "
                             "the first one's lesion figures go into the card (the others' "
                             "beside them), and the lesions of all of them calibrate the TBR "
                             "intervals (--interval-form; pooling needs benchmarks run with "
                             "uncertainty passes)")
    parser.add_argument("--interval-level", type=float, default=0.9,
                        help="two-sided level of the TBR intervals (%(default)s)")
    parser.add_argument("--interval-form", choices=INTERVAL_FORMS, default="gaussian",
                        help="gaussian: centred, residual SD and mean in quadrature with the "
                             "sampling SD; shifted: centred on the value corrected by the "
                             "residual mean, residual SD and sampling SD in quadrature; "
                             "conformal: split-conformal scores, not centred "
                             "(dicom_node/analysis/uncertainty.py; default %(default)s; "
                             "fdopa-demo chooses its form by leaving one validation cohort out)")
    parser.add_argument("--sealed-test-benchmark", type=Path, default=None,
                        help="summary.json of `benchmark --cohort sealed-test` of these very "
                             "weights: recorded in the card, which then refuses a second one")


def run(args: argparse.Namespace) -> int:
    metrics = None
    if args.metrics is not None:
        metrics = json.loads(args.metrics.read_text())
    try:
        cohorts = cohorts_from(args.training_seeds, args.validation_seeds, args.sealed_test_seed)
        validation = [json.loads(path.read_text()) for path in args.validation_benchmark]
        sealed = (json.loads(args.sealed_test_benchmark.read_text())
                  if args.sealed_test_benchmark else None)
        extras = benchmark_extras(validation, sealed, args.interval_level, cohorts,
                                  args.interval_form)
        sha, card = export_checkpoint(args.checkpoint, args.out, name=args.name,
                                      version=args.version, test_metrics=metrics,
                                      fp16=not args.fp32, test_weights=args.test_weights,
                                      slice_smoothing_mm=args.slice_smoothing_mm,
                                      uptake_contrast_gain=args.uptake_contrast_gain, **extras)
    except (FileNotFoundError, ValueError, WeightsError) as exc:
        print(f"error: {exc}")
        return 2
    smoothing = (f", smoothed {card.slice_smoothing_mm:g} mm along the slice normal"
                 if card.slice_smoothing_mm else "")
    if card.uptake_contrast_gain != 1.0:
        smoothing += f", contrast gain {card.uptake_contrast_gain:g}"
    print(f"wrote {args.out} ({card.architecture}, ngf {card.ngf}, {card.output_kind}{smoothing})")
    print(f"sha256: {sha}")
    return 0


def cohorts_from(training: str, validation: str, sealed: int | None) -> dict[str, Any]:
    def seeds(text: str) -> list[int]:
        return [int(v) for v in text.split(",") if v.strip()]

    out: dict[str, Any] = {}
    if training:
        out["training_seeds"] = seeds(training)
    if validation:
        out["validation_seeds"] = seeds(validation)
    if sealed is not None:
        if sealed in out.get("training_seeds", []) + out.get("validation_seeds", []):
            raise ValueError(f"--sealed-test-seed {sealed} is also a training or validation seed")
        out["sealed_test_seed"] = sealed
    return out


def _benchmark_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The lesion-level figures of a benchmark summary, compact for the card."""
    per = summary["per_source"]
    return {
        "seed": summary["meta"]["seed"], "cohort": summary["meta"]["cohort"],
        "patients": summary["patients"], "lesions": summary["lesions"],
        "weights_sha256": summary["meta"]["sha256"],
        "found": {s: per[s]["found"] for s in per},
        "false_foci_per_patient": {s: per[s]["false_foci_per_patient"] for s in per},
        "r_voi_tbr_max": {s: per[s]["voi_tbr_max"]["r"]["r"] for s in per if s != "real"},
        "r_voi_tbr_mean": {s: per[s]["voi_tbr_mean"]["r"]["r"] for s in per if s != "real"},
        "bias_voi_tbr_max": {s: per[s]["voi_tbr_max"]["bias"] for s in per if s != "real"},
        "intervals": {k: v for k, v in summary["intervals"].items()
                      if k != "calibration_pairs"},
        "checks_passed": [k for k, v in summary["checks"].items() if v["pass"]],
        "checks_failed": [k for k, v in summary["checks"].items() if not v["pass"]],
    }


def tbr_interval(validation: list[dict[str, Any]], level: float,
                 form: str = "gaussian") -> dict[str, Any]:
    """The card's interval calibration from validation benchmark summaries, over the
    lesions of all of them (dicom_node/analysis/uncertainty.py):

    - ``gaussian``: the residual (synthetic - real) SD and mean per lesion, over the
      lesions that have an interval among those found on both (a benchmark with
      uncertainty passes: its per-lesion pairs); one summary without pairs gives its own
      figures (every lesion found on both), as older cards had.
    - ``shifted``: the same SD and mean, with ``"form": "shifted"``: the node centres the
      interval on the value corrected by the mean instead of widening it by the mean.
    - ``conformal``: split-conformal scores, from the pairs only.
    """
    if form not in INTERVAL_FORMS:
        raise ValueError(f"--interval-form must be one of {INTERVAL_FORMS}")
    seeds = ", ".join(str(v["meta"]["seed"]) for v in validation)
    cohorts = f"validation cohort{'s' if len(validation) > 1 else ''} seed {seeds}"
    # (real - synthetic, sampling SD) per lesion: only in benchmarks run with uncertainty passes
    if not all("calibration_pairs" in v["intervals"] for v in validation):
        if form == "conformal" or len(validation) > 1:
            raise ValueError("every --validation-benchmark must be measured with uncertainty "
                             "passes (its per-lesion pairs) to pool cohorts or to calibrate "
                             "a conformal interval")
        first = validation[0]
        iv = first["intervals"]
        if form == "shifted" and not {"residual_bias_tbr_max", "residual_bias_tbr_mean"} <= iv.keys():
            raise ValueError("--interval-form shifted needs the residual mean, which this "
                             "--validation-benchmark summary lacks (measure it again)")
        return {**({"form": "shifted"} if form == "shifted" else {}),
                "residual_sd_tbr_max": iv["residual_sd_tbr_max"],
                "residual_sd_tbr_mean": iv["residual_sd_tbr_mean"],
                "residual_bias_tbr_max": iv.get("residual_bias_tbr_max", 0.0),
                "residual_bias_tbr_mean": iv.get("residual_bias_tbr_mean", 0.0),
                "level": level,
                "source": (f"{cohorts}, "
                           f"{first['per_source']['synthetic']['node_tbr_max']['r']['n']} "
                           "lesions found on real and synthetic")}
    out: dict[str, Any] = {"level": level}
    for measure in ("tbr_max", "tbr_mean"):
        pairs = [pair for v in validation for pair in v["intervals"]["calibration_pairs"][measure]]
        residuals = np.array([p[0] for p in pairs], dtype=np.float64)  # real - synthetic
        if not np.isfinite(np.array(pairs, dtype=np.float64)).all():
            raise ValueError("a validation lesion's residual or sampling SD is not finite")
        if len(residuals) < 2:
            raise ValueError(f"{len(residuals)} validation lesions found on real and "
                             "synthetic: too few to calibrate an interval")
        out[f"residual_sd_{measure}"] = float(np.std(residuals, ddof=1))
        out[f"residual_bias_{measure}"] = float(-np.mean(residuals))  # synthetic - real
        if form == "conformal":
            out.setdefault("conformal", {})[measure] = conformal_scores(
                residuals, [p[1] for p in pairs], level).as_dict()
    if form == "shifted":
        out["form"] = "shifted"
    lesions = sum(len(v["intervals"]["calibration_pairs"]["tbr_max"]) for v in validation)
    out["source"] = (f"{cohorts}, {lesions} lesions found on real and "
                     f"synthetic{', split-conformal' if form == 'conformal' else ''}")
    return out


def benchmark_extras(validation: list[dict[str, Any]], sealed: dict[str, Any] | None,
                     level: float, cohorts: dict[str, Any],
                     interval_form: str = "gaussian") -> dict[str, Any]:
    """Card fields from benchmark summaries: cohorts, interval calibration, figures."""
    extras: dict[str, Any] = {"cohorts": cohorts, "benchmarks": {}, "tbr_interval": {}}
    if interval_form != "gaussian" and not validation:
        raise ValueError(f"--interval-form {interval_form} needs a --validation-benchmark")
    if validation:
        if any(v["meta"]["cohort"] != "validation" for v in validation):
            raise ValueError("a --validation-benchmark is not a validation cohort's summary")
        seeds = [v["meta"]["seed"] for v in validation]
        if len({v["meta"]["sha256"] for v in validation}) > 1:
            raise ValueError("the --validation-benchmark summaries are of different weights")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"--validation-benchmark: seed given twice ({seeds})")
        declared = set(cohorts.get("validation_seeds", []))
        if declared and not set(seeds) <= declared:
            raise ValueError(f"--validation-benchmark seeds {seeds} are not all among "
                             f"--validation-seeds {sorted(declared)}")
        extras["benchmarks"]["validation"] = _benchmark_figures(validation[0])
        if len(validation) > 1:
            extras["benchmarks"]["validation_more"] = [_benchmark_figures(v)
                                                       for v in validation[1:]]
        extras["tbr_interval"] = tbr_interval(validation, level, interval_form)
    if sealed is not None:
        if sealed["meta"]["cohort"] != "sealed-test":
            raise ValueError("--sealed-test-benchmark is not a sealed test cohort's summary")
        if sealed["meta"]["seed"] != cohorts.get("sealed_test_seed"):
            raise ValueError("--sealed-test-benchmark's seed is not --sealed-test-seed")
        extras["benchmarks"]["sealed_test"] = _benchmark_figures(sealed)
    return extras


def method_text(config: dict[str, Any]) -> str:
    """One line naming the training method, with what differs from the publication."""
    text = (f"Pix2Pix (U-Net generator, 70x70 PatchGAN, vanilla GAN + "
            f"{config['lambda_l1']:g} x "
            f"{'L2 (squared error / 0.1)' if config.get('recon_loss') == 'l2' else 'L1'}")
    weight = float(config.get("tumour_l1_weight", 1.0))
    ema = float(config.get("ema_decay", 0.0))
    if weight != 1.0:
        text += (f"; L1 weighted {weight:g}x on tumour masks grown by "
                 f"{config.get('tumour_margin_px', 0)} px")
    quantile = float(config.get("tumour_quantile", 0.5))
    if quantile != 0.5:
        text += (f"; in the tumour masks the pinball loss of quantile {quantile:g} "
                 "instead of the L1")
    hard = float(config.get("hard_negative_weight", 1.0))
    if hard > 1.0:
        text += (f"; hard negatives mined on each batch (brain outside tumours and striatum "
                 f"drawn >= {float(config.get('hard_negative_ratio', 1.6)):g} x slice "
                 f"background where the real uptake, averaged over "
                 f"{int(config.get('hard_negative_smooth_px', 5))} px, is not) weighted "
                 f"{hard:g}x")
    small = int(config.get("small_lesion_area_px", 0))
    if small > 0:
        text += (f"; a lesion covering a pixels of a slice weighted "
                 f"clip({small} / a, 1, {float(config.get('small_lesion_max_gain', 1.0)):g})x "
                 f"more, its slice drawn sqrt of that more often")
    non_enhancing = float(config.get("non_enhancing_gain", 1.0))
    if non_enhancing != 1.0:
        text += (f"; a tumour section whose T1C input stays below "
                 f"{float(config.get('enhancing_t1c', 0.95)):g} (non-enhancing) weighted "
                 f"{non_enhancing:g}x more, its slice drawn sqrt of that more often")
    fusion_weight = float(config.get("fusion_l1_weight", 0.0))
    if fusion_weight > 0.0:
        text += (f" + {fusion_weight:g} x L1 of the fusion rendered from the uptake (display "
                 f"threshold as a logistic gate of "
                 f"{float(config.get('fusion_gate_width_uptake', 0.05)):g} uptake units)")
    context = int(config.get("context_slices", 0))
    if context:
        text += (f"; input: the T1C slice and {context} neighbouring slice(s) on each side "
                 f"({2 * context + 1} channels)")
    if ema > 0.0:
        text += f"; exported weights: moving average of the generator, decay {ema:g}"
    return text + ")"


def model_card(state: dict[str, Any], name: str | None = None, version: str = "1",
               test_metrics: dict[str, Any] | None = None,
               test_weights: bool = False, slice_smoothing_mm: float = 0.0,
               cohorts: dict[str, Any] | None = None,
               benchmarks: dict[str, Any] | None = None,
               tbr_interval: dict[str, Any] | None = None,
               uptake_contrast_gain: float = 1.0) -> ModelCard:
    """The model card of a checkpoint's generator."""
    config = state["config"]
    resolved = state["resolved"]
    info = resolved["dataset_info"]
    history = json.loads(state["history"])
    epochs_done = len(history.get("epochs", []))
    training = {
        "dataset": info["path"],
        "dataset_source": info.get("source"),
        "pet_layout": info.get("pet_layout", "same-grid"),
        "t1c_ceiling": float(info.get("t1c_ceiling", 1.0)),
        "uptake_array": info.get("uptake_array"),
        "image_size": info["size"],
        "split_method": info["split_method"],
        "split_seed": info.get("split_seed"),
        "leaks_patients": info.get("leaks_patients", False),
        "pairs": {split: v["pairs"] for split, v in info["splits"].items()},
        "patients": {split: v["patients"] for split, v in info["splits"].items()},
        "target": config["target"],
        "seed": config["seed"],
        "epochs": config["epochs"],
        "decay_epochs": config["decay_epochs"],
        "epochs_completed": epochs_done,
        "steps": state["step"],
        "batch_size": config["batch_size"],
        "ndf": config["ndf"],
        "lr": config["lr"],
        "beta1": config["beta1"],
        "lambda_l1": config["lambda_l1"],
        "recon_loss": config.get("recon_loss", "l1"),
        "tumour_quantile": config.get("tumour_quantile", 0.5),
        "hard_negative_weight": config.get("hard_negative_weight", 1.0),
        "hard_negative_ratio": config.get("hard_negative_ratio", 1.6),
        "hard_negative_smooth_px": config.get("hard_negative_smooth_px", 5),
        "tumour_oversample": config["tumour_oversample"],
        "tumour_l1_weight": config.get("tumour_l1_weight", 1.0),
        "tumour_margin_px": config.get("tumour_margin_px", 0),
        "small_lesion_area_px": config.get("small_lesion_area_px", 0),
        "small_lesion_max_gain": config.get("small_lesion_max_gain", 1.0),
        "non_enhancing_gain": config.get("non_enhancing_gain", 1.0),
        "enhancing_t1c": config.get("enhancing_t1c", 0.95),
        "ema_decay": config.get("ema_decay", 0.0),
        "hflip": config["hflip"],
        "context_slices": config.get("context_slices", 0),
        "fusion_l1_weight": config.get("fusion_l1_weight", 0.0),
        "fusion_gate_width_uptake": config.get("fusion_gate_width_uptake", 0.05),
        "init_generator": config.get("init_generator"),
        "init_generator_sha256": resolved.get("init_generator_sha256"),
        "init_generator_t1c_ceiling": resolved.get("init_generator_t1c_ceiling"),
        "device": resolved.get("device_resolved"),
        "mixed_precision": resolved.get("mixed_precision"),
        "bf16": config.get("bf16", False),
        "augment": {k: config.get(f"augment_{k}", 0.0)
                    for k in ("rotation_deg", "scale", "shift_px")},
        "method": method_text(config),
    }
    metrics: dict[str, Any] = {"validation": history.get("last_validation", {})}
    if test_metrics is not None:
        metrics["test"] = test_metrics
    for key, figures in (benchmarks or {}).items():
        metrics[f"{key}_benchmark" if key == "validation" else key] = figures
    return ModelCard(
        name=name or f"dicom-node-pix2pix-{config['target']}",
        version=version,
        architecture=resolved["architecture"],
        ngf=config["ngf"],
        output_kind=OUTPUT_KIND[config["target"]],
        fusion=dict(info["fusion_style"]),
        uptake_scale=float(config["uptake_scale"]),
        training=training,
        metrics=metrics,
        test_weights=test_weights,
        context_slices=int(config.get("context_slices", 0)),
        context_spacing_mm=float(resolved.get("slice_spacing_mm", 0.0))
        if config.get("context_slices", 0) else 0.0,
        slice_smoothing_mm=float(slice_smoothing_mm),
        t1c_input_ceiling=float(info.get("t1c_ceiling", 1.0)),
        uptake_contrast_gain=float(uptake_contrast_gain),
        cohorts=dict(cohorts or {}),
        tbr_interval=dict(tbr_interval or {}),
    )


def export_checkpoint(checkpoint: Path, out: Path, name: str | None = None, version: str = "1",
                      test_metrics: dict[str, Any] | None = None, fp16: bool = True,
                      test_weights: bool = False, slice_smoothing_mm: float = 0.0,
                      cohorts: dict[str, Any] | None = None,
                      benchmarks: dict[str, Any] | None = None,
                      tbr_interval: dict[str, Any] | None = None,
                      uptake_contrast_gain: float = 1.0) -> tuple[str, ModelCard]:
    """Write the generator of ``checkpoint`` as a node weights file; return (sha256, card)."""
    state = load_checkpoint(checkpoint)
    card = model_card(state, name, version, test_metrics, test_weights, slice_smoothing_mm,
                      cohorts, benchmarks, tbr_interval, uptake_contrast_gain)
    generator = build_generator(card.architecture, card.ngf, input_nc=card.input_channels,
                                output_nc=card.output_channels)
    # The weight average when the run kept one (--ema-decay), else the generator itself.
    generator.load_state_dict(state["model"].get("generator_ema", state["model"]["generator"]))
    generator.eval()
    sha = save_weights(generator, card, out, fp16=fp16)
    return sha, card
