"""Dataset building: slice pairing, PET fallback, splits and the on-disk format."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.config import SelectionConfig, load_config
from dicom_node.inference.fusion import NETWORK_T1C_CEILING, fuse, to_uint8, window_t1c
from dicom_node.inference.fusion_style import FusionStyle
from dicom_node.inference.resampling import to_network
from dicom_node.series.selection import select_series
from training.cli import main as train_main
from training.dataset import build_dataset
from training.dataset_io import load_pairs
from training.pair_arrays import (
    PatientLeakWarning,
    grey_to_network,
    rgb_to_network,
    split_indices,
)
from training.phantom import PhantomGeometry, PhantomPatient, generate_patient
from training.phantom_dicom import write_patient
from training.scanning import choose_series, pair_slices, scan_studies

SMALL = PhantomGeometry(rows=96, cols=128, pixel_spacing_mm=2.0, slice_spacing_mm=4.0,
                        n_slices=30)
SIZE = 64


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[PhantomPatient]]:
    root = tmp_path_factory.mktemp("studies")
    patients = [generate_patient(i, 3, SMALL) for i in range(4)]
    for p in patients:
        write_patient(p, root)
    return root, patients


def _copy(root: Path, patient_id: str, dest: Path) -> Path:
    shutil.copytree(root / patient_id, dest / patient_id)
    return dest / patient_id


def test_pairing_survives_shuffled_file_order(cohort: tuple[Path, list[PhantomPatient]]) -> None:
    root, _ = cohort
    study = scan_studies(root / "PH0002", progress=False)[0]
    chosen = choose_series(study)
    assert not isinstance(chosen, str)
    t1c, fusion, kind = chosen
    assert kind == "fusion"
    rng = random.Random(0)
    t1c_slices, fusion_slices = list(t1c.slices), list(fusion.slices)
    rng.shuffle(t1c_slices)
    rng.shuffle(fusion_slices)
    pairing = pair_slices(t1c_slices, fusion_slices)
    assert pairing.method == "source-reference"
    assert len(pairing.pairs) == SMALL.slices and not pairing.unpaired
    for i, j in pairing.pairs:
        assert t1c_slices[i].instance_number == fusion_slices[j].instance_number
    # Pairs come out ordered inferior -> superior.
    z = [t1c_slices[i].position[2] for i, _ in pairing.pairs]  # type: ignore[index]
    assert z == sorted(z)
    # Without references, equal instance numbers pair them.
    bare = [dataclasses.replace(s, source_refs=()) for s in fusion_slices]
    by_number = pair_slices(t1c_slices, bare)
    assert by_number.method == "instance-number"
    assert sorted(by_number.pairs) == sorted(pairing.pairs)


def test_missing_fusion_slice_is_skipped_and_rest_paired(
        cohort: tuple[Path, list[PhantomPatient]], tmp_path: Path) -> None:
    root, patients = cohort
    folder = _copy(root, "PH0001", tmp_path / "studies")
    (folder / "DICOM" / "FUSION" / "IM0005.dcm").unlink()
    summary = build_dataset(tmp_path / "studies", tmp_path / "ds", size=SIZE, progress=False)
    assert summary.pairs == SMALL.slices - 1
    assert [u["instance_number"] for u in summary.unpaired] == [5]
    pairs = load_pairs(tmp_path / "ds")
    kept = [k for k in range(SMALL.slices) if k != 4]
    expected_z = [SMALL.image_position(k)[2] for k in kept]
    np.testing.assert_allclose(pairs["slice_position_mm"], expected_z, atol=1e-3)
    np.testing.assert_array_equal(pairs["fusion"], rgb_to_network(patients[0].fusion[kept], SIZE))
    report = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert report["counts"]["unpaired_t1c_slices"] == 1


def test_pet_series_is_used_when_there_is_no_fusion(
        cohort: tuple[Path, list[PhantomPatient]], tmp_path: Path) -> None:
    root, patients = cohort
    folder = _copy(root, "PH0003", tmp_path / "studies")
    shutil.rmtree(folder / "DICOM" / "FUSION")
    summary = build_dataset(tmp_path / "studies", tmp_path / "ds", size=SIZE, progress=False)
    assert summary.pairs == SMALL.slices
    report = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert report["studies"][0]["target"] == "pet"
    assert report["studies"][0]["pairing"] == "geometry"
    assert report["studies"][0]["suv"]["units"] == "GML"
    expected = rgb_to_network(patients[2].fusion, SIZE)
    pairs = load_pairs(tmp_path / "ds")
    assert np.abs(pairs["fusion"].astype(int) - expected.astype(int)).max() <= 1
    np.testing.assert_allclose(pairs["pet_suv"].astype(np.float32),
                               pairs["uptake"].astype(np.float32), atol=2e-3)
    # A PET slice missing over the brain refuses the study (issue 21: no silent holes).
    (folder / "DICOM" / "PET" / "IM0007.dcm").unlink()
    with pytest.raises(ValueError, match="PET slices missing between"):
        build_dataset(tmp_path / "studies", tmp_path / "ds2", size=SIZE, progress=False)


def test_dataset_round_trips(cohort: tuple[Path, list[PhantomPatient]], tmp_path: Path) -> None:
    root, patients = cohort
    summary = build_dataset(root, tmp_path, size=SIZE, seed=0, progress=False)
    n = SMALL.slices * len(patients)
    assert summary.pairs == n and not summary.unpaired and not summary.skipped
    pairs = load_pairs(tmp_path)
    expected = {
        "t1c": (np.float16, (n, SIZE, SIZE)), "fusion": (np.uint8, (n, SIZE, SIZE, 3)),
        "t1c_backdrop": (np.uint8, (n, SIZE, SIZE)),
        "slice_position_mm": (np.float32, (n,)), "has_tumour": (np.bool_, (n,)),
        "uptake": (np.float16, (n, SIZE, SIZE)), "oracle_fusion": (np.uint8, (n, SIZE, SIZE, 3)),
        "oracle_uptake": (np.float16, (n, SIZE, SIZE)),
        "tumour_labels": (np.uint8, (n, SIZE, SIZE)), "brain_mask": (np.bool_, (n, SIZE, SIZE)),
        "striatum_mask": (np.bool_, (n, SIZE, SIZE)), "oedema": (np.bool_, (n, SIZE, SIZE)),
    }
    for key, (dtype, shape) in expected.items():
        assert pairs[key].dtype == dtype, key
        assert pairs[key].shape == shape, key
    assert pairs["patient_id"].dtype.kind == "U" and pairs["study_uid"].dtype.kind == "U"
    assert sorted(set(pairs["patient_id"].tolist())) == [p.patient_id for p in patients]
    # The network grey keeps headroom above the display window (enhancement survives).
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["t1c_ceiling"] == NETWORK_T1C_CEILING == 2.0
    assert float(pairs["t1c"].min()) >= 0.0
    assert 1.0 < float(pairs["t1c"].max()) <= NETWORK_T1C_CEILING
    # One patient's pairs equal what the phantom says they are.
    first = patients[1]
    mine = np.flatnonzero(pairs["patient_id"] == first.patient_id)
    assert len(mine) == SMALL.slices
    net_grey = window_t1c(first.t1c, NETWORK_T1C_CEILING)
    np.testing.assert_array_equal(
        pairs["t1c"][mine],
        np.clip(to_network(net_grey, SIZE)[0][:, 0].numpy(), 0.0, 2.0).astype(np.float16))
    grey = window_t1c(first.t1c)
    np.testing.assert_array_equal(pairs["fusion"][mine], rgb_to_network(first.fusion, SIZE))
    oracle = rgb_to_network(to_uint8(fuse(grey, first.oracle_uptake, FusionStyle())), SIZE)
    # The backdrop is the fusion's own grey wherever no uptake reaches into the pixel.
    backdrop = pairs["t1c_backdrop"][mine]
    np.testing.assert_array_equal(backdrop, grey_to_network(grey, SIZE))
    shown = first.uptake >= FusionStyle().display_threshold
    touched = to_network(shown.astype(np.float32), SIZE)[0][:, 0].numpy() > 0
    grey_pixels = pairs["fusion"][mine][~touched]
    assert (~touched).sum() > 1000 and (grey_pixels[:, 0] > 0).sum() > 100
    for channel in range(3):
        np.testing.assert_array_equal(backdrop[~touched], grey_pixels[:, channel])
    np.testing.assert_array_equal(pairs["oracle_fusion"][mine], oracle)
    # The oracle uptake is resampled exactly like the real uptake.
    np.testing.assert_array_equal(
        pairs["oracle_uptake"][mine],
        to_network(first.oracle_uptake, SIZE)[0][:, 0].numpy().astype(np.float16))
    np.testing.assert_array_equal(
        pairs["uptake"][mine], to_network(first.uptake, SIZE)[0][:, 0].numpy().astype(np.float16))
    tumour_slices = [bool(first.tumour_labels[k].any()) for k in range(SMALL.slices)]
    np.testing.assert_array_equal(pairs["has_tumour"][mine], tumour_slices)
    assert pairs["has_tumour"].any()
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert splits["method"] == "patient" and splits["leaks_patients"] is False
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == list(range(n))
    report = json.loads((tmp_path / "dataset.json").read_text())
    assert report["size"] == SIZE and report["fusion_style"] == FusionStyle().as_dict()


@pytest.mark.parametrize("n_patients", [3, 5, 10, 27, 40])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_patient_split_never_shares_a_patient(n_patients: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids = [f"P{p:03d}" for p in range(n_patients) for _ in range(int(rng.integers(1, 40)))]
    rng.shuffle(ids)
    splits = split_indices(ids, "patient", seed)
    assert not splits.leaks_patients
    sets = [set(splits.patients[name]) for name in ("train", "val", "test")]
    assert all(sets), "every set gets at least one patient"
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2])
    assert sets[1].isdisjoint(sets[2])
    assert set().union(*sets) == set(ids)
    for name in ("train", "val", "test"):
        assert {ids[i] for i in getattr(splits, name)} == set(splits.patients[name])
    assert sorted(splits.train + splits.val + splits.test) == list(range(len(ids)))
    if n_patients >= 27:
        assert len(sets[2]) == round(n_patients / 10)
    assert split_indices(ids, "patient", seed) == splits


def test_slice_split_warns_and_says_it_leaks() -> None:
    ids = [f"P{p}" for p in range(6) for _ in range(30)]
    with pytest.warns(PatientLeakWarning, match="slice-level split"):
        splits = split_indices(ids, "slice", 0)
    assert splits.leaks_patients
    assert len(splits.test) == 18 and len(splits.val) == 32 and len(splits.train) == 130
    assert set(splits.patients["train"]) & set(splits.patients["test"])


def test_cli_slice_split_prints_warning(cohort: tuple[Path, list[PhantomPatient]],
                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    root, _ = cohort
    rc = train_main(["dataset", "--studies", str(root), "--out", str(tmp_path), "--size", "32",
                     "--split", "slice", "--seed", "1"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "WARNING" in captured.err and "patient" in captured.err
    assert "train" in captured.out and "tumour slices" in captured.out
    assert json.loads((tmp_path / "splits.json").read_text())["leaks_patients"] is True


def test_workers_build_the_same_dataset(cohort: tuple[Path, list[PhantomPatient]],
                                        tmp_path: Path) -> None:
    root, _ = cohort
    build_dataset(root, tmp_path / "one", size=SIZE, seed=0, progress=False)
    build_dataset(root, tmp_path / "two", size=SIZE, seed=0, progress=False, workers=2)
    one, two = load_pairs(tmp_path / "one"), load_pairs(tmp_path / "two")
    assert sorted(one) == sorted(two)
    for key in one:
        np.testing.assert_array_equal(one[key], two[key], err_msg=key)
    assert (tmp_path / "one" / "splits.json").read_text() == \
        (tmp_path / "two" / "splits.json").read_text()


def _tilt_t1c(folder: Path, degrees: float) -> list[Path]:
    """Tilt the study's T1C slices ``degrees`` about the left-right axis (oblique)."""
    paths = sorted((folder / "DICOM" / "T1C").glob("*.dcm"))
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, cos, -sin]
        ds.save_as(path)
    return paths


