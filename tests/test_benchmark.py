"""The lesion-level benchmark through the node's own path, its evaluation protocol, and the
training-cohort helpers it relies on (in-memory phantom datasets, augmentation,
uncertainty sampling)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.analysis.tbr import Lesion, TbrResult
from dicom_node.analysis.uncertainty import (
    Calibration,
    ConformalScores,
    conformal_scores,
    lesion_intervals,
)
from dicom_node.inference.generator import build_generator
from dicom_node.inference.model_weights import ModelCard, WeightsError, load_weights, save_weights
from dicom_node.inference.predictor import Predictor
from training.augment import AffineAugment, warp
from training.benchmark import CohortError, check_cohort, run_benchmark
from training.dataset import build_dataset
from training.dataset_io import load_pairs
from training.export import benchmark_extras
from training.phantom import PhantomGeometry, generate_patient
from training.phantom_dataset import CohortSpec, build_phantom_dataset, kept_slices, patient_arrays
from training.phantom_dicom import write_patient

SMALL = PhantomGeometry(rows=128, cols=128, pixel_spacing_mm=2.0, slice_spacing_mm=4.0)


def _card(**changes: object) -> ModelCard:
    card = ModelCard(name="t", version="0", architecture="unet_128", ngf=8, output_kind="uptake",
                     test_weights=True)
    return dataclasses.replace(card, **changes)  # type: ignore[arg-type]


def _uptake_weights(path: Path, **changes: object) -> Path:
    torch.manual_seed(0)
    card = _card(**changes)
    save_weights(build_generator("unet_128", 8, output_nc=1), card, path)
    return path


# --- protocol -------------------------------------------------------------------------------


def test_sealed_cohort_must_be_declared_fresh_and_unused() -> None:
    frozen = {"training_seeds": [100], "validation_seeds": [200], "sealed_test_seed": 300}
    with pytest.raises(CohortError, match="declares no sealed"):
        check_cohort(_card(), "sealed-test", 300)
    with pytest.raises(CohortError, match="not the card's sealed"):
        check_cohort(_card(cohorts=frozen), "sealed-test", 301)
    reused = {**frozen, "sealed_test_seed": 200}
    with pytest.raises(CohortError, match="used for training or choices"):
        check_cohort(_card(cohorts=reused), "sealed-test", 200)
    with pytest.raises(CohortError, match="already evaluated"):
        check_cohort(_card(cohorts=frozen, metrics={"sealed_test": {"patients": 40}}),
                     "sealed-test", 300)
    check_cohort(_card(cohorts=frozen), "sealed-test", 300)  # the one allowed evaluation


def test_choices_never_use_the_sealed_or_training_cohort() -> None:
    frozen = {"training_seeds": [100], "validation_seeds": [200], "sealed_test_seed": 300}
    with pytest.raises(CohortError, match="sealed test cohort"):
        check_cohort(_card(cohorts=frozen), "validation", 300)
    with pytest.raises(CohortError, match="training cohort"):
        check_cohort(_card(cohorts=frozen), "validation", 100)
    with pytest.raises(CohortError, match="not one of the card's training"):
        check_cohort(_card(cohorts=frozen), "training", 200)
    check_cohort(_card(cohorts=frozen), "validation", 200)
    check_cohort(_card(cohorts=frozen), "training", 100)


# --- the benchmark, end to end on a small phantom ------------------------------------------


def test_benchmark_reports_lesions_per_uptake(tmp_path: Path) -> None:
    weights = _uptake_weights(tmp_path / "w.pt")
    model = load_weights(weights)
    out = tmp_path / "bench"
    # patient 4 of seed 0 has a tumour the node finds on the real uptake (test_reports.py)
    summary = run_benchmark(model, 0, range(4, 5), "validation", out, 1.6, 0.1, samples=3,
                            progress=False, geometry=SMALL)
    truth = generate_patient(4, 0, SMALL)
    assert summary["lesions"] == len(truth.tumours) >= 1
    real = summary["per_source"]["real"]
    assert real["found"] >= 1 and summary["per_source"]["oracle"]["found"] >= 1
    for name in ("report.md", "summary.json", "lesions.csv", "false_foci.png",
                 "worst_misses.png", "false_foci.json"):
        assert (out / name).is_file(), name
    written = json.loads((out / "summary.json").read_text())
    assert written["meta"]["sha256"] == model.sha256 and written["meta"]["cohort"] == "validation"
    assert set(written["checks"]) >= {"detection", "false_foci", "tbr_max_bias"}
    # the random generator finds nothing: no interval measured, so no calibration pairs
    assert written["intervals"]["findings_with_interval"] == 0
    assert "calibration_pairs" not in written["intervals"]
    report = (out / "report.md").read_text()
    assert "lesions found" in report and "false foci" in report
    # the sealed cohort is refused before anything runs
    with pytest.raises(CohortError):
        run_benchmark(model, 0, range(1), "sealed-test", tmp_path / "x", 1.6, 0.1, samples=0,
                      progress=False, geometry=SMALL)
    assert not (tmp_path / "x").exists()


def _lesion_rows(patient: str, real: float, synthetic: float | None, sd: float
                 ) -> list[dict[str, object]]:
    """One truth lesion's rows as evaluate_patient writes them: found on real and oracle,
    and on synthetic (with an interval) unless ``synthetic`` is None."""
    base = {"patient": patient, "label": 1, "kind": "solid_enhancing", "truth_volume_ml": 1.0,
            "voi_tbr_max": real, "voi_tbr_mean": real - 0.3}
    found = {"found": True, "volume_ml": 1.0, "finding_number": 1}
    rows: list[dict[str, object]] = [
        {**base, **found, "source": source, "tbr_max": real, "tbr_mean": real - 0.3}
        for source in ("real", "oracle")]
    if synthetic is None:
        rows.append({**base, "source": "synthetic", "found": False, "tbr_max": math.nan,
                     "tbr_mean": math.nan, "volume_ml": math.nan, "finding_number": 0})
    else:
        rows.append({**base, **found, "source": "synthetic", "tbr_max": synthetic,
                     "tbr_mean": synthetic - 0.2, "tbr_max_low": synthetic - 0.5,
                     "tbr_max_high": synthetic + 0.5, "tbr_mean_low": synthetic - 0.6,
                     "tbr_mean_high": synthetic + 0.2, "sd_model_tbr_max": sd,
                     "sd_model_tbr_mean": sd / 2, "equivocal": False})
    return rows


def test_summary_records_each_lesions_residual_and_sampling_sd() -> None:
    """What a calibration takes from a validation cohort: per lesion found on real and
    synthetic uptake, real - synthetic and the model's sampling SD (a lesion the synthetic
    uptake missed has none), and the residual's SD and mean (synthetic - real) from them."""
    from training.benchmark import PatientRecord, summarise

    truth = [(2.5, 2.2, 0.1), (3.0, 2.4, 0.2), (2.0, None, 0.0), (2.8, 2.9, 0.05)]
    records = [PatientRecord(index=i, patient_id=f"P{i}", tumours=1,
                             lesions=_lesion_rows(f"P{i}", real, synthetic, sd))
               for i, (real, synthetic, sd) in enumerate(truth)]
    intervals = summarise(records)["intervals"]
    found = [(real, synthetic, sd) for real, synthetic, sd in truth if synthetic is not None]
    assert intervals["calibration_pairs"]["tbr_max"] == [
        [pytest.approx(real - synthetic), sd] for real, synthetic, sd in found]
    assert intervals["calibration_pairs"]["tbr_mean"] == [
        [pytest.approx((real - 0.3) - (synthetic - 0.2)), sd / 2] for real, synthetic, sd in found]
    residuals = [synthetic - real for real, synthetic, _ in found]
    assert intervals["residual_bias_tbr_max"] == pytest.approx(float(np.mean(residuals)))
    assert intervals["residual_sd_tbr_max"] == pytest.approx(float(np.std(residuals, ddof=1)))
    assert intervals["n_coverage"] == 3


