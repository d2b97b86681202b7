"""Body-weight SUV from a PET series' headers, by the vendor-neutral decision tree.

The rules are those of the QIBA "Vendor-neutral pseudo-code for SUV calculation"
(Kinahan, Fletcher et al., QIBA FDG-PET/CT profile wiki, 2012-2019) and PS3.3 C.8.9:

1. ``CorrectedImage`` must contain ``ATTN`` and ``DECY`` (else: refused, the values are
   not quantitative uptake).
2. ``Units``:

   - ``BQML``: activity concentration; ``DecayCorrection`` must be ``START`` (decayed to the
     scan start: the dose is decayed from injection to the scan start) or ``ADMIN``
     (already decayed to the injection: the dose is used as injected). ``NONE`` and
     anything else are refused.
   - ``CNTS``: only with the Philips private SUV scale factor (7053,1000) of the private
     creator ``Philips PET Private Group``, which maps the rescaled counts to SUVbw; or its
     activity concentration scale factor (7053,1009), which maps them to Bq/mL (then as
     BQML). Without either: refused.
   - ``GML``: already SUVbw (factor 1).
   - anything else (``PROPCNTS``, ``CM2``, ``PCNT``, ...): refused.

3. Scan time (for ``START``): the SeriesDate/SeriesTime when it is not after the earliest
   AcquisitionDate/AcquisitionTime of the series; otherwise (a series re-created after
   the scan) the GE private scan date-time (0009,100D) of ``GEMS_PETD_01`` when present,
   else the earliest acquisition date-time of the series' instances.
4. Injection: RadiopharmaceuticalStartDateTime; else RadiopharmaceuticalStartTime on the
   scan's date, a day earlier when that would put the injection after the scan (the
   acquisition-after-midnight case).
5. ``SUV = value [Bq/mL] * weight [g] / (dose [Bq] * 2 ** (-(scan - injection) / T1/2))``,
   with PatientWeight (kg), RadionuclideTotalDose and RadionuclideHalfLife of the first
   RadiopharmaceuticalInformationSequence item; a missing or non-positive one is refused.

:func:`suv_scale` returns one factor per instance (the Philips factors may differ per
slice) that multiplies the *rescaled* pixel values (``stored * RescaleSlope +
RescaleIntercept``), and says how it got them; :class:`SuvRefused` names what is missing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydicom import Dataset

PHILIPS_CREATOR = "Philips PET Private Group"
GE_CREATOR = "GEMS_PETD_01"
#: Refuse a decay time (scan - injection) outside this range, in hours: a wrong date.
MAX_UPTAKE_TIME_H = 24.0


class SuvRefused(ValueError):
    """The headers do not allow an SUV; the message says what is missing or wrong."""


@dataclass(frozen=True)
class SuvScale:
    """Per-instance factors (rescaled value -> SUVbw) and how they were derived."""

    factors: tuple[float, ...]
    units: str
    method: str
    scan_time: datetime | None = None
    injection_time: datetime | None = None
    decayed_dose_bq: float | None = None
    weight_kg: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {"units": self.units, "method": self.method,
                "factor_min": min(self.factors), "factor_max": max(self.factors),
                "scan_time": self.scan_time.isoformat() if self.scan_time else None,
                "injection_time": (self.injection_time.isoformat()
                                   if self.injection_time else None),
                "decayed_dose_bq": self.decayed_dose_bq, "weight_kg": self.weight_kg}


# --- DICOM date and time --------------------------------------------------------------------


def parse_dt(date: object, time: object = None) -> datetime | None:
    """A DA + TM pair (or one DT string in ``date``) as a naive datetime; None if absent or
    unreadable. Fractions of a second are kept; a UTC offset in a DT is ignored (all the
    times compared here come from one scanner clock)."""
    text = str(date or "").strip()
    if time is not None:
        clock = str(time or "").strip()
        if not text or not clock:
            return None
        text = text[:8] + clock.replace(":", "")
    text = text.split("+")[0].split("-")[0] if len(text) > 8 else text
    if not text[:8].isdigit() or len(text) < 8:
        return None
    whole, _, fraction = text.partition(".")
    whole = (whole + "000000")[:14] if len(whole) >= 8 else whole
    try:
        value = datetime.strptime(whole, "%Y%m%d%H%M%S")
    except ValueError:
        return None
    if fraction.isdigit():
        value += timedelta(microseconds=round(float("0." + fraction) * 1e6))
    return value


def _tm_seconds(time: object) -> float | None:
    if not str(time or "").strip():
        return None
    parsed = parse_dt("19700101", time)
    if parsed is None:
        return None
    return (parsed - datetime(1970, 1, 1)).total_seconds()


def _private(ds: Dataset, group: int, creator: str, element: int) -> object | None:
    try:
        block = ds.private_block(group, creator)
    except KeyError:
        return None
    try:
        value: object = block[element].value
        return value
    except KeyError:
        return None


def _float(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# --- the decision tree ----------------------------------------------------------------------


def suv_scale(headers: Sequence[Dataset]) -> SuvScale:
    """SUVbw factors of one PET series' instances (see the module docstring).

    Raises :class:`SuvRefused` with the reason where the headers do not allow it."""
    if not headers:
        raise SuvRefused("PET series has no instances")
    first = headers[0]
    if str(first.get("Modality", "")) != "PT":
        raise SuvRefused(f"Modality is {first.get('Modality', '')!r}, not PT")
    corrected = {str(v).upper() for v in (first.get("CorrectedImage") or [])}
    missing = [c for c in ("ATTN", "DECY") if c not in corrected]
    if missing:
        raise SuvRefused(f"CorrectedImage lacks {'/'.join(missing)} "
                         f"({'/'.join(sorted(corrected)) or 'empty'}): not quantitative")
    units = str(first.get("Units", "")).strip().upper()
    if units == "GML":
        return SuvScale(factors=(1.0,) * len(headers), units=units,
                        method="Units GML: values are SUVbw already")
    if units == "CNTS":
        factors = [_float(_private(ds, 0x7053, PHILIPS_CREATOR, 0x00)) for ds in headers]
        if all(f is not None and f > 0 for f in factors):
            return SuvScale(factors=tuple(float(f) for f in factors  # type: ignore[arg-type]
                                          ), units=units,
                            method="Units CNTS: Philips private SUV scale factor (7053,1000)")
        bqml = [_float(_private(ds, 0x7053, PHILIPS_CREATOR, 0x09)) for ds in headers]
        if not all(f is not None and f > 0 for f in bqml):
            raise SuvRefused("Units CNTS without the Philips SUV scale factor (7053,1000) or "
                             "activity concentration scale factor (7053,1009)")
        body = _bqml_scale(headers)
        return SuvScale(
            factors=tuple(b * f for b, f in zip(bqml, body.factors, strict=True)  # type: ignore[operator]
                          ), units=units,
            method="Units CNTS: Philips activity concentration scale factor (7053,1009) "
                   "to Bq/mL, then " + body.method,
            scan_time=body.scan_time, injection_time=body.injection_time,
            decayed_dose_bq=body.decayed_dose_bq, weight_kg=body.weight_kg)
    if units != "BQML":
        raise SuvRefused(f"Units {units or '(empty)'}: SUVbw needs BQML, CNTS with Philips "
                         "scale factors, or GML")
    return _bqml_scale(headers)


def _bqml_scale(headers: Sequence[Dataset]) -> SuvScale:
    first = headers[0]
    weight = _float(first.get("PatientWeight"))
    if weight is None or weight <= 0:
        raise SuvRefused("PatientWeight missing or not positive: body-weight SUV needs it")
    info_seq = first.get("RadiopharmaceuticalInformationSequence") or []
    if not info_seq:
        raise SuvRefused("RadiopharmaceuticalInformationSequence missing")
    info = info_seq[0]
    dose = _float(info.get("RadionuclideTotalDose"))
    if dose is None or dose <= 0:
        raise SuvRefused("RadionuclideTotalDose missing or not positive")
    decay = str(first.get("DecayCorrection", "")).strip().upper()
    if decay == "ADMIN":
        return SuvScale(factors=(weight * 1000.0 / dose,) * len(headers), units="BQML",
                        method="DecayCorrection ADMIN: injected dose, no decay",
                        decayed_dose_bq=dose, weight_kg=weight)
    if decay != "START":
        raise SuvRefused(f"DecayCorrection {decay or '(empty)'}: SUV needs START or ADMIN")
    half_life = _float(info.get("RadionuclideHalfLife"))
    if half_life is None or half_life <= 0:
        raise SuvRefused("RadionuclideHalfLife missing or not positive")
    scan, how = scan_time(headers)
    injection = injection_time(info, scan)
    if injection is None:
        raise SuvRefused("RadiopharmaceuticalStartDateTime and RadiopharmaceuticalStartTime "
                         "missing or unreadable")
    decay_s = (scan - injection).total_seconds()
    if not 0.0 <= decay_s <= MAX_UPTAKE_TIME_H * 3600.0:
        raise SuvRefused(f"injection {injection.isoformat()} to scan {scan.isoformat()} is "
                         f"{decay_s / 3600.0:.2f} h: outside 0-{MAX_UPTAKE_TIME_H:g} h")
    decayed = dose * 2.0 ** (-decay_s / half_life)
    return SuvScale(factors=(weight * 1000.0 / decayed,) * len(headers), units="BQML",
                    method=f"DecayCorrection START, scan time from {how}",
                    scan_time=scan, injection_time=injection, decayed_dose_bq=decayed,
                    weight_kg=weight)


def scan_time(headers: Sequence[Dataset]) -> tuple[datetime, str]:
    """The scan start the dose is decayed to, and which attribute gave it (rule 3)."""
    first = headers[0]
    series = parse_dt(first.get("SeriesDate"), first.get("SeriesTime"))
    acquisitions = [t for t in (parse_dt(ds.get("AcquisitionDate") or ds.get("SeriesDate"),
                                         ds.get("AcquisitionTime")) for ds in headers)
                    if t is not None]
    earliest = min(acquisitions) if acquisitions else None
    if series is not None and (earliest is None or series <= earliest):
        return series, "SeriesDate/SeriesTime"
    ge = parse_dt(_private(first, 0x0009, GE_CREATOR, 0x0D))
    if ge is not None:
        return ge, "the GE private scan date-time (0009,100D)"
    if earliest is not None:
        return earliest, "the earliest AcquisitionDate/AcquisitionTime (series time is later)"
    raise SuvRefused("no SeriesDate/SeriesTime or AcquisitionDate/AcquisitionTime")


def injection_time(info: Dataset, scan: datetime) -> datetime | None:
    """RadiopharmaceuticalStartDateTime, else the StartTime on the scan's date or the day
    before when the injection would otherwise follow the scan (rule 4)."""
    full = parse_dt(info.get("RadiopharmaceuticalStartDateTime"))
    if full is not None:
        return full
    seconds = _tm_seconds(info.get("RadiopharmaceuticalStartTime"))
    if seconds is None:
        return None
    day = datetime(scan.year, scan.month, scan.day)
    injection = day + timedelta(seconds=seconds)
    if injection > scan:
        injection -= timedelta(days=1)
    return injection
