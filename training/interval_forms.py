"""Which TBR interval form to ship: ``dicom-node-train interval-forms``.

Each form ``export --interval-form`` can write (training/export.py) is calibrated on the
lesions of every validation cohort but one and tested on the one left out, with the
node's own interval code (``Calibration.limits``): does the interval hold the real TBR,
and how wide is it. Pooled over the folds, the rule fdopa-demo's releases use picks the
narrowest form on TBRmax (the ratio the equivocal flag reads) among those covering at
least the stated level minus ``COVERAGE_SLACK`` (0.88 at 90 %); when none does, the
best-covering one.

Input: the ``summary.json`` of two or more ``benchmark --cohort validation`` runs of one
set of weights, measured with uncertainty passes (their per-lesion pairs of real -
synthetic and sampling SD). Only validation cohorts: a sealed cohort is refused.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.analysis.uncertainty import Calibration
from training.export import INTERVAL_FORMS, tbr_interval

MEASURES = ("tbr_max", "tbr_mean")
COVERAGE_SLACK = 0.02


@dataclass(frozen=True)
class FormResult:
    """One form, left-one-cohort-out: per measure the pooled coverage and mean width,
    and the coverage of each held-out cohort (in the order given)."""

    form: str
    coverage: dict[str, float]
    width: dict[str, float]
    fold_coverage: dict[str, list[float]] = field(default_factory=dict)
    lesions: int = 0


def _pairs(summary: dict[str, Any], measure: str) -> list[tuple[float, float]]:
    return [(float(r), float(sd)) for r, sd in summary["intervals"]["calibration_pairs"][measure]]


def check_summaries(summaries: list[dict[str, Any]]) -> None:
    if len(summaries) < 2:
        raise ValueError("leaving one cohort out needs at least two validation summaries")
    if any(s["meta"]["cohort"] != "validation" for s in summaries):
        raise ValueError("only validation cohorts choose the interval form (a sealed or "
                         "other cohort was given)")
    seeds = [s["meta"]["seed"] for s in summaries]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a validation seed is given twice ({seeds})")
    if len({s["meta"]["sha256"] for s in summaries}) > 1:
        raise ValueError("the summaries are of different weights")
    if not all("calibration_pairs" in s["intervals"] for s in summaries):
        raise ValueError("every summary must be measured with uncertainty passes "
                         "(benchmark --uncertainty-samples > 1)")
    for s in summaries:
        if not all(s["intervals"]["calibration_pairs"].get(m) for m in MEASURES):
            raise ValueError(f"validation seed {s['meta']['seed']} has no lesion found on "
                             "real and synthetic: nothing to test a form on")


def leave_one_cohort_out(summaries: list[dict[str, Any]], form: str,
                         level: float = 0.9) -> FormResult:
    """Calibrate ``form`` on all cohorts but one, test on that one, for each cohort."""
    check_summaries(summaries)
    covered: dict[str, list[bool]] = {m: [] for m in MEASURES}
    widths: dict[str, list[float]] = {m: [] for m in MEASURES}
    folds: dict[str, list[float]] = {m: [] for m in MEASURES}
    for held in range(len(summaries)):
        rest = [s for i, s in enumerate(summaries) if i != held]
        calibration = Calibration.from_card(tbr_interval(rest, level, form))
        for measure in MEASURES:
            hits = []
            for residual, sd_model in _pairs(summaries[held], measure):
                # relative to the synthetic value: the real one lies at +residual
                low, high = calibration.limits(measure, 0.0, sd_model)
                hits.append(low <= residual <= high)
                widths[measure].append(high - low)
            covered[measure] += hits
            folds[measure].append(float(np.mean(hits)) if hits else float("nan"))
    return FormResult(
        form=form,
        coverage={m: float(np.mean(covered[m])) if covered[m] else float("nan")
                  for m in MEASURES},
        width={m: float(np.mean(widths[m])) if widths[m] else float("nan") for m in MEASURES},
        fold_coverage=folds, lesions=len(covered["tbr_max"]))


def pick(results: list[FormResult], level: float = 0.9) -> str:
    """The narrowest form on TBRmax among those covering >= level - COVERAGE_SLACK;
    if none does, the best-covering one."""
    enough = [r for r in results if r.coverage["tbr_max"] >= level - COVERAGE_SLACK - 1e-9]
    if enough:
        return min(enough, key=lambda r: r.width["tbr_max"]).form
    return max(results, key=lambda r: r.coverage["tbr_max"]).form


def report(results: list[FormResult], chosen: str, seeds: list[int], level: float) -> str:
    lines = [f"interval forms, each calibrated on all but one of the validation cohorts "
             f"(seeds {', '.join(map(str, seeds))}) and tested on it; {level:.0%} stated, "
             f"{results[0].lesions} lesions found on real and synthetic",
             "",
             "| form | TBRmax coverage (folds) | TBRmax mean width | TBRmean coverage "
             "(folds) | TBRmean mean width |",
             "|---|---|---|---|---|"]
    for r in results:
        cells = []
        for m in MEASURES:
            folds = " / ".join(f"{v:.2f}" for v in r.fold_coverage[m])
            cells += [f"{r.coverage[m]:.3f} ({folds})", f"{r.width[m]:.2f}"]
        name = f"**{r.form}**" if r.form == chosen else r.form
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"pick: {chosen} (the narrowest on TBRmax among forms covering at least "
                  f"{level - COVERAGE_SLACK:.2f}; else the best-covering)"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--validation-benchmark", type=Path, action="append", required=True,
                        help="summary.json of `benchmark --cohort validation` (with "
                             "uncertainty passes), at least two, of the same weights")
    parser.add_argument("--interval-level", type=float, default=0.9,
                        help="two-sided level of the TBR intervals (%(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the figures as JSON here")


def run(args: argparse.Namespace) -> int:
    if not 0.0 < args.interval_level < 1.0:
        print(f"error: --interval-level {args.interval_level} must lie between 0 and 1")
        return 2
    summaries = []
    for path in args.validation_benchmark:
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"error: {path}: {exc}")
            return 2
        if not (isinstance(summary, dict) and isinstance(summary.get("meta"), dict)
                and {"seed", "cohort", "sha256"} <= summary["meta"].keys()
                and isinstance(summary.get("intervals"), dict)):
            print(f"error: {path}: not a benchmark summary (no meta or intervals)")
            return 2
        summaries.append(summary)
    try:
        check_summaries(summaries)
    except (KeyError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    results, skipped = [], []
    for form in INTERVAL_FORMS:
        try:
            results.append(leave_one_cohort_out(summaries, form, args.interval_level))
        except ValueError as exc:  # e.g. too few lesions for a conformal calibration
            skipped.append(f"{form}: {exc}")
    if not results:
        print("error: no form could be calibrated: " + "; ".join(skipped))
        return 2
    chosen = pick(results, args.interval_level)
    print(report(results, chosen, [s["meta"]["seed"] for s in summaries], args.interval_level))
    for line in skipped:
        print(f"not compared: {line}")
    if args.out is not None:
        args.out.write_text(json.dumps({
            "level": args.interval_level, "pick": chosen,
            "seeds": [s["meta"]["seed"] for s in summaries],
            "forms": [vars(r) for r in results]}, indent=2, allow_nan=False))
    return 0