def test_summary_and_report_split_lesions_by_tumour_kind() -> None:
    """Per kind: lesions, found per uptake and the TBRmax bias at the truth; a missed
    tumour still counts in the bias (its VOI is measured found or not)."""
    from training.benchmark import PatientRecord, report_markdown, summarise

    def rows(patient: str, kind: str, real: float, synthetic: float, found: bool
             ) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for source, voi, hit in (("real", real, True), ("oracle", real - 0.1, True),
                                 ("synthetic", synthetic, found)):
            out.append({"patient": patient, "label": 1, "kind": kind, "truth_volume_ml": 1.0,
                        "source": source, "found": hit, "finding_number": 1 if hit else 0,
                        "tbr_max": voi if hit else math.nan,
                        "tbr_mean": voi - 0.3 if hit else math.nan,
                        "volume_ml": 1.0 if hit else math.nan,
                        "voi_tbr_max": voi, "voi_tbr_mean": voi - 0.3})
        return out

    cohort = [("solid_enhancing", 2.5, 2.4, True), ("solid_enhancing", 3.0, 2.8, True),
              ("non_enhancing", 2.0, 1.4, False), ("non_enhancing", 2.2, 1.9, True)]
    records = [PatientRecord(index=i, patient_id=f"P{i}", tumours=1,
                             lesions=rows(f"P{i}", kind, real, synthetic, found))
               for i, (kind, real, synthetic, found) in enumerate(cohort)]
    summary = summarise(records)
    kinds = summary["per_kind"]
    assert set(kinds) == {"solid_enhancing", "non_enhancing"}
    assert kinds["solid_enhancing"]["lesions"] == kinds["non_enhancing"]["lesions"] == 2
    assert kinds["non_enhancing"]["found"] == {"synthetic": 1, "real": 2, "oracle": 2}
    assert kinds["solid_enhancing"]["found"]["synthetic"] == 2
    assert kinds["non_enhancing"]["bias_voi_tbr_max_synthetic"] == pytest.approx(-0.45)
    assert kinds["solid_enhancing"]["bias_voi_tbr_max_synthetic"] == pytest.approx(-0.15)
    assert kinds["non_enhancing"]["bias_voi_tbr_max_oracle"] == pytest.approx(-0.1)
    meta = {"model": "m", "cohort": "validation", "seed": 1, "command": "c", "sha256": "0",
            "threshold": 1.6, "min_volume_ml": 0.1, "seconds": 1.0,
            "interval_method": "none", "interval_level": 0.9}
    report = report_markdown(summary, meta)
    assert "| non enhancing | 2 | 1 / 2 / 2 | -0.45 (-0.10) |" in report
    assert "| solid enhancing | 2 | 2 / 2 / 2 | -0.15 (-0.10) |" in report


