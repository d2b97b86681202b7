"""SUVbw by the vendor-neutral decision tree, against values worked out by hand.

Every case writes real PET instances to tmp_path and reads them back before the SUV."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import PositronEmissionTomographyImageStorage, generate_uid

from dicom_node.writers.image_source import new_instance
from training.suv import SuvRefused, parse_dt, suv_scale

F18_HALF_LIFE_S = 6586.2


def _pet(k: int = 0, **changes: object) -> Dataset:
    ds = new_instance(PositronEmissionTomographyImageStorage, generate_uid())
    ds.Modality = "PT"
    ds.PatientWeight = 75.0
    ds.SeriesDate = "20250301"
    ds.SeriesTime = "110000"
    ds.AcquisitionDate = "20250301"
    ds.AcquisitionTime = "110000"
    ds.Units = "BQML"
    ds.CorrectedImage = ["NORM", "DTIM", "ATTN", "SCAT", "DECY", "RAN"]
    ds.DecayCorrection = "START"
    info = Dataset()
    info.RadiopharmaceuticalStartDateTime = "20250301100000"
    info.RadiopharmaceuticalStartTime = "100000"
    info.RadionuclideTotalDose = 370e6
    info.RadionuclideHalfLife = F18_HALF_LIFE_S
    ds.RadiopharmaceuticalInformationSequence = Sequence([info])
    ds.InstanceNumber = k + 1
    for key, value in changes.items():
        if key.startswith("info_"):
            target, name = info, key[5:]
        else:
            target, name = ds, key
        if value is None:
            if hasattr(target, name):
                delattr(target, name)
        else:
            setattr(target, name, value)
    return ds


def _round_trip(tmp_path: Path, datasets: list[Dataset]) -> list[Dataset]:
    out: list[Dataset] = []
    for k, ds in enumerate(datasets):
        path = tmp_path / f"PT{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(pydicom.dcmread(path))
    return out


def test_bqml_start_series_time(tmp_path: Path) -> None:
    # 1 h after injection: decayed dose = 370e6 * 2^(-3600 / 6586.2) = 370e6 * 0.684633 Bq
    # = 253.31 MBq; SUV factor = 75 kg * 1000 g/kg / 253.31e6 Bq = 2.96075e-4 mL/Bq... (g/Bq)
    scale = suv_scale(_round_trip(tmp_path, [_pet(0), _pet(1)]))
    assert scale.factors == pytest.approx((2.960750e-4,) * 2, rel=1e-6)
    assert scale.scan_time == parse_dt("20250301110000")
    assert "SeriesDate/SeriesTime" in scale.method
    # A concentration of 10 000 Bq/mL is SUV 2.96.
    assert 10_000 * scale.factors[0] == pytest.approx(2.96075, rel=1e-5)


def test_series_time_after_acquisition_uses_earliest_acquisition(tmp_path: Path) -> None:
    # Series re-created at 12:30 (after the scan): the earliest acquisition, 10:40, is the
    # scan start. 40 min: 2^(-2400 / 6586.2) = 0.776793; 75000 / (370e6 * 0.776793).
    headers = [_pet(0, SeriesTime="123000", AcquisitionTime="104500"),
               _pet(1, SeriesTime="123000", AcquisitionTime="104000")]
    scale = suv_scale(_round_trip(tmp_path, headers))
    assert scale.scan_time == parse_dt("20250301104000")
    assert scale.factors[0] == pytest.approx(75000 / (370e6 * 0.7767927886), rel=1e-6)
    assert "earliest AcquisitionDate" in scale.method


def test_ge_private_scan_time_wins_when_series_time_is_later(tmp_path: Path) -> None:
    ds = _pet(0, SeriesTime="123000", AcquisitionTime="104000")
    block = ds.private_block(0x0009, "GEMS_PETD_01", create=True)
    block.add_new(0x0D, "DT", "20250301110000.00")
    scale = suv_scale(_round_trip(tmp_path, [ds]))
    assert scale.scan_time == parse_dt("20250301110000")
    assert scale.factors[0] == pytest.approx(2.960750e-4, rel=1e-6)
    assert "GE private" in scale.method


def test_acquisition_after_midnight(tmp_path: Path) -> None:
    # Injected 23:20 on 1 March, scanned 00:00 on 2 March: 40 min of decay, once with the
    # start date-time, once with only a start time (the scan's day would put the injection
    # after the scan: the day before is meant).
    with_dt = _pet(0, SeriesDate="20250302", SeriesTime="000000", AcquisitionDate="20250302",
                   AcquisitionTime="000000", info_RadiopharmaceuticalStartDateTime="20250301232000",
                   info_RadiopharmaceuticalStartTime="232000")
    time_only = _pet(0, SeriesDate="20250302", SeriesTime="000000", AcquisitionDate="20250302",
                     AcquisitionTime="000000", info_RadiopharmaceuticalStartDateTime=None,
                     info_RadiopharmaceuticalStartTime="232000")
    expected = 75000 / (370e6 * 0.7767927886)
    for ds in (with_dt, time_only):
        scale = suv_scale(_round_trip(tmp_path, [ds]))
        assert scale.injection_time == parse_dt("20250301232000")
        assert scale.factors[0] == pytest.approx(expected, rel=1e-6)


def test_decay_correction_admin_uses_the_injected_dose(tmp_path: Path) -> None:
    scale = suv_scale(_round_trip(tmp_path, [_pet(0, DecayCorrection="ADMIN")]))
    assert scale.factors[0] == pytest.approx(75000 / 370e6, rel=1e-9)


def test_units_gml_is_suv_already(tmp_path: Path) -> None:
    scale = suv_scale(_round_trip(tmp_path, [_pet(0, Units="GML", PatientWeight=None)]))
    assert scale.factors == (1.0,)


def test_philips_cnts_suv_scale_factor_per_slice(tmp_path: Path) -> None:
    headers = []
    for k, factor in enumerate((0.000512, 0.000498)):
        ds = _pet(k, Units="CNTS")
        ds.private_block(0x7053, "Philips PET Private Group", create=True).add_new(
            0x00, "DS", f"{factor}")
        headers.append(ds)
    scale = suv_scale(_round_trip(tmp_path, headers))
    assert scale.factors == pytest.approx((0.000512, 0.000498))
    assert "7053,1000" in scale.method


def test_philips_cnts_activity_concentration_factor(tmp_path: Path) -> None:
    ds = _pet(0, Units="CNTS")
    ds.private_block(0x7053, "Philips PET Private Group", create=True).add_new(
        0x09, "DS", "2.5")
    scale = suv_scale(_round_trip(tmp_path, [ds]))
    assert scale.factors[0] == pytest.approx(2.5 * 2.960750e-4, rel=1e-6)


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: _pet(0, PatientWeight=None), "PatientWeight"),
    (lambda: _pet(0, PatientWeight=0.0), "PatientWeight"),
    (lambda: _pet(0, Units="CNTS"), "CNTS without the Philips"),
    (lambda: _pet(0, Units="PROPCNTS"), "Units PROPCNTS"),
    (lambda: _pet(0, CorrectedImage=["ATTN", "SCAT"]), "lacks DECY"),
    (lambda: _pet(0, CorrectedImage=["DECY"]), "lacks ATTN"),
    (lambda: _pet(0, DecayCorrection="NONE"), "DecayCorrection NONE"),
    (lambda: _pet(0, info_RadionuclideTotalDose=None), "RadionuclideTotalDose"),
    (lambda: _pet(0, info_RadionuclideHalfLife=None), "RadionuclideHalfLife"),
    (lambda: _pet(0, info_RadiopharmaceuticalStartDateTime=None,
                  info_RadiopharmaceuticalStartTime=None), "RadiopharmaceuticalStart"),
    (lambda: _pet(0, info_RadiopharmaceuticalStartDateTime="20250228100000"), "outside 0-24 h"),
])
def test_refusals_name_what_is_missing(tmp_path: Path, make: Callable[[], Dataset],
                                       reason: str) -> None:
    with pytest.raises(SuvRefused, match=reason):
        suv_scale(_round_trip(tmp_path, [make()]))
