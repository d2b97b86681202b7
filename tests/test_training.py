"""Pix2Pix on a tiny dataset: L1 falls, resume is exact, export matches, evaluate runs."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dicom_node.inference.fusion import fuse, to_uint8
from dicom_node.inference.fusion_style import FusionStyle
from dicom_node.inference.generator import build_generator
from dicom_node.inference.model_weights import load_weights
from training import data as ds
from training.checkpoint import load_checkpoint
from training.cli import main as cli_main
from training.train import TrainConfig, train

SIZE = 128


def write_toy_dataset(path: Path, patients: int = 5, slices: int = 5, seed: int = 0) -> Path:
    """A dataset folder in the training.dataset format: ellipse brains, striatum, tumours."""
    rng = np.random.default_rng(seed)
    style = FusionStyle()
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    arrays: dict[str, list[np.ndarray]] = {k: [] for k in (
        "t1c", "fusion", "oracle_fusion", "oracle_uptake", "uptake", "tumour_labels", "brain_mask",
        "striatum_mask", "oedema", "patient_id", "study_uid", "slice_position_mm",
        "has_tumour")}
    for p in range(patients):
        cy, cx = SIZE / 2 + rng.uniform(-6, 6, 2)
        ty, tx = cy + rng.uniform(-25, 25), cx + rng.choice([-1, 1]) * rng.uniform(18, 28)
        avidity = rng.uniform(1.8, 3.2)
        for s in range(slices):
            r_brain = 48 - 3 * abs(s - slices // 2)
            brain = ((yy - cy) / r_brain) ** 2 + ((xx - cx) / (r_brain * 0.8)) ** 2 < 1
            striatum = (((yy - cy) / 6) ** 2 + ((np.abs(xx - cx) - 12) / 4) ** 2 < 1) & brain
            dist = np.hypot(yy - ty, xx - tx)
            r_t = max(0.0, 9 - 3 * abs(s - slices // 2))
            tumour = (dist < r_t) & brain
            oedema = (dist < r_t + 4) & brain & ~tumour
            t1c = np.where(brain, 0.45 + 0.05 * np.sin(xx / 5) * np.cos(yy / 7), 0.02)
            t1c = np.where(tumour & (dist > r_t - 3), 0.95, t1c)
            t1c = np.where(oedema, 0.35, t1c) + rng.normal(0, 0.01, t1c.shape)
            t1c = np.clip(t1c, 0, 1).astype(np.float32)
            expected = np.where(brain, 1.0, 0.0) + 1.5 * striatum + (avidity - 1) * tumour
            noisy = expected + np.where(brain, rng.normal(0, 0.08, expected.shape), 0)
            arrays["t1c"].append(t1c.astype(np.float16))
            arrays["oracle_fusion"].append(to_uint8(fuse(t1c, expected, style)))
            arrays["oracle_uptake"].append(expected.astype(np.float16))
            arrays["fusion"].append(to_uint8(fuse(t1c, noisy, style)))
            arrays["uptake"].append(noisy.astype(np.float16))
            arrays["tumour_labels"].append(tumour.astype(np.uint8))
            arrays["brain_mask"].append(brain)
            arrays["striatum_mask"].append(striatum)
            arrays["oedema"].append(oedema)
            arrays["patient_id"].append(np.array(f"P{p:02d}"))
            arrays["study_uid"].append(np.array(f"1.2.3.{p}"))
            arrays["slice_position_mm"].append(np.array(4.0 * s, np.float32))
            arrays["has_tumour"].append(np.array(tumour.any()))
    path.mkdir(parents=True, exist_ok=True)
    stacked: dict[str, Any] = {k: np.stack(v) for k, v in arrays.items()}
    np.savez_compressed(path / "pairs.npz", **stacked)
    per_patient = [list(range(p * slices, (p + 1) * slices)) for p in range(patients)]
    splits = {"method": "patient", "seed": seed, "leaks_patients": False,
              "train": [i for part in per_patient[:-2] for i in part], "val": per_patient[-2],
              "test": per_patient[-1], "patients": {}}
    (path / "splits.json").write_text(json.dumps(splits))
    (path / "dataset.json").write_text(json.dumps({"size": SIZE,
                                                   "fusion_style": style.as_dict()}))
    return path


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "ds")


def _config(dataset: Path, out: Path, **changes: object) -> TrainConfig:
    base = TrainConfig(dataset=str(dataset), out=str(out), epochs=3, decay_epochs=2, ngf=8,
                       ndf=16, batch_size=4, seed=7, device="cpu", threads=2,
                       checkpoint_every=0, log_every=2, val_max_slices=None, lr=2e-3)
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def full_run(toy_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 uninterrupted steps (3 epochs of 4 batches) of a tiny model."""
    out = tmp_path_factory.mktemp("full")
    result = train(_config(toy_dataset, out, max_steps=12))
    assert result.step == 12
    return out