def test_conformal_scores_are_order_statistics_and_refuse_too_few() -> None:
    residuals = [float(v) for v in range(-9, 10)]  # 19 lesions: the fewest for 90 %
    sds = [0.0] * 19
    scores = conformal_scores(residuals, sds, 0.9)
    assert scores.scale == pytest.approx(5.0)  # median |residual|
    # floor(20 * 0.05) = 1st and ceil(20 * 0.95) = 19th of the sorted scores
    assert (scores.low, scores.high, scores.n) == (pytest.approx(-9 / 5), pytest.approx(9 / 5), 19)
    with pytest.raises(ValueError, match="cannot calibrate a 90% interval"):
        conformal_scores(residuals[:18], sds[:18], 0.9)
    with pytest.raises(ValueError, match="not finite"):
        conformal_scores([*residuals[:18], math.nan], sds, 0.9)
    with pytest.raises(ValueError, match="all zero"):
        conformal_scores([0.0] * 19, sds, 0.9)
    with pytest.raises(ValueError, match="between 0 and 1"):
        conformal_scores(residuals, sds, 1.0)
    assert ConformalScores.from_dict(scores.as_dict()) == scores


def test_conformal_intervals_cover_new_lesions_at_their_level() -> None:
    """Skewed, biased residuals whose spread grows with the model's own SD (as on the
    phantoms): calibrated on 400 lesions, the interval covers new lesions at about 90 %
    (a calibration sample this size leaves it within a few points) and moves towards the
    real values instead of staying centred; the Gaussian interval of the same residuals'
    SD and mean, centred on the value, needs a much wider interval for it."""
    rng = np.random.default_rng(7)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        sd = rng.uniform(0.02, 0.3, n)
        residual = 0.25 + (np.hypot(sd, 0.2) * rng.gamma(2.0, 0.5, n) - 0.4)
        return residual, sd

    cal_r, cal_sd = draw(400)
    scores = conformal_scores(cal_r, cal_sd, 0.9)
    assert scores.low + scores.high > 0  # real above synthetic on average: not centred
    test_r, test_sd = draw(20000)
    width = np.hypot(test_sd, scores.scale)
    low, high = scores.low * width, scores.high * width
    one = math.hypot(0.1, scores.scale)
    assert scores.limits(1.0, 0.1) == pytest.approx((1.0 + scores.low * one,
                                                     1.0 + scores.high * one))
    coverage = float(np.mean((low <= test_r) & (test_r <= high)))
    assert 0.88 <= coverage <= 0.97
    gauss = Calibration(residual_sd_tbr_max=float(np.std(cal_r, ddof=1)),
                        residual_bias_tbr_max=-float(np.mean(cal_r)), level=0.9)
    half = gauss.z * np.hypot(test_sd, gauss.residual_rms_tbr_max)
    assert float(np.mean(np.abs(test_r) <= half)) >= 0.9  # it covers too ...
    assert float(np.mean(high - low)) < 0.85 * float(np.mean(2 * half))  # ... by being wider


