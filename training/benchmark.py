"""``dicom-node-train benchmark``: the node's own path on held-out phantom patients, lesion by lesion.

    dicom-node-train benchmark --weights W --seed 200 --patients 60 --cohort validation --out DIR

Each patient is drawn by the phantom generator (native 256 x 256 matrix, the T1C as the
node receives it), run through the node's :class:`~dicom_node.inference.predictor.Predictor`
(windowing, network, smoothing along the slice normal: the native-matrix synthetic
uptake the node measures), and measured with the node's TBR method
(:func:`dicom_node.analysis.tbr.measure_tbr`, the config's threshold and minimum volume) on three
uptakes: the synthetic one, the real PET uptake and the oracle (the uptake expected from
what the T1C shows). Lesions are matched to the ground-truth tumours
(:mod:`training.lesion_truth`). The report (``report.md``, ``summary.json``,
``lesions.csv``, ``false_foci.png``, ``worst_misses.png``) gives per uptake:

- lesion detection: tumours found by the node's method / all tumours;
- false foci per patient and per tumour-free patient;
- by tumour kind (solid, rim, non-enhancing): found per uptake and the TBRmax bias at the
  truth, where a model's shortfall usually sits;
- per-lesion TBRmax / TBRmean agreement with the real uptake (Pearson r with 95 % CI,
  Bland-Altman bias and limits): in a fixed VOI at the truth (every tumour), and as the
  node reports them (tumours found on both);
- with ``--uncertainty-samples`` (default: the config's), the synthetic lesions'
  intervals, how often they hold the real TBR, and how many findings are equivocal;
- beside them the published study's slice table (PSNR, SSIM of the fusion, r of TBR on
  tumour-bearing slices) for the model and the oracle, and the issue's checks.

**Protocol** (``--cohort``): choices are made on ``validation`` cohorts. A
``sealed-test`` cohort must be the seed the model card declares as sealed
(``cohorts.sealed_test_seed``, set at export after the choices were frozen), never a seed
it lists for training or validation, and is refused once the card holds a sealed-test
result: a released model is evaluated on it once. ``training`` evaluates the training
cohort's own patients (the memorisation check) and ``exploratory`` anything else; both
are labelled as such in the report.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from dicom_node.analysis.tbr import TbrResult
from dicom_node.analysis.uncertainty import Calibration, TbrInterval, lesion_intervals
from dicom_node.config import load_config
from dicom_node.errors import WeightsError
from dicom_node.inference.model_weights import LoadedModel, ModelCard, load_weights
from dicom_node.inference.predictor import Predictor
from training.lesion_truth import Matching, grown_labels, measure_and_match
from training.metrics import bland_altman, mean_sd, pearson, psnr, ssim
from training.phantom import PhantomGeometry, PhantomPatient, generate_patient

SOURCES = ("synthetic", "real", "oracle")
COHORTS = ("validation", "sealed-test", "training", "exploratory")


class CohortError(ValueError):
    """The cohort asked for breaks the evaluation protocol."""


def check_cohort(card: ModelCard, cohort: str, seed: int) -> None:
    """Refuse an evaluation that would let a cohort used for choices pass as a test."""
    if cohort not in COHORTS:
        raise CohortError(f"--cohort must be one of {COHORTS}")
    cohorts = card.cohorts or {}
    training = {int(s) for s in cohorts.get("training_seeds", [])}
    validation = {int(s) for s in cohorts.get("validation_seeds", [])}
    sealed = cohorts.get("sealed_test_seed")
    if cohort == "sealed-test":
        if sealed is None:
            raise CohortError("the model card declares no sealed test seed (export "
                              "--sealed-test-seed, after every choice is frozen)")
        if seed != int(sealed):
            raise CohortError(f"seed {seed} is not the card's sealed test seed")
        if seed in training | validation:
            raise CohortError(f"seed {seed} was used for training or choices; it cannot be "
                              "a sealed test cohort")
        if card.metrics.get("sealed_test"):
            raise CohortError("this model was already evaluated on its sealed test cohort "
                              "(once per released model)")
        return
    if sealed is not None and seed == int(sealed):
        raise CohortError(f"seed {seed} is the sealed test cohort; use --cohort sealed-test")
    if cohort == "validation" and seed in training:
        raise CohortError(f"seed {seed} is a training cohort, not a validation one")
    if cohort == "training" and training and seed not in training:
        raise CohortError(f"seed {seed} is not one of the card's training cohorts")


# --- one patient --------------------------------------------------------------------------


@dataclass
class PatientRecord:
    index: int
    patient_id: str
    tumours: int
    lesions: list[dict[str, Any]] = field(default_factory=list)  # one per truth x source
    false_foci: list[dict[str, Any]] = field(default_factory=list)
    fragments: dict[str, int] = field(default_factory=dict)
    slices: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class MissCrop:
    real_tbr_max: float
    caption: str
    images: list[NDArray[np.uint8]]


def _slice_rows(patient: PhantomPatient, fusions: dict[str, NDArray[np.uint8]],
                uptakes: dict[str, NDArray[np.float32]], results: dict[str, TbrResult],
                spacing: tuple[float, float, float]) -> list[dict[str, Any]]:
    """The study's per-slice rows: fusion PSNR / SSIM against the real fusion on every
    slice, TBR on tumour-bearing slices (truth ROI, each uptake's own background)."""
    labels = patient.tumour_labels
    voi = grown_labels(labels, spacing, 2.0) > 0
    rows = []
    for k in range(len(labels)):
        row: dict[str, Any] = {"slice": k, "tumour": bool(labels[k].any())}
        for source in ("synthetic", "oracle"):
            a = fusions[source][k].astype(np.float32) / 255.0
            b = patient.fusion[k].astype(np.float32) / 255.0
            row[f"psnr_{source}"] = psnr(a, b)
            row[f"ssim_{source}"] = ssim(a, b)
        if row["tumour"]:
            for source in SOURCES:
                bg = results[source].background_mean
                ok = np.isfinite(bg) and bg > 0 and not results[source].note
                values = uptakes[source][k]
                row[f"tbr_max_{source}"] = float(values[voi[k]].max() / bg) if ok else math.nan
                row[f"tbr_mean_{source}"] = (float(values[labels[k] > 0].mean() / bg)
                                             if ok else math.nan)
        rows.append(row)
    return rows


def evaluate_patient(index: int, seed: int, predictor: Predictor, geometry: PhantomGeometry,
                     threshold: float, min_volume_ml: float, samples: int,
                     calibration: Calibration) -> tuple[PatientRecord, list[MissCrop]]:
    started = time.perf_counter()
    patient = generate_patient(index, seed, geometry)
    spacing = geometry.spacing_mm
    positions = geometry.axis_mm(0)
    prediction = predictor.predict(patient.t1c.astype(np.float32),
                                   slice_spacing_mm=geometry.slice_spacing_mm,
                                   slice_positions_mm=positions)
    grey = prediction.grey
    uptakes = {"synthetic": prediction.uptake, "real": patient.uptake,
               "oracle": patient.oracle_uptake}
    voxel_ml = float(np.prod(spacing)) / 1000.0
    measured = {source: measure_and_match(patient.tumour_labels, uptake, spacing, grey,
                                          threshold, min_volume_ml,
                                          predictor.style.display_threshold)
                for source, uptake in uptakes.items()}
    results = {source: result for source, (result, _) in measured.items()}
    matches: dict[str, Matching] = {source: m for source, (_, m) in measured.items()}
    intervals: dict[int, TbrInterval] = {}
    if samples >= 2 and results["synthetic"].lesions:
        draws = predictor.sample_uptake(prediction.input_grey, samples,
                                        geometry.slice_spacing_mm, positions)
        intervals = {i.lesion: i for i in lesion_intervals(draws, results["synthetic"],
                                                            calibration)}
    record = PatientRecord(index=index, patient_id=patient.patient_id,
                           tumours=len(patient.tumours))
    truth_by_label = {t.label: t for t in patient.tumours}
    for label, tumour in truth_by_label.items():
        for source in SOURCES:
            try:
                found = matches[source].of(label)
            except StopIteration:  # the tumour has no voxel left on this grid
                continue
            row = {"patient": patient.patient_id, "label": label, "kind": tumour.kind.value,
                   "truth_volume_ml": tumour.voxels * voxel_ml, "source": source,
                   **{k: v for k, v in asdict(found).items() if k != "label"}}
            if source == "synthetic" and found.found and found.finding_number in intervals:
                interval = intervals[found.finding_number]
                row.update({"tbr_max_low": interval.tbr_max_low,
                            "tbr_max_high": interval.tbr_max_high,
                            "tbr_mean_low": interval.tbr_mean_low,
                            "tbr_mean_high": interval.tbr_mean_high,
                            "sd_model_tbr_max": interval.sd_model_tbr_max,
                            "sd_model_tbr_mean": interval.sd_model_tbr_mean,
                            "equivocal": interval.equivocal})
            record.lesions.append(row)
    brain_centre = np.array([c.mean() for c in np.nonzero(patient.brain_mask)]) * np.array(spacing)
    for source in SOURCES:
        record.fragments[source] = len(matches[source].fragments)
        for focus in matches[source].false_foci:
            where = np.array(focus.peak_index) * np.array(spacing) - brain_centre
            record.false_foci.append({
                "patient": patient.patient_id, "source": source, "tbr_max": focus.tbr_max,
                "volume_ml": focus.volume_ml, "peak_index": list(focus.peak_index),
                "offset_mm": [round(float(v), 1) for v in where],
                **({"equivocal": intervals[focus.number].equivocal}
                   if source == "synthetic" and focus.number in intervals else {})})
    fusions = {"synthetic": prediction.fusion_uint8(), "oracle": patient.oracle_fusion}
    record.slices = _slice_rows(patient, fusions, uptakes, results, spacing)
    crops = []
    for label in truth_by_label:
        try:
            real, synth = matches["real"].of(label), matches["synthetic"].of(label)
        except StopIteration:
            continue
        if real.found and not synth.found:
            crops.append(_miss_crop(patient, label, fusions, grey, real.tbr_max,
                                    matches["oracle"].of(label).found))
    record.seconds = time.perf_counter() - started
    return record, crops


def _miss_crop(patient: PhantomPatient, label: int, fusions: dict[str, NDArray[np.uint8]],
               grey: NDArray[np.float32], real_tbr_max: float, oracle_found: bool) -> MissCrop:
    where = np.nonzero(patient.tumour_labels == label)
    k = int(np.bincount(where[0]).argmax())
    r, c = int(np.mean(where[1])), int(np.mean(where[2]))
    half = 40
    rows = slice(max(0, r - half), r + half)
    cols = slice(max(0, c - half), c + half)
    grey_rgb = np.repeat((grey[k, rows, cols] * 255).astype(np.uint8)[..., None], 3, axis=-1)
    kind = next(t.kind.value for t in patient.tumours if t.label == label)
    caption = (f"{patient.patient_id} lesion {label} ({kind})\nreal TBRmax {real_tbr_max:.2f}"
               f"{'' if oracle_found else '; oracle misses it too'}")
    return MissCrop(real_tbr_max, caption, [grey_rgb, patient.fusion[k, rows, cols],
                                            fusions["synthetic"][k, rows, cols],
                                            fusions["oracle"][k, rows, cols]])


# --- the cohort ---------------------------------------------------------------------------


def _values(rows: list[dict[str, Any]], source: str, key: str) -> NDArray[np.float64]:
    return np.array([r[key] for r in rows if r["source"] == source], dtype=np.float64)


def summarise(records: list[PatientRecord]) -> dict[str, Any]:
    lesions = [row for r in records for row in r.lesions]
    patients = len(records)
    tumour_free = sum(1 for r in records if r.tumours == 0)
    by_key = {(row["patient"], row["label"], row["source"]): row for row in lesions}
    keys = sorted({(row["patient"], row["label"]) for row in lesions})
    out: dict[str, Any] = {"patients": patients, "tumour_free_patients": tumour_free,
                           "lesions": len(keys), "per_source": {}}
    real_found = {k for k in keys if by_key[(*k, "real")]["found"]}
    for source in SOURCES:
        found = [bool(by_key[(*k, source)]["found"]) for k in keys]
        foci = [f for r in records for f in r.false_foci if f["source"] == source]
        foci_free = [f for r in records if r.tumours == 0 for f in r.false_foci
                     if f["source"] == source]
        entry: dict[str, Any] = {
            "found": int(sum(found)),
            "sensitivity": float(np.mean(found)) if found else math.nan,
            "found_of_real_found": int(sum(1 for k in real_found if by_key[(*k, source)]["found"])),
            "false_foci": len(foci),
            "false_foci_per_patient": len(foci) / patients if patients else math.nan,
            "false_foci_per_tumour_free_patient": (len(foci_free) / tumour_free
                                                   if tumour_free else math.nan),
            "patients_with_false_foci": len({f["patient"] for f in foci}),
            "fragments": sum(r.fragments.get(source, 0) for r in records),
        }
        if source != "real":
            for measure in ("tbr_max", "tbr_mean"):
                real_voi = np.array([by_key[(*k, "real")][f"voi_{measure}"] for k in keys])
                mine_voi = np.array([by_key[(*k, source)][f"voi_{measure}"] for k in keys])
                both = [k for k in keys if by_key[(*k, "real")]["found"]
                        and by_key[(*k, source)]["found"]]
                real_node = np.array([by_key[(*k, "real")][measure] for k in both])
                mine_node = np.array([by_key[(*k, source)][measure] for k in both])
                ba_voi = bland_altman(real_voi, mine_voi)
                ba_node = bland_altman(real_node, mine_node)
                entry[f"voi_{measure}"] = {"r": pearson(real_voi, mine_voi).as_dict(),
                                           "bias": ba_voi.bias, "sd": ba_voi.sd,
                                           "limits": list(ba_voi.limits)}
                entry[f"node_{measure}"] = {"r": pearson(real_node, mine_node).as_dict(),
                                            "bias": ba_node.bias, "sd": ba_node.sd,
                                            "limits": list(ba_node.limits)}
        out["per_source"][source] = entry
    # Intervals of the synthetic findings against the real TBR at the same tumour.
    covered_max, covered_mean, equivocal, with_interval = [], [], 0, 0
    for k in keys:
        row, real = by_key[(*k, "synthetic")], by_key[(*k, "real")]
        if "tbr_max_low" not in row:
            continue
        with_interval += 1
        equivocal += bool(row["equivocal"])
        if real["found"]:
            covered_max.append(row["tbr_max_low"] <= real["tbr_max"] <= row["tbr_max_high"])
            covered_mean.append(row["tbr_mean_low"] <= real["tbr_mean"] <= row["tbr_mean_high"])
    out["intervals"] = {
        "findings_with_interval": with_interval, "equivocal": equivocal,
        "coverage_tbr_max": float(np.mean(covered_max)) if covered_max else math.nan,
        "coverage_tbr_mean": float(np.mean(covered_mean)) if covered_mean else math.nan,
        "n_coverage": len(covered_max),
        "false_foci_equivocal": sum(1 for r in records for f in r.false_foci
                                    if f["source"] == "synthetic" and f.get("equivocal")),
    }
    # Residual SDs (synthetic - real, node's numbers on lesions found on both): what a
    # calibration of the intervals takes from a validation cohort; with the model's
    # sampling SD of each, what a conformal calibration takes (training/export.py pools
    # the pairs of several validation cohorts).
    both = [k for k in keys if by_key[(*k, "real")]["found"] and by_key[(*k, "synthetic")]["found"]]
    if with_interval:  # measured with uncertainty passes
        out["intervals"]["calibration_pairs"] = {
            measure: [[by_key[(*k, "real")][measure] - by_key[(*k, "synthetic")][measure],
                       by_key[(*k, "synthetic")][f"sd_model_{measure}"]]
                      for k in both if f"sd_model_{measure}" in by_key[(*k, "synthetic")]]
            for measure in ("tbr_max", "tbr_mean")}
    for measure in ("tbr_max", "tbr_mean"):
        diff = [by_key[(*k, "synthetic")][measure] - by_key[(*k, "real")][measure] for k in both]
        out["intervals"][f"residual_sd_{measure}"] = (float(np.std(diff, ddof=1))
                                                      if len(diff) > 1 else math.nan)
        out["intervals"][f"residual_bias_{measure}"] = (float(np.mean(diff))
                                                        if diff else math.nan)
    out["per_kind"] = per_kind(by_key, keys)
    slices = [s for r in records for s in r.slices]
    table: dict[str, Any] = {}
    for source in ("synthetic", "oracle"):
        table[source] = {
            "psnr": mean_sd([s[f"psnr_{source}"] for s in slices])[:2],
            "ssim": mean_sd([s[f"ssim_{source}"] for s in slices])[:2],
            "r_tbr_max_slices": pearson(
                [s["tbr_max_real"] for s in slices if s["tumour"]],
                [s[f"tbr_max_{source}"] for s in slices if s["tumour"]]).as_dict(),
            "r_tbr_mean_slices": pearson(
                [s["tbr_mean_real"] for s in slices if s["tumour"]],
                [s[f"tbr_mean_{source}"] for s in slices if s["tumour"]]).as_dict(),
        }
    table["slices"] = len(slices)
    table["tumour_slices"] = sum(1 for s in slices if s["tumour"])
    out["slice_table"] = table
    out["checks"] = checks(out)
    return out


def per_kind(by_key: dict[tuple[str, int, str], dict[str, Any]],
             keys: list[tuple[str, int]]) -> dict[str, dict[str, Any]]:
    """Per tumour kind (solid, rim, non-enhancing): lesions, how many each uptake found,
    and the TBRmax bias at the truth (VOI, synthetic or oracle - real). Where the model
    falls short of the oracle is rarely spread evenly over the kinds: the T1C shows
    enhancement, not uptake, so a tumour that does not enhance is the hard case."""
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({str(by_key[(*k, "real")]["kind"]) for k in keys}):
        mine = [k for k in keys if by_key[(*k, "real")]["kind"] == kind]
        entry: dict[str, Any] = {
            "lesions": len(mine),
            "found": {s: sum(1 for k in mine if by_key[(*k, s)]["found"]) for s in SOURCES}}
        for source in ("synthetic", "oracle"):
            diff = np.array([by_key[(*k, source)]["voi_tbr_max"]
                             - by_key[(*k, "real")]["voi_tbr_max"] for k in mine],
                            dtype=np.float64)
            diff = diff[np.isfinite(diff)]
            entry[f"bias_voi_tbr_max_{source}"] = float(diff.mean()) if diff.size else math.nan
        out[kind] = entry
    return out


def checks(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's acceptance checks on unseen patients."""
    syn, ora = summary["per_source"]["synthetic"], summary["per_source"]["oracle"]
    table = summary["slice_table"]
    out: dict[str, dict[str, Any]] = {}
    for measure in ("tbr_max", "tbr_mean"):
        mine, best = syn[f"voi_{measure}"]["r"]["r"], ora[f"voi_{measure}"]["r"]["r"]
        out[f"r_{measure}_per_lesion"] = {
            "pass": bool(mine >= 0.8 * best), "value": mine, "needed": 0.8 * best,
            "rule": f"per-lesion r({measure}) >= 0.8 x the oracle's (VOI at the truth)"}
    out["detection"] = {"pass": bool(syn["sensitivity"] >= 0.8 * ora["sensitivity"]),
                        "value": syn["sensitivity"], "needed": 0.8 * ora["sensitivity"],
                        "rule": "detection on synthetic >= 0.8 x detection on the oracle"}
    out["false_foci"] = {"pass": bool(syn["false_foci_per_patient"] <= 0.1),
                         "value": syn["false_foci_per_patient"], "needed": 0.1,
                         "rule": "at most 0.1 false foci per patient"}
    bias = syn["voi_tbr_max"]["bias"]
    out["tbr_max_bias"] = {"pass": bool(abs(bias) <= 0.25), "value": bias, "needed": 0.25,
                           "rule": "|TBRmax bias| <= 0.25 (VOI at the truth, synthetic - real)"}
    gap = table["synthetic"]["psnr"][0] - table["oracle"]["psnr"][0]
    out["psnr"] = {"pass": bool(gap >= -2.0), "value": gap, "needed": -2.0,
                   "rule": "whole-image fusion PSNR within 2 dB of the oracle's"}
    gap_ssim = table["synthetic"]["ssim"][0] - table["oracle"]["ssim"][0]
    out["ssim"] = {"pass": bool(gap_ssim >= -0.03), "value": gap_ssim, "needed": -0.03,
                   "rule": "whole-image fusion SSIM within 0.03 of the oracle's"}
    return out


# --- report -------------------------------------------------------------------------------


def _r(entry: dict[str, Any]) -> str:
    r = entry["r"]
    if not math.isfinite(r["r"]):
        return f"n/a (n={r['n']})"
    return f"{r['r']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] (n={r['n']})"


def _ba(entry: dict[str, Any]) -> str:
    if not math.isfinite(entry["bias"]):
        return "n/a"
    low, high = entry["limits"]
    return f"{entry['bias']:+.2f} [{low:+.2f}, {high:+.2f}]"


def report_markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    per = summary["per_source"]
    lines = [f"# Benchmark: {meta['model']} on {meta['cohort']} cohort (seed {meta['seed']})", "",
             f"`{meta['command']}`", "",
             f"{summary['patients']} patients ({summary['tumour_free_patients']} tumour-free), "
             f"{summary['lesions']} ground-truth lesions; weights sha256 `{meta['sha256']}`; "
             f"TBR threshold {meta['threshold']}, minimum lesion {meta['min_volume_ml']} mL; "
             f"{meta['seconds']:.0f} s.", "",
             "## Lesions as the node reports them", "",
             "| | synthetic | real PET | oracle |", "|---|---|---|---|"]
    n = summary["lesions"]
    lines.append("| lesions found (of " + str(n) + ") | " + " | ".join(
        f"{per[s]['found']} ({per[s]['sensitivity']:.0%})" for s in SOURCES) + " |")
    lines.append("| of those found on real PET | " + " | ".join(
        f"{per[s]['found_of_real_found']}" for s in SOURCES) + " |")
    lines.append("| false foci (per patient) | " + " | ".join(
        f"{per[s]['false_foci']} ({per[s]['false_foci_per_patient']:.2f})" for s in SOURCES) + " |")
    lines.append("| false foci per tumour-free patient | " + " | ".join(
        f"{per[s]['false_foci_per_tumour_free_patient']:.2f}" for s in SOURCES) + " |")
    lines.append("| patients with a false focus | " + " | ".join(
        f"{per[s]['patients_with_false_foci']}" for s in SOURCES) + " |")
    lines.append("| fragments (satellites of a finding) | " + " | ".join(
        f"{per[s]['fragments']}" for s in SOURCES) + " |")
    kinds = summary.get("per_kind", {})
    if kinds:
        lines += ["", "By tumour kind (TBRmax bias at the truth, synthetic - real; the "
                  "oracle's in brackets):", "",
                  "| kind | lesions | found synthetic / real / oracle | TBRmax bias |",
                  "|---|---|---|---|"]
        for kind, entry in kinds.items():
            found = " / ".join(str(entry["found"][s]) for s in SOURCES)
            lines.append(f"| {kind.replace('_', ' ')} | {entry['lesions']} | {found} | "
                         f"{entry['bias_voi_tbr_max_synthetic']:+.2f} "
                         f"({entry['bias_voi_tbr_max_oracle']:+.2f}) |")
    lines += ["", "## Per-lesion TBR against the real PET", "",
              "r [95 % CI] (n); Bland-Altman bias [limits of agreement], synthetic - real.", "",
              "| | synthetic | oracle |", "|---|---|---|"]
    for measure, name in (("tbr_max", "TBRmax"), ("tbr_mean", "TBRmean")):
        for where, label in (("voi", "VOI at the truth, every lesion"),
                             ("node", "node's lesions, found on both")):
            key = f"{where}_{measure}"
            lines.append(f"| r {name}, {label} | {_r(per['synthetic'][key])} | "
                         f"{_r(per['oracle'][key])} |")
            lines.append(f"| bias {name}, {label} | {_ba(per['synthetic'][key])} | "
                         f"{_ba(per['oracle'][key])} |")
    iv = summary["intervals"]
    lines += ["", "## Intervals of the synthetic TBR", "",
              f"{meta['interval_method']}.", "",
              f"- findings with an interval: {iv['findings_with_interval']}, equivocal "
              f"(TBRmax interval below the threshold): {iv['equivocal']}; false foci "
              f"reported as equivocal: {iv['false_foci_equivocal']}",
              f"- the interval holds the real TBRmax in {iv['coverage_tbr_max']:.0%} and the "
              f"real TBRmean in {iv['coverage_tbr_mean']:.0%} of {iv['n_coverage']} lesions "
              f"found on both (stated level {meta['interval_level']:.0%})",
              f"- residual synthetic - real per lesion, mean and SD: TBRmax "
              f"{iv.get('residual_bias_tbr_max', math.nan):+.3f} and "
              f"{iv['residual_sd_tbr_max']:.3f}, TBRmean "
              f"{iv.get('residual_bias_tbr_mean', math.nan):+.3f} and "
              f"{iv['residual_sd_tbr_mean']:.3f}"]
    table = summary["slice_table"]
    lines += ["", "## The published study's slice table (native 256 matrix)", "",
              f"{table['slices']} slices, {table['tumour_slices']} tumour-bearing.", "",
              "| metric | synthetic | oracle | published |", "|---|---|---|---|",
              f"| PSNR (dB) | {table['synthetic']['psnr'][0]:.2f} ± {table['synthetic']['psnr'][1]:.2f}"
              f" | {table['oracle']['psnr'][0]:.2f} ± {table['oracle']['psnr'][1]:.2f} | 31.075 |",
              f"| SSIM | {table['synthetic']['ssim'][0]:.4f} | {table['oracle']['ssim'][0]:.4f} "
              "| 0.868 |",
              f"| r TBRmax, slices | {_r({'r': table['synthetic']['r_tbr_max_slices']})} | "
              f"{_r({'r': table['oracle']['r_tbr_max_slices']})} | 0.706 |",
              f"| r TBRmean, slices | {_r({'r': table['synthetic']['r_tbr_mean_slices']})} | "
              f"{_r({'r': table['oracle']['r_tbr_mean_slices']})} | 0.901 |",
              "", "## Checks", ""]
    for name, check in summary["checks"].items():
        lines.append(f"- **{'PASS' if check['pass'] else 'FAIL'}** {check['rule']}: "
                     f"{check['value']:.3f} (needed {check['needed']:.3f}) [{name}]")
    lines += ["", "![false foci](false_foci.png)", "", "![worst misses](worst_misses.png)", ""]
    return "\n".join(lines)


def plot_false_foci(records: list[PatientRecord], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    colours = {"synthetic": "tab:red", "real": "tab:blue", "oracle": "tab:green"}
    for source in SOURCES:
        foci = [f for r in records for f in r.false_foci if f["source"] == source]
        if not foci:
            continue
        off = np.array([f["offset_mm"] for f in foci])
        size = 20 + 30 * np.sqrt(np.array([f["volume_ml"] for f in foci]))
        # offset (slice z, row y: anterior -> posterior, column x: right -> left)
        axes[0].scatter(off[:, 2], off[:, 1], s=size, c=colours[source], alpha=0.6,
                        label=f"{source} ({len(foci)})")
        axes[1].scatter(off[:, 1], off[:, 0], s=size, c=colours[source], alpha=0.6)
    for ax in axes:
        ax.add_patch(matplotlib.patches.Ellipse((0, 0), 140, 170 if ax is axes[0] else 110,
                                                fill=False, ls="--", color="grey"))
        ax.set_aspect("equal")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
    axes[0].set(title="axial: false foci (peak), brain-centred", xlabel="patient right -> left (mm)",
                ylabel="anterior -> posterior (mm)", xlim=(-90, 90), ylim=(100, -100))
    axes[1].set(title="sagittal", xlabel="anterior -> posterior (mm)",
                ylabel="inferior -> superior (mm)", xlim=(-100, 100), ylim=(-70, 70))
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_worst_misses(crops: list[MissCrop], path: Path, count: int = 6) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = sorted(crops, key=lambda c: -c.real_tbr_max)[:count]
    rows = max(1, len(worst))
    fig, axes = plt.subplots(rows, 4, figsize=(10, 2.6 * rows), squeeze=False)
    for i, crop in enumerate(worst):
        for j, (image, title) in enumerate(zip(crop.images, ("T1C: ", "real fusion",
                                                                 "synthetic fusion",
                                                                 "oracle fusion"), strict=True)):
            axes[i][j].imshow(image)
            axes[i][j].set_title(crop.caption if j == 0 else title, fontsize=8,
                                 loc="left" if j == 0 else "center")
            axes[i][j].axis("off")
    if not worst:
        axes[0][0].text(0.5, 0.5, "no lesion found on real PET and missed on synthetic",
                        ha="center")
        for ax in axes[0]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --- command --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--seed", type=int, required=True, help="phantom cohort seed")
    parser.add_argument("--patients", type=int, required=True)
    parser.add_argument("--first-index", type=int, default=0)
    parser.add_argument("--cohort", choices=COHORTS, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=Path("config.toml"),
                        help="node config: TBR threshold, minimum volume, samples")
    parser.add_argument("--slice-spacing-mm", type=float, default=3.0)
    parser.add_argument("--uncertainty-samples", type=int, default=None,
                        help="stochastic passes per patient (default: the config's)")
    parser.add_argument("--threads", type=int, default=None)


def run_benchmark(model: LoadedModel, seed: int, indices: range, cohort: str, out: Path,
                  threshold: float, min_volume_ml: float, samples: int,
                  slice_spacing_mm: float = 3.0, command: str = "",
                  progress: bool = True, geometry: PhantomGeometry | None = None
                  ) -> dict[str, Any]:
    """Evaluate patients ``indices`` of cohort ``seed``; writes the report into ``out``."""
    check_cohort(model.card, cohort, seed)
    predictor = Predictor(model, torch.device("cpu"), batch_size=16)
    calibration = Calibration.from_card(model.card.tbr_interval)
    geometry = geometry or PhantomGeometry(slice_spacing_mm=slice_spacing_mm)
    started = time.perf_counter()
    records: list[PatientRecord] = []
    crops: list[MissCrop] = []
    for index in tqdm(indices, desc="patients", unit="patient", disable=not progress):
        record, patient_crops = evaluate_patient(index, seed, predictor, geometry, threshold,
                                                 min_volume_ml, samples, calibration)
        records.append(record)
        crops.extend(patient_crops)
    summary = summarise(records)
    meta = {"model": f"{model.card.name} {model.card.version}", "sha256": model.sha256,
            "cohort": cohort, "seed": seed, "patients": len(records),
            "first_index": indices.start, "threshold": threshold, "min_volume_ml": min_volume_ml,
            "samples": samples, "interval_method": calibration.method_text(samples),
            "interval_level": calibration.level, "slice_spacing_mm": geometry.slice_spacing_mm,
            "slice_smoothing_mm": model.card.slice_smoothing_mm,
            "uptake_contrast_gain": model.card.uptake_contrast_gain,
            "command": command, "seconds": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"meta": meta, **summary}, indent=2,
                                                 default=float) + "\n")
    lesions = [row for r in records for row in r.lesions]
    if lesions:
        names = sorted({k for row in lesions for k in row}, key=lambda k: (k not in lesions[0], k))
        with (out / "lesions.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=names)
            writer.writeheader()
            writer.writerows(lesions)
    (out / "false_foci.json").write_text(json.dumps(
        [f for r in records for f in r.false_foci], indent=1) + "\n")
    plot_false_foci(records, out / "false_foci.png")
    plot_worst_misses(crops, out / "worst_misses.png")
    (out / "report.md").write_text(report_markdown(summary, meta))
    return {"meta": meta, **summary}


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    samples = (config.analysis.uncertainty_samples if args.uncertainty_samples is None
               else args.uncertainty_samples)
    try:
        model = load_weights(args.weights)
        command = ("dicom-node-train benchmark " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if v is not None and k not in ("command",)))
        result = run_benchmark(model, args.seed, range(args.first_index,
                                                       args.first_index + args.patients),
                               args.cohort, args.out, config.analysis.tbr_threshold,
                               config.analysis.min_lesion_volume_ml, samples,
                               args.slice_spacing_mm, command)
    except (CohortError, WeightsError) as exc:
        print(f"error: {exc}")
        return 2
    print((args.out / "report.md").read_text())
    failed = [k for k, v in result["checks"].items() if not v["pass"]]
    print(f"checks: {len(result['checks']) - len(failed)} of {len(result['checks'])} pass"
          + (f" (failing: {', '.join(failed)})" if failed else ""))
    return 0
