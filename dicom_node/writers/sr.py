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

A second SR (:func:`make_image_sr`, its own series) carries the same numbers anchored on
images, for viewers that show only image-region measurements (OHIF 3.13 lists TID 1500
groups only when they have an SCOORD on a referenced image; pixelmed's validator does
not accept TID 1410 and TID 1411 groups in one report, hence two objects):

- Per lesion a planar ROI measurement group (TID 1410): the lesion's outline on the
  slice of its TBRmax as a closed POLYLINE (SCOORD in image pixel coordinates, column
  then row, pixel centres at +0.5) selected from that source T1C instance; TBRmax and
  TBRmean as concepts of their own ("TBRmax", "TBRmean": a viewer labels a value with
  the concept's meaning only) with their derivations, the lesion volume (whole VOI) and,
  when measured, the interval limits; the same tracking identifier and UID as the
  lesion's group in the volumetric SR.
- The background mean uptake is not repeated there (it has no single slice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID

from dicom_node.analysis.tbr import Lesion, TbrResult
from dicom_node.analysis.uncertainty import TbrInterval
from dicom_node.writers.provenance import (
    IHE_SCHEME,
    OUTPUT_CHARACTER_SET,
    PRIVATE_SCHEME,
    Provenance,
    coding_schemes,
    series_description,
    stamp_series_date,
)
from dicom_node.writers.seg import BACKGROUND_SEGMENT, lesion_segment_number
from dicom_node.writers.uids import tracking_uid

# Distinct in their first 20 characters from the SEG's and each other's (viewers
# truncate them).
SERIES_DESCRIPTION = "TBR REPORT (SR) - SYNTHETIC PET, NOT FOR DIAGNOSTIC USE"
IMAGE_SERIES_DESCRIPTION = "TBR ON T1C SLICES (SR) - SYNTHETIC PET, NOT FOR DIAGNOSTIC USE"
SYNTHETIC_STATEMENT = "Values measured on synthetic (AI-generated) PET uptake"

TBR = hd.sr.CodedConcept("TBR", PRIVATE_SCHEME, "Tumor-to-background ratio")
BACKGROUND_UPTAKE = hd.sr.CodedConcept("BGUPTAKE", PRIVATE_SCHEME,
                                       "Background mean synthetic uptake")
SYNTHETIC_METHOD = hd.sr.CodedConcept("SYNTHPET", PRIVATE_SCHEME,
                                      "Measured on synthetic PET uptake from Pix2Pix")
#: The image-anchored SR's names for the two ratios (a viewer shows the concept's meaning
#: and not its derivation, so "Tumor-to-background ratio" twice would not tell them apart).
TBR_MAX = hd.sr.CodedConcept("TBRMAX", PRIVATE_SCHEME, "TBRmax")
TBR_MEAN = hd.sr.CodedConcept("TBRMEAN", PRIVATE_SCHEME, "TBRmean")
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


#: Procedure Reported when the source names no procedure code: the CID 100 concept for
#: the MR the node analysed (the PET is synthetic, no PET procedure took place).
MRI_PROCEDURE = hd.sr.CodedConcept("25056-3", "LN", "MRI unspecified body region")


def procedure_reported(source: Dataset) -> hd.sr.CodedConcept:
    """The imaging procedure the results are about (IHE AIR: "Procedure Reported" names
    the imaging procedure): the source's Procedure Code Sequence (0008,1032) or Requested
    Procedure Code Sequence (0032,1064) when it has a complete code, else
    :data:`MRI_PROCEDURE`."""
    for keyword in ("ProcedureCodeSequence", "RequestedProcedureCodeSequence"):
        for item in source.get(keyword, []):
            value, scheme = item.get("CodeValue"), item.get("CodingSchemeDesignator")
            meaning = item.get("CodeMeaning")
            if value and scheme and meaning:
                return hd.sr.CodedConcept(str(value), str(scheme), str(meaning)[:64])
    return MRI_PROCEDURE


def region_tracking_uid(source: Dataset, region: str) -> UID:
    """The tracking UID of a region ("lesion-<n>", "background") of the source series
    (:func:`dicom_node.writers.uids.tracking_uid`), as the SEG writes it too."""
    return tracking_uid(str(source.StudyInstanceUID), str(source.SeriesInstanceUID), region)


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
                      algorithm: hd.sr.AlgorithmIdentification,
                      names: tuple[hd.sr.CodedConcept, hd.sr.CodedConcept] = (TBR, TBR)
                      ) -> list[hd.sr.Measurement]:
    def num(concept: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept = UNIT_RATIO,
            derivation: Code | None = None) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=concept, value=round(value, 4), unit=unit,
                                 derivation=derivation, method=SYNTHETIC_METHOD,
                                 algorithm_id=algorithm)

    items = [num(names[0], lesion.tbr_max, derivation=codes.SCT.Maximum),
             num(names[1], lesion.tbr_mean, derivation=codes.SCT.Mean),
             num(codes.SCT.Volume, lesion.volume_ml, UNIT_ML)]
    if interval is not None:
        # the concepts' keys are TbrInterval's field names
        items += [num(concept, getattr(interval, key))
                  for key, concept in INTERVAL_CONCEPTS.items()]
    return items