def test_conformal_calibration_from_the_card_sets_the_intervals() -> None:
    result, samples = _one_lesion_and_samples()
    card = {"level": 0.9, "source": "validation cohorts seed 200, 210",
            "residual_sd_tbr_max": 0.4, "residual_sd_tbr_mean": 0.2,
            "conformal": {"tbr_max": {"low": -0.5, "high": 2.0, "scale": 0.3, "n": 70},
                          "tbr_mean": {"low": -1.0, "high": 1.5, "scale": 0.1, "n": 70}}}
    calibration = Calibration.from_card(card)
    assert calibration.conformal and calibration.calibrated
    (interval,) = lesion_intervals(samples, result, calibration)
    sd = float(np.std([1.8 + 0.05 * i for i in range(5)], ddof=1))
    width = math.hypot(sd, 0.3)
    assert interval.tbr_max_low == pytest.approx(2.0 - 0.5 * width, rel=1e-4)
    assert interval.tbr_max_high == pytest.approx(2.0 + 2.0 * width, rel=1e-4)
    assert interval.tbr_mean_low == pytest.approx(1.8 - 1.0 * math.hypot(sd, 0.1), rel=1e-4)
    assert not interval.equivocal  # 2.0 - 0.5 * 0.31 stays above 1.6
    assert "split-conformal" in calibration.method_text(4)
    # a lower score reaching under the threshold makes the finding equivocal
    card["conformal"]["tbr_max"]["low"] = -1.5  # type: ignore[index]
    (low,) = lesion_intervals(samples, result, Calibration.from_card(card))
    assert low.equivocal and low.tbr_max_low < 1.6


def _validation_summary(seed: int, pairs: list[list[float]] | None) -> dict[str, object]:
    figures = {"found": 1, "false_foci_per_patient": 0.0,
               "voi_tbr_max": {"r": {"r": 0.7}, "bias": -0.2},
               "voi_tbr_mean": {"r": {"r": 0.7}, "bias": -0.1},
               "node_tbr_max": {"r": {"n": len(pairs or [])}}}
    intervals: dict[str, object] = {"residual_sd_tbr_max": 0.4, "residual_sd_tbr_mean": 0.2,
                                    "residual_bias_tbr_max": -0.2,
                                    "residual_bias_tbr_mean": -0.1}
    if pairs is not None:
        intervals["calibration_pairs"] = {"tbr_max": pairs, "tbr_mean": pairs}
    return {"meta": {"seed": seed, "cohort": "validation", "sha256": "0"},
            "patients": 60, "lesions": 60, "intervals": intervals, "checks": {},
            "per_source": {s: figures for s in ("real", "synthetic", "oracle")}}