def _generator(checkpoint: Path) -> torch.nn.Module:
    state = load_checkpoint(checkpoint)
    generator = build_generator("unet_128", 8, output_nc=3)
    generator.load_state_dict(state["model"]["generator"])
    return generator.eval()


def _l1(generator: torch.nn.Module, dataset: Path) -> float:
    data = ds.load_dataset(dataset)
    x, y = ds.batch(data, data.indices("train")[:8], "fusion")
    with torch.inference_mode():
        return float((generator(x) - y).abs().mean())


def test_training_decreases_l1(toy_dataset: Path, full_run: Path, tmp_path: Path) -> None:
    start = train(_config(toy_dataset, tmp_path, max_steps=0, export=False))
    assert start.step == 0
    before = _l1(_generator(tmp_path / "checkpoint.pt"), toy_dataset)
    after = _l1(_generator(full_run / "checkpoint.pt"), toy_dataset)
    assert after < 0.85 * before, (before, after)
    history = json.loads((full_run / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [0, 1, 2]
    assert {"val_l1", "val_psnr", "val_ssim"} <= set(history["epochs"][-1])
    for name in ("config.json", "losses.png", "val_metrics.png", "generator.pt"):
        assert (full_run / name).is_file(), name


def test_resume_continues_exactly(toy_dataset: Path, full_run: Path, tmp_path: Path) -> None:
    first = train(_config(toy_dataset, tmp_path, max_steps=6, export=False))
    assert (first.step, first.epoch) == (6, 1)  # stopped in the middle of epoch 1
    assert load_checkpoint(tmp_path / "checkpoint.pt")["batch_in_epoch"] == 2
    with pytest.raises(ValueError, match="ngf"):
        train(_config(toy_dataset, tmp_path, max_steps=12, ngf=16), resume=True)
    second = train(_config(toy_dataset, tmp_path, max_steps=12), resume=True)
    assert second.step == 12
    resumed = load_checkpoint(tmp_path / "checkpoint.pt")
    reference = load_checkpoint(full_run / "checkpoint.pt")
    assert resumed["step"] == reference["step"] == 12
    assert resumed["epoch"] == reference["epoch"] == 3
    for part in ("generator", "discriminator"):
        for key, value in reference["model"][part].items():
            torch.testing.assert_close(resumed["model"][part][key], value, rtol=1e-5,
                                       atol=1e-6, msg=f"{part}.{key}")
    assert resumed["model"]["sched_g"] == reference["model"]["sched_g"]
    history = json.loads(resumed["history"])
    assert [e["epoch"] for e in history["epochs"]] == [0, 1, 2]
    assert [s["step"] for s in history["steps"]] == list(range(2, 13, 2))


def test_exported_weights_match_training_generator(toy_dataset: Path, full_run: Path,
                                                   tmp_path: Path) -> None:
    generator = _generator(full_run / "checkpoint.pt")
    data = ds.load_dataset(toy_dataset)
    x = ds.input_tensor(data.t1c[data.indices("test")])
    with torch.inference_mode():
        expected = generator(x)
    exported = load_weights(full_run / "generator.pt")  # fp16, written at the end of train
    assert exported.card.output_kind == "fusion_rgb"
    assert exported.card.training["split_method"] == "patient"
    assert exported.card.training["steps"] == 12
    assert exported.card.metrics["validation"]["val_psnr"] > 0
    with torch.inference_mode():
        assert (exported.generator(x) - expected).abs().max() < 0.03
    fp32 = tmp_path / "w32.pt"
    assert cli_main(["export", "--checkpoint", str(full_run / "checkpoint.pt"), "--out",
                     str(fp32), "--fp32", "--name", "toy", "--version", "9"]) == 0
    loaded = load_weights(fp32)
    assert (loaded.card.name, loaded.card.version) == ("toy", "9")
    # the service runs as its own user: exported weights must be readable by it
    assert fp32.stat().st_mode & 0o777 == 0o644
    with torch.inference_mode():
        torch.testing.assert_close(loaded.generator(x), expected, rtol=0, atol=1e-6)


def test_evaluate_writes_report(toy_dataset: Path, full_run: Path, tmp_path: Path) -> None:
    report = tmp_path / "report"
    assert cli_main(["evaluate", "--dataset", str(toy_dataset), "--weights",
                     str(full_run / "generator.pt"), "--split", "test", "--out",
                     str(report), "--examples", "3"]) == 0
    text = (report / "report.md").read_text()
    assert "piq 0.8.0 piq.fsim, chromatic" in text
    assert "31.075" in text
    assert "PASS" in text or "FAIL" in text
    with (report / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    methods = {r["method"] for r in rows}
    assert methods == {"model", "oracle", "t1c_grey", "population_mean"}
    assert len(rows) == 4 * len(ds.load_dataset(toy_dataset).indices("test"))
    summary = json.loads((report / "summary.json").read_text())["methods"]
    # The oracle is rendered from the noise-free uptake: close to the real fusion.
    assert summary["oracle"]["psnr"] > summary["population_mean"]["psnr"] > 20
    assert summary["oracle"]["uptake_ssim_brain"] > 0.7
    assert summary["t1c_grey"]["r_tbrmean_slices"] is None  # no uptake at all: undefined
    assert -1 <= summary["oracle"]["r_tbrmax_slices"] <= 1
    for name in ("examples.png", "tbr_scatter.png", "tbr_bland_altman.png", "methods.png"):
        assert (report / name).is_file(), name


def test_oracle_is_drawn_like_the_model(toy_dataset: Path, tmp_path: Path) -> None:
    """An uptake model's fusion is drawn at the network size, so its oracle is too (from
    oracle_uptake), with the native-matrix oracle fusion beside it; an RGB model keeps
    the dataset's oracle fusion."""
    from training.evaluation import oracle_methods

    data = ds.load_dataset(toy_dataset)
    idx = data.indices("test")
    backdrop = data.backdrop(idx)
    drawn, native = oracle_methods(data, idx, "uptake", data.fusion_style, backdrop)
    assert (drawn.name, native.name) == ("oracle", "oracle_native")
    np.testing.assert_array_equal(drawn.fusion, to_uint8(fuse(
        backdrop, data.get("oracle_uptake")[idx].astype(np.float32), data.fusion_style)))
    np.testing.assert_array_equal(native.fusion, data.get("oracle_fusion")[idx])
    (only,) = oracle_methods(data, idx, "fusion", data.fusion_style, backdrop)
    assert only.name == "oracle"
    np.testing.assert_array_equal(only.fusion, data.get("oracle_fusion")[idx])

    # A dataset whose native oracle fusion differs from the oracle drawn at the network
    # size (here: drawn from half the uptake): the check must use the latter.
    other = tmp_path / "ds"
    shutil.copytree(toy_dataset, other)
    arrays = dict(np.load(other / "pairs.npz"))
    arrays["oracle_fusion"] = to_uint8(fuse(arrays["t1c"].astype(np.float32),
                                            arrays["oracle_uptake"].astype(np.float32) * 0.5,
                                            data.fusion_style))
    np.savez_compressed(other / "pairs.npz", **arrays)
    run = train(_config(other, tmp_path / "run", max_steps=2, target="uptake"))
    assert run.weights is not None
    report = tmp_path / "report"
    assert cli_main(["evaluate", "--dataset", str(other), "--weights", str(run.weights),
                     "--split", "test", "--out", str(report), "--examples", "2"]) == 0
    result = json.loads((report / "summary.json").read_text())
    methods = result["methods"]
    assert {"oracle", "oracle_native"} <= set(methods)
    assert methods["oracle"]["psnr"] > methods["oracle_native"]["psnr"] + 3
    detail = result["checks"]["psnr_vs_oracle"]["detail"][0]
    assert f"{methods['model']['psnr'] - methods['oracle']['psnr']:+.3f}" in detail
    assert "oracle_native" in (report / "report.md").read_text()


def test_tumour_l1_weights_cover_the_lesion_and_its_margin(toy_dataset: Path) -> None:
    data = ds.load_dataset(toy_dataset)
    idx = np.flatnonzero(data.has_tumour)[:3]
    weights = ds.l1_weights(data, idx, 30.0, margin_px=2)[:, 0].numpy()
    tumour = data.get("tumour_labels")[idx] > 0
    assert weights.shape == tumour.shape
    assert (weights[tumour] == 30.0).all()
    from scipy import ndimage

    grown = np.stack([ndimage.binary_dilation(t, np.ones((5, 5), bool)) for t in tumour])
    assert (weights[grown] == 30.0).all() and (weights[~grown] == 1.0).all()
    assert grown.sum() > tumour.sum()


def test_tumour_weighted_training_runs_and_is_fixed_on_resume(toy_dataset: Path,
                                                              tmp_path: Path) -> None:
    run = train(_config(toy_dataset, tmp_path, max_steps=4, export=False,
                        tumour_l1_weight=20.0, tumour_oversample=4.0))
    assert run.step == 4
    history = json.loads((tmp_path / "history.json").read_text())
    # Tumour pixels weigh 20x: the weighted term exceeds the plain L1 it is logged beside.
    assert all(s["loss_G_L1_weighted"] > s["loss_G_L1"] for s in history["steps"])
    with pytest.raises(ValueError, match="tumour_l1_weight"):
        train(_config(toy_dataset, tmp_path, max_steps=8, tumour_l1_weight=5.0,
                      tumour_oversample=4.0), resume=True)
    without_masks = tmp_path / "nomasks"
    shutil.copytree(toy_dataset, without_masks)
    arrays = dict(np.load(without_masks / "pairs.npz"))
    del arrays["tumour_labels"]
    np.savez_compressed(without_masks / "pairs.npz", **arrays)
    with pytest.raises(ValueError, match="tumour masks"):
        train(_config(without_masks, tmp_path / "other", tumour_l1_weight=5.0))


def test_weight_average_is_kept_resumed_and_exported(toy_dataset: Path, tmp_path: Path) -> None:
    """--ema-decay keeps a moving average of the generator; a resumed run continues it
    exactly and export writes the average, not the last step's generator."""
    full = train(_config(toy_dataset, tmp_path / "full", max_steps=8, ema_decay=0.5))
    state = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    live, average = state["generator"], state["generator_ema"]
    differs = [k for k in live if live[k].is_floating_point()
               and not torch.equal(live[k], average[k])]
    assert differs, "the average equals the live generator"
    # decay 0.5 after 8 steps: the average lies between the initial and the live weights
    first = "model.model.0.weight"
    assert not torch.equal(average[first], live[first])
    train(_config(toy_dataset, tmp_path / "split", max_steps=3, ema_decay=0.5, export=False))
    train(_config(toy_dataset, tmp_path / "split", max_steps=8, ema_decay=0.5), resume=True)
    resumed = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["model"]["generator_ema"]
    for key, value in average.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert full.weights is not None
    exported = load_weights(full.weights)
    assert "moving average" in exported.card.training["method"]
    reference = build_generator("unet_128", 8, output_nc=3)
    reference.load_state_dict(average)
    reference.eval()
    data = ds.load_dataset(toy_dataset)
    x = ds.input_tensor(data.t1c[data.indices("test")])
    with torch.inference_mode():
        assert (exported.generator(x) - reference(x)).abs().max() < 0.03


def test_example_slices_show_one_brain_slice_per_patient(tmp_path: Path) -> None:
    """The report's example grid: each tumour patient's largest-tumour slice, then the
    fullest slice of other patients; never an empty slice, never one patient twice."""
    from training.evaluation import example_slices

    n_patients, n_slices, size = 5, 4, 16
    t1c = np.zeros((n_patients * n_slices, size, size), np.float16)
    labels = np.zeros(t1c.shape, np.uint8)
    for p in range(n_patients):
        for s in range(1, n_slices):  # slice 0 of every patient is empty
            t1c[p * n_slices + s, 2:2 + 3 * s, 2:14] = 0.5
    labels[0 * n_slices + 2, 4:6, 4:6] = 1
    labels[1 * n_slices + 1, 4:6, 4:6] = 1
    labels[1 * n_slices + 2, 4:8, 4:8] = 1
    data = ds.PairedDataset(
        path=tmp_path, t1c=t1c, fusion_rgb=np.zeros((*t1c.shape, 3), np.uint8),
        patient_id=np.repeat([f"P{p}" for p in range(n_patients)], n_slices),
        study_uid=np.repeat([f"1.2.{p}" for p in range(n_patients)], n_slices),
        slice_position_mm=np.tile(np.arange(n_slices, dtype=np.float32), n_patients),
        has_tumour=labels.any(axis=(1, 2)), splits={}, info={},  # type: ignore[arg-type]
        extra={"tumour_labels": labels})
    idx = np.arange(len(t1c), dtype=np.int64)
    picks = example_slices(data, idx, 4)
    assert len(picks) == 4
    patients = [str(data.patient_id[p]) for p in picks]
    assert len(set(patients)) == 4
    assert 1 * n_slices + 2 in picks and 0 * n_slices + 2 in picks  # largest tumour slices
    assert all(t1c[p].any() for p in picks)  # no empty slice
    others = [p for p in picks if not labels[p].any()]
    assert all(p % n_slices == n_slices - 1 for p in others)  # the fullest slice


def test_soft_fusion_is_the_node_renderer_with_a_differentiable_gate() -> None:
    """Width 0 renders exactly what dicom_node.inference.fusion.fuse draws; a small width stays
    close to it and passes a gradient to uptake near the display threshold."""
    from training.soft_fusion import soft_fuse

    rng = np.random.default_rng(3)
    style = FusionStyle()
    grey = rng.uniform(0, 1, (2, 32, 32)).astype(np.float32)
    uptake = rng.uniform(0, 4.5, (2, 32, 32)).astype(np.float32)
    uptake[0, :4] = style.display_threshold  # exactly at the threshold: drawn
    expected = fuse(grey, uptake, style)
    hard = soft_fuse(torch.from_numpy(uptake)[:, None], torch.from_numpy(grey)[:, None],
                     style, 0.0).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(hard, expected, atol=1e-6)
    u = torch.from_numpy(uptake)[:, None].requires_grad_(True)
    soft = soft_fuse(u, torch.from_numpy(grey)[:, None], style, 0.01)
    far = np.abs(uptake - style.display_threshold) > 0.1
    np.testing.assert_allclose(soft.detach().permute(0, 2, 3, 1).numpy()[far], expected[far],
                               atol=1e-4)
    # Over white, drawing the dark red of low uptake darkens G and B: at the threshold the
    # gate's slope (1 / (4 x width) at its middle) carries that change to the uptake.
    white = torch.ones_like(u)
    soft_fuse(u, white, style, 0.01)[:, 1:].sum().backward()
    assert u.grad is not None
    near = torch.from_numpy(np.abs(uptake - style.display_threshold) < 0.005)
    assert float(u.grad[:, 0][near].max()) < -10.0
    assert float(u.grad[:, 0][torch.from_numpy(~far)].abs().max()) > 0.0
    assert float(u.grad[:, 0][torch.from_numpy(uptake < 0.1)].abs().max()) < 1e-3
    with pytest.raises(ValueError, match="gate_width"):
        soft_fuse(u, torch.from_numpy(grey)[:, None], style, -1.0)


def test_fusion_loss_training_runs_is_recorded_and_fixed_on_resume(toy_dataset: Path,
                                                                  tmp_path: Path) -> None:
    run = train(_config(toy_dataset, tmp_path, max_steps=4, target="uptake", hflip=True,
                        fusion_l1_weight=50.0, fusion_gate_width_uptake=0.05))
    assert run.step == 4 and run.weights is not None
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["steps"] and all(s["loss_G_extra"] > 0 for s in history["steps"])
    card = load_weights(run.weights).card
    assert card.training["fusion_l1_weight"] == 50.0
    assert "L1 of the fusion rendered from the uptake" in card.training["method"]
    with pytest.raises(ValueError, match="fusion_l1_weight"):
        train(_config(toy_dataset, tmp_path, max_steps=8, target="uptake", hflip=True,
                      fusion_l1_weight=10.0), resume=True)
    resumed = train(_config(toy_dataset, tmp_path, max_steps=6, target="uptake", hflip=True,
                            fusion_l1_weight=50.0, fusion_gate_width_uptake=0.05), resume=True)
    assert resumed.step == 6
    with pytest.raises(ValueError, match="needs --target uptake"):
        train(_config(toy_dataset, tmp_path / "fusion", fusion_l1_weight=10.0))


def test_fusion_loss_of_the_true_uptake_is_zero_also_when_flipped(toy_dataset: Path) -> None:
    """The term draws the target uptake into the real fusion (same grey, channel order,
    uptake scale); a flip applied to the target and the fusion pair alike keeps that."""
    from training.train import fusion_l1_term, fusion_target

    data = ds.load_dataset(toy_dataset)
    idx = np.flatnonzero(data.has_tumour)[:4]
    config = _config(toy_dataset, toy_dataset, target="uptake", fusion_l1_weight=1.0,
                     fusion_gate_width_uptake=1e-4)
    _, y = ds.batch(data, idx, "uptake", config.uptake_scale)
    grey, real = fusion_target(data, idx)
    device = torch.device("cpu")
    assert float(fusion_l1_term((grey, real), data, config, device)(y)) < 2e-3
    flipped = (grey.flip(-1), real.flip(-1))
    assert float(fusion_l1_term(flipped, data, config, device)(y.flip(-1))) < 2e-3
    # Not flipping the fusion with the target is an error the term sees.
    assert float(fusion_l1_term((grey, real), data, config, device)(y.flip(-1))) > 1e-2


def test_fine_tuning_records_the_starting_weights(toy_dataset: Path, full_run: Path,
                                                  tmp_path: Path) -> None:
    start = load_weights(full_run / "generator.pt")
    run = train(_config(toy_dataset, tmp_path, max_steps=2,
                        init_generator=str(full_run / "generator.pt")))
    assert run.weights is not None
    training = load_weights(run.weights).card.training
    assert training["init_generator_sha256"] == start.sha256
    assert training["init_generator"] == str(full_run / "generator.pt")
    # Resumed without repeating --init-generator, the record stays the run's start.
    resumed = train(_config(toy_dataset, tmp_path, max_steps=4), resume=True)
    assert resumed.weights is not None and resumed.step == 4
    training = load_weights(resumed.weights).card.training
    assert training["init_generator_sha256"] == start.sha256
    assert training["init_generator"] == str(full_run / "generator.pt")


def test_the_t1c_ceiling_goes_from_dataset_to_card_and_is_fixed_on_resume(
        toy_dataset: Path, full_run: Path, tmp_path: Path) -> None:
    """A model fine-tuned on a dataset with headroom (t1c_ceiling 2) reads its input that
    way at the node (card), says what its start read, and cannot resume on other data."""
    headroom = tmp_path / "headroom"
    shutil.copytree(toy_dataset, headroom)
    info = json.loads((headroom / "dataset.json").read_text())
    (headroom / "dataset.json").write_text(json.dumps({**info, "t1c_ceiling": 2.0}))
    run = train(_config(headroom, tmp_path / "run", max_steps=2,
                        init_generator=str(full_run / "generator.pt")))
    assert run.weights is not None
    card = load_weights(run.weights).card
    assert card.t1c_input_ceiling == 2.0 and card.training["t1c_ceiling"] == 2.0
    assert card.training["init_generator_t1c_ceiling"] == 1.0
    assert load_weights(full_run / "generator.pt").card.t1c_input_ceiling == 1.0
    (headroom / "dataset.json").write_text(json.dumps({**info, "t1c_ceiling": 1.0}))
    with pytest.raises(ValueError, match=r"cannot resume.*clipped at 2"):
        train(_config(headroom, tmp_path / "run", max_steps=4), resume=True)


def test_uptake_models_learn_the_measured_pet_of_a_site_export(toy_dataset: Path,
                                                               tmp_path: Path) -> None:
    """A site's exports give `pet_suv` (the PET as measured) and no phantom truth: an uptake
    model trains on it; where both are present, `pet_suv` is the target, not `uptake`."""
    with np.load(toy_dataset / "pairs.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    site = tmp_path / "site"
    site.mkdir()
    measured = arrays["uptake"] * np.float16(1.1)
    kept = {k: arrays[k] for k in ("t1c", "fusion", "patient_id", "study_uid",
                                   "slice_position_mm", "has_tumour")}
    np.savez(site / "pairs.npz", **kept, pet_suv=measured)
    for name in ("splits.json", "dataset.json"):
        shutil.copy(toy_dataset / name, site / name)
    data = ds.load_dataset(site)
    assert ds.uptake_array(data) == "pet_suv" and not data.has("uptake")
    idx = data.indices("train")[:4]
    expected = (torch.from_numpy(measured[idx].astype(np.float32)) / 4.0 * 2.0 - 1.0).clamp(-1, 1)
    torch.testing.assert_close(ds.target_tensor(data, idx, "uptake")[:, 0], expected)
    result = train(_config(site, tmp_path / "run", target="uptake", max_steps=2))
    assert result.step == 2
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dataset_info"]["uptake_array"] == "pet_suv"
    # both arrays: the measured PET wins
    np.savez(site / "pairs.npz", **kept, pet_suv=measured, uptake=arrays["uptake"])
    assert ds.uptake_array(ds.load_dataset(site)) == "pet_suv"


def test_l2_reconstruction_loss_is_the_squared_error_and_fixed_on_resume(
        toy_dataset: Path, tmp_path: Path) -> None:
    """--recon-loss l2 (the conditional mean, the oracle's quantity) replaces the L1 term by
    the squared error / 0.1; it is recorded and cannot change on resume."""
    from training.pix2pix import L2_SCALE, Pix2Pix, Pix2PixConfig

    torch.manual_seed(0)
    model = Pix2Pix(Pix2PixConfig(architecture="unet_128", ngf=8, ndf=8, output_nc=1,
                                  recon_loss="l2"), torch.device("cpu"))
    model.generator = torch.nn.Conv2d(1, 1, 1)  # type: ignore[assignment]  # deterministic
    model.opt_g = torch.optim.Adam(model.generator.parameters())
    data = ds.load_dataset(toy_dataset)
    x, y = ds.batch(data, data.indices("train")[:2], "uptake")
    with torch.no_grad():
        fake = model.generator(x)
    losses = model.train_step(x, y)
    expected = float(((fake - y) ** 2).mean() / L2_SCALE)
    assert losses["loss_G_L1_weighted"] == pytest.approx(expected, rel=1e-4)
    assert losses["loss_G_L1"] == pytest.approx(float((fake - y).abs().mean()), rel=1e-4)
    out = tmp_path / "run"
    train(_config(toy_dataset, out, target="uptake", recon_loss="l2", max_steps=2))
    assert json.loads((out / "config.json").read_text())["recon_loss"] == "l2"
    with pytest.raises(ValueError, match="recon_loss"):
        train(_config(toy_dataset, out, target="uptake", recon_loss="l1", max_steps=3),
              resume=True)


def test_tumour_quantile_costs_under_drawing_more_and_is_fixed_on_resume(
        toy_dataset: Path, tmp_path: Path) -> None:
    """--tumour-quantile q: in the tumour masks the reconstruction term is the doubled
    pinball loss (under-drawing costs 2q per unit, over-drawing 2(1 - q)), elsewhere the L1;
    0.5 is the plain L1. Recorded, named in the card's method, fixed on resume, and refused
    without tumour masks."""
    from training.pix2pix import Pix2Pix, Pix2PixConfig, tumour_pinball

    residual = torch.tensor([[-1.0, 1.0, -1.0, 1.0]])
    tumour = torch.tensor([[True, True, False, False]])
    assert tumour_pinball(residual, tumour, 0.75).tolist() == [[1.5, 0.5, 1.0, 1.0]]
    assert tumour_pinball(residual, tumour, 0.5).tolist() == [[1.0, 1.0, 1.0, 1.0]]

    torch.manual_seed(0)
    model = Pix2Pix(Pix2PixConfig(architecture="unet_128", ngf=8, ndf=8, output_nc=1,
                                  tumour_quantile=0.8), torch.device("cpu"))
    model.generator = torch.nn.Conv2d(1, 1, 1)  # type: ignore[assignment]  # deterministic
    model.opt_g = torch.optim.Adam(model.generator.parameters())
    data = ds.load_dataset(toy_dataset)
    idx = data.indices("train")[:2]
    x, y = ds.batch(data, idx, "uptake")
    weight = ds.l1_weights(data, idx, 10.0, 2)
    assert (weight > 1).any()
    with torch.no_grad():
        fake = model.generator(x)
    losses = model.train_step(x, y, weight)
    expected = float((tumour_pinball(fake - y, weight > 1, 0.8) * weight).mean())
    assert losses["loss_G_L1_weighted"] == pytest.approx(expected, rel=1e-4)
    plain = float(((fake - y).abs() * weight).mean())
    assert expected != pytest.approx(plain, rel=1e-3)

    out = tmp_path / "run"
    train(_config(toy_dataset, out, target="uptake", tumour_l1_weight=10.0,
                  tumour_quantile=0.7, max_steps=2))
    assert json.loads((out / "config.json").read_text())["tumour_quantile"] == 0.7
    from training.export import method_text
    assert "quantile 0.7" in method_text(json.loads((out / "config.json").read_text()))
    with pytest.raises(ValueError, match="tumour_quantile"):
        train(_config(toy_dataset, out, target="uptake", tumour_l1_weight=10.0,
                      tumour_quantile=0.6, max_steps=3), resume=True)
    with pytest.raises(ValueError, match="tumour masks"):
        train(_config(toy_dataset, tmp_path / "plain", target="uptake", tumour_quantile=0.7))
