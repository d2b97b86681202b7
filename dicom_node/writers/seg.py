"""DICOM Segmentation of the regions behind the TBR numbers.

Segment 1 is the background region; segments 2.. are the lesions in the order of
the SR (hottest first). The SEG references the source T1C images, so a viewer that
shows SEG overlays shows exactly where each number came from.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_node.analysis.tbr import TbrResult
from dicom_node.writers.provenance import (
    IHE_SCHEME,
    OUTPUT_CHARACTER_SET,
    Provenance,
    coding_schemes,
    series_description,
    stamp_series_date,
)
from dicom_node.writers.uids import tracking_uid

# Distinct in their first 20 characters from the SR's (viewers truncate them).
SERIES_DESCRIPTION = "TBR REGIONS (SEG) - SYNTHETIC PET, NOT FOR DIAGNOSTIC USE"
#: Recommended display colours: the background region muted (slate grey), lesions in a
#: cycle of distinct saturated colours, so a reader tells them apart on the T1C.
BACKGROUND_RGB = (112, 128, 144)
LESION_RGB = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
              (145, 30, 180), (70, 240, 240), (240, 50, 230))


def lesion_colour(number: int) -> hd.color.CIELabColor:
    return hd.color.CIELabColor.from_rgb(*LESION_RGB[(number - 1) % len(LESION_RGB)])


def lesion_label(number: int, tbr_max: float, threshold: float) -> str:
    """The segment label a viewer lists: the lesion's number and its TBRmax."""
    return f"Lesion {number}: TBRmax {tbr_max:.2f} (>= {threshold:g} x bg)"[:64]
BACKGROUND_SEGMENT = 1


def lesion_segment_number(lesion_number: int) -> int:
    return lesion_number + 1


def _algorithm(provenance: Provenance, threshold: float) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name="dicom-node TBR regions", family=codes.DCM.ArtificialIntelligence,
        version=provenance.model_version[:16],
        parameters={"threshold": f"{threshold:g}", "weights_sha256": provenance.weights_sha256})


def make_seg(
    source_datasets: list[Dataset],
    result: TbrResult,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    provenance: Provenance,
    description_suffix: str = "",
) -> Dataset:
    """A BINARY SEG (N slices x segments) over the source single-frame images."""
    algorithm = _algorithm(provenance, result.threshold)
    study_uid = str(source_datasets[0].StudyInstanceUID)
    source_series_uid = str(source_datasets[0].SeriesInstanceUID)
    # Label-map style (one segment number per voxel): the regions never overlap (the
    # background keeps a margin from every lesion), and highdicom then avoids a
    # (slices, rows, cols, segments) stack of about 170 MB for 14 lesions.
    labels = np.zeros(result.background_mask.shape, dtype=np.uint8 if len(result.lesions) < 255
                      else np.uint16)
    labels[result.background_mask] = BACKGROUND_SEGMENT
    descriptions = [hd.seg.SegmentDescription(
        segment_number=BACKGROUND_SEGMENT, segment_label="TBR background",
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Brain,
        algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
        tracking_id="TBR background",
        display_color=hd.color.CIELabColor.from_rgb(*BACKGROUND_RGB),
        tracking_uid=tracking_uid(study_uid, source_series_uid, "background"))]
    for lesion in result.lesions:
        np.copyto(labels, lesion_segment_number(lesion.number), where=lesion.mask)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=lesion_segment_number(lesion.number),
            segment_label=lesion_label(lesion.number, lesion.tbr_max, result.threshold),
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
            tracking_id=f"Lesion {lesion.number}",
            display_color=lesion_colour(lesion.number),
            tracking_uid=tracking_uid(study_uid, source_series_uid,
                                      f"lesion-{lesion.number}")))
    regions = [result.background_mask, *(lesion.mask for lesion in result.lesions)]
    if np.count_nonzero(labels) != sum(np.count_nonzero(mask) for mask in regions):
        raise ValueError("TBR regions overlap: cannot write them as one label map")
    seg = hd.seg.Segmentation(
        source_images=source_datasets,
        pixel_array=labels,
        segmentation_type="BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=provenance.manufacturer,
        manufacturer_model_name=provenance.model_name[:64],
        software_versions=provenance.software_versions,
        device_serial_number=provenance.weights_sha256[:16],
        content_label="TBR_REGIONS",
        content_description="Regions of the TBR measurement on synthetic PET",
        contributing_equipment=provenance.contributing_equipment(),
        specific_character_set=OUTPUT_CHARACTER_SET,
        omit_empty_frames=True,
    )
    seg.SeriesDescription = series_description(SERIES_DESCRIPTION, description_suffix)
    seg.CodingSchemeIdentificationSequence = coding_schemes(IHE_SCHEME)
    stamp_series_date(seg)
    return seg