def test_export_pools_validation_cohorts_into_the_interval_calibration() -> None:
    rng = np.random.default_rng(3)
    first = [[float(r), 0.1] for r in rng.normal(0.2, 0.4, 30)]
    second = [[float(r), 0.1] for r in rng.normal(0.2, 0.4, 40)]
    residuals = [p[0] for p in first + second]
    cohorts = {"validation_seeds": [200, 210]}
    summaries = [_validation_summary(200, first), _validation_summary(210, second)]
    extras = benchmark_extras(summaries, None, 0.9, cohorts)
    interval = extras["tbr_interval"]
    # the Gaussian form (the default) over both cohorts' lesions, not the first one's figures
    assert "conformal" not in interval
    assert interval["residual_sd_tbr_max"] == pytest.approx(float(np.std(residuals, ddof=1)))
    assert interval["residual_bias_tbr_max"] == pytest.approx(-float(np.mean(residuals)))
    assert interval["residual_sd_tbr_max"] != 0.4  # the first summary's own figure
    assert "seed 200, 210, 70 lesions" in interval["source"]
    assert extras["benchmarks"]["validation"]["seed"] == 200
    assert extras["benchmarks"]["validation_more"][0]["seed"] == 210
    conformal = benchmark_extras(summaries, None, 0.9, cohorts, "conformal")["tbr_interval"]
    assert conformal["conformal"]["tbr_max"] == conformal_scores(residuals, [0.1] * 70,
                                                                 0.9).as_dict()
    assert Calibration.from_card(conformal).conformal
    shifted = benchmark_extras(summaries, None, 0.9, cohorts, "shifted")["tbr_interval"]
    assert shifted["form"] == "shifted" and "form" not in interval
    assert shifted["residual_bias_tbr_max"] == interval["residual_bias_tbr_max"]
    assert Calibration.from_card(shifted).shifted and not Calibration.from_card(interval).shifted
    # one cohort without per-lesion pairs: its own figures, shifted too, if it has the mean
    old_shifted = benchmark_extras([_validation_summary(200, None)], None, 0.9, {}, "shifted")
    assert old_shifted["tbr_interval"]["form"] == "shifted"
    assert old_shifted["tbr_interval"]["residual_bias_tbr_max"] == -0.2
    for key in ("residual_bias_tbr_max", "residual_bias_tbr_mean"):
        no_mean = _validation_summary(200, None)
        del no_mean["intervals"][key]  # type: ignore[attr-defined]
        with pytest.raises(ValueError, match="residual mean"):
            benchmark_extras([no_mean], None, 0.9, {}, "shifted")
    # one cohort measured without uncertainty passes: its own figures, as older cards had
    old = benchmark_extras([_validation_summary(200, None)], None, 0.9, {})
    assert "conformal" not in old["tbr_interval"]
    assert old["tbr_interval"]["residual_sd_tbr_max"] == 0.4
    with pytest.raises(ValueError, match="uncertainty passes"):
        benchmark_extras([_validation_summary(200, None), summaries[1]], None, 0.9, cohorts)
    with pytest.raises(ValueError, match="not all among"):
        benchmark_extras([_validation_summary(300, first)], None, 0.9, cohorts)
    with pytest.raises(ValueError, match="seed given twice"):
        benchmark_extras([summaries[0]] * 2, None, 0.9, cohorts)
    with pytest.raises(ValueError, match="cannot calibrate"):
        benchmark_extras([_validation_summary(200, first[:10])], None, 0.9, cohorts,
                         "conformal")
    with pytest.raises(ValueError, match="different weights"):
        other = _validation_summary(210, second)
        other["meta"]["sha256"] = "1"  # type: ignore[index]
        benchmark_extras([summaries[0], other], None, 0.9, cohorts)
    with pytest.raises(ValueError, match="not finite"):
        benchmark_extras([_validation_summary(200, [*first, [math.nan, 0.1]])], None, 0.9,
                         cohorts)
    with pytest.raises(ValueError, match="needs a --validation-benchmark"):
        benchmark_extras([], None, 0.9, cohorts, "conformal")
    # the card's figures do not carry the per-lesion pairs
    assert "calibration_pairs" not in extras["benchmarks"]["validation"]["intervals"]