def test_training_selects_series_with_the_node_rules(
        cohort: tuple[Path, list[PhantomPatient]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A 22 deg oblique T1C: training's old rules (25.8 deg) took it, the node (20 deg) does
    not; training now skips it with the node's reason, unless --node-config widens it."""
    root, _ = cohort
    studies = tmp_path / "studies"
    folder = _copy(root, "PH0004", studies)
    paths = _tilt_t1c(folder, 22.0)
    node = select_series(paths, SelectionConfig())
    assert not node.accepted and node.reason.startswith("not axial: slice normal is 22 deg")
    reason = choose_series(scan_studies(folder, progress=False)[0])
    assert isinstance(reason, str) and node.reason in reason
    rc = train_main(["dataset", "--studies", str(studies), "--out", str(tmp_path / "default"),
                     "--size", "32"])
    assert rc == 2 and node.reason in capsys.readouterr().err

    config = tmp_path / "node.toml"
    config.write_text('[model]\nweights_path = "generator.pt"\n\n'
                      '[selection]\naxial_tolerance_deg = 25.0\n')
    assert select_series(paths, load_config(config).selection).accepted
    rc = train_main(["dataset", "--studies", str(studies), "--out", str(tmp_path / "wide"),
                     "--size", "32", "--node-config", str(config)])
    assert rc == 0
    report = json.loads((tmp_path / "wide" / "dataset.json").read_text())
    assert report["counts"]["pairs"] == SMALL.slices and not report["skipped_studies"]