class _LesionGroups:
    """What a lesion's measurement group says in either SR (volumetric, TID 1411, and
    image-anchored, TID 1410): its tracking identifier and UID, and its measurements."""

    def __init__(self, source: Dataset, provenance: Provenance, result: TbrResult,
                 intervals: Sequence[TbrInterval], interval_method: str) -> None:
        self.source = source
        self.algorithm = _algorithm(provenance, result, interval_method)
        self.by_lesion = {interval.lesion: interval for interval in intervals}

    def tracking(self, lesion: Lesion) -> hd.sr.TrackingIdentifier:
        interval = self.by_lesion.get(lesion.number)
        equivocal = interval is not None and interval.equivocal
        return hd.sr.TrackingIdentifier(
            uid=region_tracking_uid(self.source, f"lesion-{lesion.number}"),
            identifier=f"Lesion {lesion.number}" + (EQUIVOCAL_MARK if equivocal else ""))

    def measurements(self, lesion: Lesion, names: tuple[hd.sr.CodedConcept,
                                                        hd.sr.CodedConcept] = (TBR, TBR)
                     ) -> list[hd.sr.Measurement]:
        return _tbr_measurements(lesion, self.by_lesion.get(lesion.number), self.algorithm,
                                 names)


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
    lesions = _LesionGroups(source_datasets[0], provenance, result, intervals,
                            interval_method)
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = []
    for lesion in result.lesions:
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=lesions.tracking(lesion),
            referenced_segment=_segment_ref(seg, lesion_segment_number(lesion.number)),
            finding_type=codes.SCT.Neoplasm,
            measurements=lesions.measurements(lesion),
        ))
    background_label = ("TBR background" if result.lesions
                        else f"TBR background; {result.finding}")
    algorithm = lesions.algorithm
    groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=region_tracking_uid(source_datasets[0], "background"),
            identifier=background_label),
        referenced_segment=_segment_ref(seg, BACKGROUND_SEGMENT),
        finding_type=codes.SCT.Brain,
        measurements=[hd.sr.Measurement(name=BACKGROUND_UPTAKE,
                                        value=round(result.background_mean, 4),
                                        unit=UNIT_RATIO, derivation=codes.SCT.Mean,
                                        method=SYNTHETIC_METHOD, algorithm_id=algorithm)],
    ))
    return _report([*source_datasets, seg], groups, series_uid, sop_uid, series_number,
                   provenance, supersedes, series_description(SERIES_DESCRIPTION,
                                                              description_suffix))


def device_observer(provenance: Provenance) -> hd.sr.ObserverContext:
    """The observer device of a report or a KOS (TID 1004): the algorithm as its
    Contributing Equipment item names it (the same Device UID, manufacturer and model
    name), run by the node ("dicom-node")."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=provenance.device_uid, name="dicom-node",
            manufacturer_name=provenance.manufacturer, model_name=provenance.model_name[:64]))


def _report(evidence: list[Dataset],
            groups: Sequence[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
                             | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations],
            series_uid: str, sop_uid: str, series_number: int, provenance: Provenance,
            supersedes: list[Dataset] | None, description: str) -> Dataset:
    """The TID 1500 document around the measurement groups, observed by the algorithm
    (:func:`device_observer`).

    highdicom's document constructor deep-copies the content tree, parses it back into
    its own item classes and searches all of it for references: with 18 lesions that was
    more than half of the time both reports took (docs/performance.md, "Tenth round"). The
    document is therefore built around the report's root without its Imaging Measurements
    container (:func:`_root_without_measurements`), and the full content is attached
    after; every instance the groups reference is checked against the evidence here.
    ``tests/test_reports.py`` checks that the result equals highdicom's own assembly."""
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=device_observer(provenance)),
        procedure_reported=procedure_reported(evidence[0]),
        imaging_measurements=list(groups),
    )
    _check_references(groups, evidence)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=_root_without_measurements(report[0]),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=provenance.manufacturer,
        is_complete=True,
        previous_versions=supersedes or None,
        contributing_equipment=provenance.contributing_equipment(),
        specific_character_set=OUTPUT_CHARACTER_SET,
    )
    # The dataset now holds the whole tree; highdicom's parsed view of it (``sr.content``)
    # keeps the root without the groups. Nothing reads that view: read_tbr_report and every
    # peer read the dataset.
    sr.ContentSequence = report[0].ContentSequence
    sr.SeriesDescription = description
    stamp_series_date(sr)
    sr.CodingSchemeIdentificationSequence = coding_schemes(PRIVATE_SCHEME, IHE_SCHEME)
    return sr