# --- training cohorts ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["same-grid", "scanner"])
def test_phantom_dataset_equals_the_dicom_path(tmp_path: Path, layout: str) -> None:
    """The in-memory cohort stores exactly what `phantom` + `dataset` store, in both PET
    layouts (scanner: Bq/mL on the PET's own grid, SUV and resampling as `dataset` does)."""
    spec = CohortSpec(seed=5, size=64, slice_spacing_mm=6.0, pet_layout=layout)
    patient = generate_patient(1, 5, spec.geometry)
    write_patient(patient, tmp_path / "studies", pet_layout=layout,
                  fusion="none" if layout == "scanner" else None)
    build_dataset(tmp_path / "studies", tmp_path / "ds", size=64, progress=False)
    reference = load_pairs(tmp_path / "ds")
    mine = patient_arrays(1, spec)
    mine.pop("tumours")
    assert set(mine) == set(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(mine[key], value, err_msg=key)


def test_enriched_lean_cohort(tmp_path: Path) -> None:
    spec = CohortSpec(seed=7, size=64, slice_spacing_mm=8.0, tumour_count_p=(0.0, 0.0, 1.0),
                      normal_slice_fraction=0.0, tumour_reach_slices=1, lean=True)
    info = build_phantom_dataset(spec, 3, tmp_path / "ds", val_patients=1, progress=False)
    pairs = load_pairs(tmp_path / "ds")
    assert "fusion" not in pairs and "uptake" in pairs
    assert info["counts"]["tumours"] >= 5  # type: ignore[index]
    splits = json.loads((tmp_path / "ds" / "splits.json").read_text())
    assert len(splits["patients"]["val"]) == 1 and not splits["test"]
    # only slices within one slice of a tumour are kept
    for index in range(3):
        labels = generate_patient(index, 7, spec.geometry,
                                  tumour_count_p=spec.tumour_count_p).tumour_labels
        keep = kept_slices(labels, spec, index)
        tumour = np.flatnonzero(labels.any(axis=(1, 2)))
        assert all(np.min(np.abs(tumour - k)) <= 1 for k in keep)
    from training.data import load_dataset

    data = load_dataset(tmp_path / "ds")
    with pytest.raises(Exception, match="lean"):
        _ = data.fusion


def test_default_tumour_counts_reproduce_standard_cohorts() -> None:
    geometry = PhantomGeometry(rows=64, cols=64, pixel_spacing_mm=4.0, slice_spacing_mm=8.0)
    a = generate_patient(3, 1, geometry)
    b = generate_patient(3, 1, geometry, tumour_count_p=(0.1, 0.6, 0.3))
    np.testing.assert_array_equal(a.t1c, b.t1c)
    np.testing.assert_array_equal(a.uptake, b.uptake)


def test_augmentation_moves_input_and_target_together() -> None:
    gen = torch.Generator().manual_seed(0)
    image = torch.zeros(4, 1, 32, 32)
    image[:, :, 8:20, 10:14] = 1.0
    x, y = image * 2 - 1, image * 2 - 1
    theta = AffineAugment(20.0, 0.1, 4.0).matrices(4, 32, gen)
    wx, wy = warp(x, theta, -1.0), warp(y, theta, -1.0)
    assert torch.equal(wx, wy) and not torch.allclose(wx, x)
    assert float(wx.min()) >= -1.0 - 1e-6  # the outside comes in as background
    still = AffineAugment().matrices(2, 32, gen)
    assert torch.allclose(warp(x[:2], still, -1.0), x[:2], atol=1e-5)
    assert not AffineAugment().active


# --- uncertainty ---------------------------------------------------------------------------


def test_sampling_is_seeded_and_varies(tmp_path: Path) -> None:
    model = load_weights(_uptake_weights(tmp_path / "w.pt"))
    predictor = Predictor(model, torch.device("cpu"), batch_size=4)
    grey = np.random.default_rng(0).random((6, 40, 48)).astype(np.float32)
    a = predictor.sample_uptake(grey, 3, slice_spacing_mm=2.0)
    b = predictor.sample_uptake(grey, 3, slice_spacing_mm=2.0)
    assert a.shape == (3, 6, 128, 128)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[2])  # dropout differs between passes
    # the node's own prediction is untouched (eval mode, deterministic)
    first = predictor.predict(grey * 1000.0).uptake
    np.testing.assert_array_equal(first, predictor.predict(grey * 1000.0).uptake)
    assert all(not m.training for m in model.generator.modules())


