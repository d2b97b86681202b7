"""Lesions the node reports, matched to ground truth: a finding, a miss, a false focus
and a satellite fragment, each where it is built to be."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicom_node.analysis.tbr import Lesion, TbrResult
from training.lesion_truth import grown_labels, match_lesions

SPACING = (2.0, 1.0, 1.0)
SHAPE = (12, 60, 60)


def _lesion(number: int, mask: np.ndarray, uptake: np.ndarray, bg: float) -> Lesion:
    peak = np.unravel_index(np.argmax(np.where(mask, uptake, -1)), mask.shape)
    return Lesion(number=number, tbr_max=float(uptake[mask].max() / bg),
                  tbr_mean=float(uptake[mask].mean() / bg), volume_ml=float(mask.sum()) * 0.002,
                  max_uptake=float(uptake[mask].max()), mean_uptake=float(uptake[mask].mean()),
                  mask=mask, peak_index=tuple(int(i) for i in peak))  # type: ignore[arg-type]


@pytest.fixture
def scene() -> tuple[np.ndarray, np.ndarray, TbrResult]:
    labels = np.zeros(SHAPE, np.uint8)
    labels[4:8, 10:20, 10:20] = 1   # found, with a satellite fragment beside it
    labels[4:8, 40:50, 40:50] = 2   # missed
    uptake = np.ones(SHAPE, np.float32)
    finding = np.zeros(SHAPE, bool)
    finding[4:8, 11:19, 11:19] = True
    fragment = np.zeros(SHAPE, bool)
    fragment[5:7, 21:23, 12:14] = True   # 2-3 mm beyond tumour 1's edge
    focus = np.zeros(SHAPE, bool)
    focus[2:4, 40:44, 8:12] = True       # far from every tumour
    uptake[finding] = 3.0
    uptake[fragment] = 2.0
    uptake[focus] = 2.5
    background = np.zeros(SHAPE, bool)
    background[:, 25:35, 25:35] = True
    result = TbrResult(background_mean=1.0, background_mask=background, threshold=1.6,
                       lesions=[_lesion(1, finding, uptake, 1.0), _lesion(2, focus, uptake, 1.0),
                                _lesion(3, fragment, uptake, 1.0)])
    return labels, uptake, result


def test_roles(scene: tuple[np.ndarray, np.ndarray, TbrResult]) -> None:
    labels, uptake, result = scene
    matching = match_lesions(labels, result, SPACING, uptake)
    roles = {r.number: (r.role, r.truth_label) for r in matching.reported}
    assert roles == {1: ("finding", 1), 2: ("false_focus", 0), 3: ("fragment", 1)}
    found, missed = matching.of(1), matching.of(2)
    assert found.found and found.finding_number == 1 and found.tbr_max == pytest.approx(3.0)
    assert not missed.found and math.isnan(missed.tbr_max) and missed.finding_number == 0
    # the VOI at the truth is measured whether the node found the lesion or not
    assert missed.voi_tbr_max == pytest.approx(1.0)
    assert found.voi_tbr_max == pytest.approx(3.0)
    assert len(matching.false_foci) == 1 and len(matching.fragments) == 1


def test_a_fragment_too_far_is_a_false_focus(
        scene: tuple[np.ndarray, np.ndarray, TbrResult]) -> None:
    labels, uptake, result = scene
    matching = match_lesions(labels, result, SPACING, uptake, reach_mm=1.0)
    assert {r.number for r in matching.false_foci} == {2, 3}


def test_the_larger_overlap_is_the_finding(
        scene: tuple[np.ndarray, np.ndarray, TbrResult]) -> None:
    labels, uptake, result = scene
    big, focus, small = result.lesions
    # listed first, but smaller: the finding is still the lesion with most voxels inside
    swapped = TbrResult(background_mean=1.0, background_mask=result.background_mask,
                        lesions=[small, focus, big])
    matching = match_lesions(labels, swapped, SPACING, uptake)
    assert matching.of(1).finding_number == big.number


def test_no_background_gives_no_voi_ratio(
        scene: tuple[np.ndarray, np.ndarray, TbrResult]) -> None:
    labels, uptake, _result = scene
    empty = TbrResult(background_mean=float("nan"), background_mask=np.zeros(SHAPE, bool),
                      note="no normal-appearing background")
    matching = match_lesions(labels, empty, SPACING, uptake)
    assert all(not t.found and math.isnan(t.voi_tbr_max) for t in matching.truth)


def test_grown_labels_reach_in_millimetres() -> None:
    labels = np.zeros((5, 20, 20), np.uint8)
    labels[2, 10, 10] = 3
    grown = grown_labels(labels, (4.0, 1.0, 1.0), 3.0)
    assert grown[2, 10, 13] == 3 and grown[2, 10, 14] == 0   # 3 mm in-plane
    assert grown[1, 10, 10] == 0                            # 4 mm across slices
    assert grown_labels(labels, (1.0, 1.0, 1.0), 0.0).sum() == 3