#: Concept name of TID 1500's "Imaging Measurements" container (DCM 126010).
IMAGING_MEASUREMENTS = codes.DCM.ImagingMeasurements.value


def _root_without_measurements(root: Dataset) -> Dataset:
    """A shallow copy of the report's root content item whose ContentSequence lacks the
    Imaging Measurements container (what highdicom's constructor copies and searches)."""
    light = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            light.add(element)
    light.ContentSequence = [item for item in root.ContentSequence
                             if _concept(item) != IMAGING_MEASUREMENTS]
    return light


def _check_references(groups: Sequence[Sequence[Dataset]], evidence: Sequence[Dataset]
                      ) -> None:
    """Every SOP instance a measurement group references (its segment's SEG, its region's
    image) is among the evidence: the check highdicom's constructor makes on the whole
    tree, made on the groups' own reference items."""
    known = {str(ds.SOPInstanceUID) for ds in evidence}
    for group in groups:
        for item in group[0].ContentSequence:
            for ref in _references(item):
                if ref not in known:
                    raise ValueError(f"the report references {ref}, which is not evidence")


def _references(item: Dataset) -> list[str]:
    out = [str(ref.ReferencedSOPInstanceUID) for ref in item.get("ReferencedSOPSequence", [])]
    for child in item.get("ContentSequence", []):
        if child.ValueType in ("IMAGE", "COMPOSITE", "SCOORD"):
            out += _references(child)
    return out


#: Fewest points of an outline (closing point included): OHIF 3.13 takes a closed
#: POLYLINE of 4 or 5 points for a rectangle, so smaller outlines are densified.
MIN_OUTLINE_POINTS = 7


def tbr_max_slice(lesion: Lesion) -> int:
    """The slice (index into the volume) of the lesion's TBRmax; the slice of its largest
    cross-section if the peak is not recorded inside the lesion."""
    z, y, x = lesion.peak_index
    if 0 <= z < lesion.mask.shape[0] and lesion.mask[z, y, x]:
        return int(z)
    return int(np.argmax(lesion.mask.sum(axis=(1, 2))))


def lesion_outline(mask: NDArray[np.bool_]) -> NDArray[np.float32]:
    """The outline of a 2-D region as a closed polygon of (column, row) image coordinates
    (PS3.3 C.18.6.1.1: the top left corner of the first pixel is 0,0, its centre 0.5,0.5):
    the longest boundary of the region, running between the centres of its edge pixels
    and their outside neighbours."""
    from skimage.measure import approximate_polygon, find_contours

    contours = find_contours(np.pad(mask, 1).astype(np.float32), 0.5)
    if not contours:
        raise ValueError("the lesion has no voxel on its TBRmax slice")
    contour = approximate_polygon(max(contours, key=len), tolerance=0.25)
    points = contour[:, ::-1] - 1.0 + 0.5  # (row, col) -> (col, row); undo the padding
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    while len(points) < MIN_OUTLINE_POINTS:  # edge midpoints between the vertices
        mids = (points[:-1] + points[1:]) / 2
        dense = np.empty((2 * len(points) - 1, 2))
        dense[0::2], dense[1::2] = points, mids
        points = dense
    outline: NDArray[np.float32] = points.astype(np.float32)
    return outline


def make_image_sr(
    source_datasets: list[Dataset],
    result: TbrResult,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    provenance: Provenance,
    supersedes: list[Dataset] | None = None,
    intervals: Sequence[TbrInterval] = (),
    interval_method: str = "",
    description_suffix: str = "",
) -> Dataset | None:
    """The image-anchored TBR report: per lesion its outline on its TBRmax slice with
    TBRmax, TBRmean and volume (TID 1410). None when there is no lesion to show. Each
    lesion has the tracking identifier and UID it has in the volumetric SR and the SEG,
    so a viewer can tie the two together."""
    if not result.lesions:
        return None
    lesions = _LesionGroups(source_datasets[0], provenance, result, intervals,
                            interval_method)
    groups: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    for lesion in result.lesions:
        z = tbr_max_slice(lesion)
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=lesion_outline(lesion.mask[z]),
            source_image=hd.sr.SourceImageForRegion.from_source_image(source_datasets[z]))
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=lesions.tracking(lesion),
            referenced_region=region,
            finding_type=codes.SCT.Neoplasm,
            measurements=lesions.measurements(lesion, (TBR_MAX, TBR_MEAN)),
        ))
    return _report(list(source_datasets), groups, series_uid, sop_uid, series_number,
                   provenance, supersedes, series_description(IMAGE_SERIES_DESCRIPTION,
                                                              description_suffix))


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
    """Walk the TID 1500 tree: per measurement group its TBRmax, TBRmean, volume (either
    report: the volumetric one or the image-anchored one)."""
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
                    if concept in (TBR.value, TBR_MAX.value, TBR_MEAN.value) and key:
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