def test_the_network_reads_the_grey_its_card_was_trained_on(tmp_path: Path) -> None:
    """A card's t1c_input_ceiling decides the network's input; the display grey (fusion,
    SC, analysis) stays the [0, 1] window whatever the model."""
    volume = np.random.default_rng(3).normal(1000.0, 30.0, (3, 40, 40)).astype(np.float32)
    volume[1, 18:22, 18:22] = 1300.0
    plain = Predictor(load_weights(_uptake_weights(tmp_path / "a.pt")), torch.device("cpu"), 2)
    headroom = Predictor(load_weights(_uptake_weights(tmp_path / "b.pt", t1c_input_ceiling=2.0)),
                         torch.device("cpu"), 2)
    a, b = plain.predict(volume), headroom.predict(volume)
    np.testing.assert_array_equal(a.grey, b.grey)
    assert float(a.grey.max()) == 1.0
    assert float(b.input_grey.max()) > 1.2 and float(a.input_grey.max()) == 1.0
    assert not np.array_equal(a.uptake, b.uptake)  # same weights, other input
    with pytest.raises(WeightsError, match="t1c_input_ceiling"):
        _card(t1c_input_ceiling=0.5).validate()


def _one_lesion_and_samples() -> tuple[TbrResult, np.ndarray]:
    """One lesion at TBRmax 2.0 / TBRmean 1.8 over a background of 1, and 5 sampling
    passes drawing it at 1.80, 1.85, ... 2.00."""
    shape = (4, 128, 128)
    lesion_mask = np.zeros(shape, bool)
    lesion_mask[1:3, 40:60, 40:60] = True
    background = np.zeros(shape, bool)
    background[:, 80:120, 20:100] = True
    lesion = Lesion(number=1, tbr_max=2.0, tbr_mean=1.8, volume_ml=1.0, max_uptake=2.0,
                    mean_uptake=1.8, mask=lesion_mask)
    result = TbrResult(background_mean=1.0, background_mask=background, threshold=1.6,
                       lesions=[lesion])
    samples = np.ones((5, *shape), np.float32)
    for i in range(5):
        samples[i][lesion_mask] = 1.8 + 0.05 * i
    return result, samples


def test_intervals_combine_sampling_and_calibration() -> None:
    result, samples = _one_lesion_and_samples()
    calibration = Calibration(residual_sd_tbr_max=0.3, residual_sd_tbr_mean=0.2, level=0.9)
    (interval,) = lesion_intervals(samples, result, calibration)
    sd = float(np.std([1.8 + 0.05 * i for i in range(5)], ddof=1))
    assert interval.sd_model_tbr_max == pytest.approx(sd, rel=1e-4)
    half = calibration.z * math.hypot(sd, 0.3)
    assert interval.tbr_max_low == pytest.approx(2.0 - half, rel=1e-4)
    assert interval.tbr_max_high == pytest.approx(2.0 + half, rel=1e-4)
    assert interval.equivocal  # 2.0 - 0.5 reaches below 1.6
    narrow = lesion_intervals(samples, result, Calibration())[0]
    assert not narrow.equivocal and narrow.tbr_max_low > 1.6
    assert "only" in Calibration().method_text(8) and Calibration().z == pytest.approx(1.645, abs=1e-3)
    # a validation bias left in the model widens the interval by its root mean square
    biased = Calibration(residual_sd_tbr_max=0.3, residual_sd_tbr_mean=0.2,
                         residual_bias_tbr_max=-0.4, residual_bias_tbr_mean=0.1, level=0.9)
    (wide,) = lesion_intervals(samples, result, biased)
    assert wide.tbr_max_high - 2.0 == pytest.approx(biased.z * math.sqrt(sd**2 + 0.3**2 + 0.4**2),
                                                     rel=1e-4)
    assert wide.tbr_max_low == pytest.approx(4.0 - wide.tbr_max_high, rel=1e-6)  # centred
    assert Calibration.from_card({"residual_sd_tbr_max": 0.3, "residual_bias_tbr_max": -0.4}
                                 ).residual_rms_tbr_max == pytest.approx(0.5)
    assert "root-mean-square" in biased.method_text(8)


