"""The TBR report: a Comprehensive 3D SR following TID 1500 (Measurement Report).

Layout (see docs/conformance-statement.md for the full tree):

- Observation context: the node as observer device.
- Per lesion: a volumetric ROI measurement group (TID 1411) referencing its SEG
  segment, with TBRmax (derivation Maximum) and TBRmean (derivation Mean), unit
  UCUM "1", the biological tumour volume in mL, and the algorithm identification
  (model name, version, parameters: weights sha256, threshold, method, the
  statement that the values were measured on synthetic uptake). With an interval
  (:mod:`dicom_node.analysis.uncertainty`), the group also holds the interval's limits and the
  model's sampling SD of TBRmax and TBRmean as measurements of their own (private
  concepts, e.g. "TBRmax interval lower limit"; TID 310's uncertainty ranges would be
  the natural home, but pixelmed's validator does not accept them under TID 1419), the
  algorithm's parameters name the interval's method and level, and a lesion whose
  TBRmax interval reaches below the threshold is "Lesion N (equivocal)" in its tracking
  identifier (a qualitative evaluation item is not accepted there by pixelmed either).
- The background group: referencing the background segment, with its mean uptake.
- No lesion above threshold: the background group's tracking identifier says so.

Concepts without a standard code use the private scheme 99DCMNODE, declared in
CodingSchemeIdentificationSequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID

from dicom_node.analysis.tbr import Lesion, TbrResult
from dicom_node.analysis.uncertainty import TbrInterval
from dicom_node.net.identity import IMPLEMENTATION_CLASS_UID
from dicom_node.writers.provenance import (
    OUTPUT_CHARACTER_SET,
    PRIVATE_SCHEME,
    PRIVATE_SCHEME_NAME,
    PRIVATE_SCHEME_ORG,
    Provenance,
    series_description,
    stamp_series_date,
)
from dicom_node.writers.seg import BACKGROUND_SEGMENT, lesion_segment_number
from dicom_node.writers.uids import hashed_uid

# Distinct in their first 20 characters from the SEG's (viewers truncate them).
SERIES_DESCRIPTION = "TBR REPORT (SR) - SYNTHETIC PET, NOT FOR DIAGNOSTIC USE"
SYNTHETIC_STATEMENT = "Values measured on synthetic (AI-generated) PET uptake"

TBR = hd.sr.CodedConcept("TBR", PRIVATE_SCHEME, "Tumor-to-background ratio")
BACKGROUND_UPTAKE = hd.sr.CodedConcept("BGUPTAKE", PRIVATE_SCHEME,
                                       "Background mean synthetic uptake")
SYNTHETIC_METHOD = hd.sr.CodedConcept("SYNTHPET", PRIVATE_SCHEME,
                                      "Measured on synthetic PET uptake from Pix2Pix")
UNIT_RATIO = hd.sr.CodedConcept("1", "UCUM", "no units")
UNIT_ML = hd.sr.CodedConcept("mL", "UCUM", "milliliter")
#: Each lesion's interval (dicom_node/analysis/uncertainty.py), as measurements of their own,
#: keyed by the TbrInterval field each one carries.
INTERVAL_CONCEPTS = {
    "tbr_max_low": hd.sr.CodedConcept("TBRMAXLO", PRIVATE_SCHEME, "TBRmax interval lower limit"),
    "tbr_max_high": hd.sr.CodedConcept("TBRMAXHI", PRIVATE_SCHEME, "TBRmax interval upper limit"),
    "tbr_mean_low": hd.sr.CodedConcept("TBRMEANLO", PRIVATE_SCHEME,
                                       "TBRmean interval lower limit"),
    "tbr_mean_high": hd.sr.CodedConcept("TBRMEANHI", PRIVATE_SCHEME,
                                        "TBRmean interval upper limit"),
    "sd_model_tbr_max": hd.sr.CodedConcept("TBRMAXSD", PRIVATE_SCHEME,
                                           "TBRmax SD over model samples"),
    "sd_model_tbr_mean": hd.sr.CodedConcept("TBRMEANSD", PRIVATE_SCHEME,
                                            "TBRmean SD over model samples"),
}
EQUIVOCAL_MARK = " (equivocal)"


def _content_uid(sop_uid: str, label: str) -> UID:
    """Deterministic UIDs inside the report, so a re-run writes the same object."""
    return hashed_uid(sop_uid, label)


def _algorithm(provenance: Provenance, result: TbrResult, interval_method: str = ""
               ) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=provenance.model_name[:64],
        version=provenance.model_version[:64],
        parameters=[
            f"weights sha256 {provenance.weights_sha256}",
            f"threshold {result.threshold:g} x background mean",
            f"minimum lesion volume {result.min_lesion_volume_ml:g} mL",
            f"method: {result.method}",
            *([f"interval: {interval_method}"] if interval_method else []),
            SYNTHETIC_STATEMENT,
        ],
    )


def _segment_ref(seg: Dataset, number: int) -> hd.sr.ReferencedSegment:
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(
            str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)))


def _tbr_measurements(lesion: Lesion, interval: TbrInterval | None,
                      algorithm: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    def num(concept: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept = UNIT_RATIO,
            derivation: Code | None = None) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=concept, value=round(value, 4), unit=unit,
                                 derivation=derivation, method=SYNTHETIC_METHOD,
                                 algorithm_id=algorithm)

    items = [num(TBR, lesion.tbr_max, derivation=codes.SCT.Maximum),
             num(TBR, lesion.tbr_mean, derivation=codes.SCT.Mean),
             num(codes.SCT.Volume, lesion.volume_ml, UNIT_ML)]
    if interval is not None:
        # the concepts' keys are TbrInterval's field names
        items += [num(concept, getattr(interval, key))
                  for key, concept in INTERVAL_CONCEPTS.items()]
    return items


def make_sr(
    source_datasets: list[Dataset],
    seg: Dataset,
    result: TbrResult,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    provenance: Provenance,
    supersedes: list[Dataset] | None = None,
    intervals: Sequence[TbrInterval] = (),
    interval_method: str = "",
    description_suffix: str = "",
) -> Dataset:
    algorithm = _algorithm(provenance, result, interval_method)
    by_lesion = {interval.lesion: interval for interval in intervals}
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = []
    for lesion in result.lesions:
        interval = by_lesion.get(lesion.number)
        equivocal = interval is not None and interval.equivocal
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=_content_uid(sop_uid, f"lesion-{lesion.number}"),
                identifier=f"Lesion {lesion.number}" + (EQUIVOCAL_MARK if equivocal else "")),
            referenced_segment=_segment_ref(seg, lesion_segment_number(lesion.number)),
            finding_type=codes.SCT.Neoplasm,
            measurements=_tbr_measurements(lesion, interval, algorithm),
        ))
    background_label = ("TBR background" if result.lesions
                        else f"TBR background; {result.finding}")
    groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_content_uid(sop_uid, "background"),
                                                     identifier=background_label),
        referenced_segment=_segment_ref(seg, BACKGROUND_SEGMENT),
        finding_type=codes.SCT.Brain,
        measurements=[hd.sr.Measurement(name=BACKGROUND_UPTAKE,
                                        value=round(result.background_mean, 4),
                                        unit=UNIT_RATIO, derivation=codes.SCT.Mean,
                                        method=SYNTHETIC_METHOD, algorithm_id=algorithm)],
    ))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=IMPLEMENTATION_CLASS_UID, name="dicom-node", manufacturer_name=provenance.manufacturer,
            model_name=provenance.model_name[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept("44139-4", "LN", "PET scan"),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source_datasets, seg],
        content=report,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=provenance.manufacturer,
        is_complete=True,
        previous_versions=supersedes or None,
        contributing_equipment=[provenance.contributing_equipment()],
        specific_character_set=OUTPUT_CHARACTER_SET,
    )
    sr.SeriesDescription = series_description(SERIES_DESCRIPTION, description_suffix)
    stamp_series_date(sr)
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = PRIVATE_SCHEME_NAME
    scheme.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_ORG
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


@dataclass(frozen=True)
class TbrReport:
    """The numbers a TBR SR carries, read back from the SR itself."""

    background_mean: float
    lesions: list[dict[str, float]]


INTERVAL_KEYS = {concept.value: key for key, concept in INTERVAL_CONCEPTS.items()}


def _items(ds: Dataset) -> list[Dataset]:
    return list(ds.get("ContentSequence", []))


def _concept(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else ""


def read_tbr_report(sr: Dataset) -> TbrReport:
    """Walk the TID 1500 tree: per measurement group its TBRmax, TBRmean, volume."""
    background = float("nan")
    lesions: list[dict[str, float]] = []

    def visit(node: Dataset) -> None:
        nonlocal background
        for item in _items(node):
            if item.ValueType == "CONTAINER" and _concept(item) == "125007":
                group: dict[str, float] = {}
                label = ""
                for child in _items(item):
                    if child.ValueType == "TEXT" and _concept(child) == "112039":
                        label = str(child.TextValue)
                    if child.ValueType != "NUM":
                        continue
                    value = float(child.MeasuredValueSequence[0].NumericValue)
                    derivation = next((str(m.ConceptCodeSequence[0].CodeValue)
                                       for m in _items(child) if _concept(m) == "121401"), "")
                    concept = _concept(child)
                    key = ("tbr_max" if derivation == codes.SCT.Maximum.value else
                           "tbr_mean" if derivation == codes.SCT.Mean.value else "")
                    if concept == TBR.value and key:
                        group[key] = value
                    elif concept in INTERVAL_KEYS:
                        group[INTERVAL_KEYS[concept]] = value
                    elif concept == codes.SCT.Volume.value:
                        group["volume_ml"] = value
                    elif concept == BACKGROUND_UPTAKE.value:
                        background = value
                if "tbr_max" in group and label.startswith("Lesion "):
                    group["lesion"] = float(label.split()[1])
                    group["equivocal"] = float(label.endswith(EQUIVOCAL_MARK))
                    lesions.append(group)
            else:
                visit(item)

    visit(sr)
    lesions.sort(key=lambda g: g["lesion"])
    return TbrReport(background_mean=background, lesions=lesions)
