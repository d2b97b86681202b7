"""Triage's selection is handed to the job (no second read of every header), but only for
the series version and instance count it was made for."""

from __future__ import annotations

from dicom_node.series.selection import Selection
from dicom_node.series.tracking import Selections
from storage.models import Series


def _series(version: int, count: int) -> Series:
    return Series(id=7, series_uid="1.2.3", study_uid="1.2", version=version,
                  instance_count=count)


def test_a_kept_selection_is_taken_once_for_its_own_version_and_count() -> None:
    kept = Selection(True, "axial post-contrast T1", [])
    selections = Selections()
    selections.keep(_series(1, 20), kept)
    assert selections.take(7, 1, 20) is kept
    assert selections.take(7, 1, 20) is None  # taken once


def test_a_changed_series_is_selected_again() -> None:
    selections = Selections()
    selections.keep(_series(1, 20), Selection(True, "ok", []))
    assert selections.take(7, 1, 21) is None  # a late instance arrived since triage
    selections.keep(_series(1, 20), Selection(True, "ok", []))
    assert selections.take(7, 2, 20) is None  # a new version
    assert selections.take(8, 1, 20) is None