def test_shifted_intervals_move_by_the_validation_bias_instead_of_widening() -> None:
    """The shifted form (``"form": "shifted"``): centred on the value minus the
    validation bias (synthetic - real), half-width from the residual SD and the sampling
    SD alone; the equivocal flag reads the moved lower limit."""
    result, samples = _one_lesion_and_samples()
    card = {"form": "shifted", "level": 0.9, "residual_sd_tbr_max": 0.3,
            "residual_sd_tbr_mean": 0.2, "residual_bias_tbr_max": -0.4,
            "residual_bias_tbr_mean": 0.1, "source": "validation cohorts seed 200, 210"}
    calibration = Calibration.from_card(card)
    assert calibration.shifted
    (interval,) = lesion_intervals(samples, result, calibration)
    sd = float(np.std([1.8 + 0.05 * i for i in range(5)], ddof=1))
    half_max = calibration.z * math.hypot(sd, 0.3)
    assert interval.tbr_max_low == pytest.approx(2.4 - half_max, rel=1e-4)
    assert interval.tbr_max_high == pytest.approx(2.4 + half_max, rel=1e-4)
    half_mean = calibration.z * math.hypot(sd, 0.2)
    tbr_mean = result.lesions[0].tbr_mean
    assert interval.tbr_mean_low == pytest.approx(tbr_mean - 0.1 - half_mean, rel=1e-4)
    assert interval.tbr_mean_high == pytest.approx(tbr_mean - 0.1 + half_mean, rel=1e-4)
    assert not interval.equivocal  # 2.4 - 0.50 stays above 1.6; the Gaussian form's does not
    (gaussian,) = lesion_intervals(samples, result, Calibration.from_card({**card, "form": ""}))
    assert gaussian.equivocal
    assert "corrected by" in calibration.method_text(4)


def test_summary_slice_shows_intervals_and_fits_the_slice() -> None:
    """The first SC slice names each lesion's interval and equivocal ones, in lines
    that the central 80 % of a 256-pixel-wide slice holds."""
    from PIL import ImageFont

    from dicom_node.analysis.uncertainty import TbrInterval
    from dicom_node.writers.sc import summary_lines

    mask = np.zeros((2, 4, 4), bool)
    lesions = [Lesion(number=n, tbr_max=2.0 + n, tbr_mean=1.8, volume_ml=12.4, max_uptake=1.0,
                      mean_uptake=1.0, mask=mask) for n in (1, 2)]
    result = TbrResult(background_mean=0.95, background_mask=mask, threshold=1.6,
                       lesions=lesions)
    intervals = [TbrInterval(1, 1.41, 4.27, 1.4, 2.2, 0.1, 0.1, 8, 0.9, True)]
    lines = summary_lines(result, intervals, 0.9)
    assert lines[1] == "Lesion 1 EQUIVOCAL: 12.4 mL, 90% intervals"
    assert lines[2] == " TBRmax 3.00 (1.41-4.27) TBRmean 1.80 (1.40-2.20)"
    assert lines[3].startswith("Lesion 2: TBRmax 4.00")  # no interval measured for it
    font = ImageFont.load_default(size=8)  # the SC writer's smallest font
    assert all(font.getlength(line) < 0.8 * 256 for line in lines)  # its central 80 %
