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
from dicom_node.writers.provenance import OUTPUT_CHARACTER_SET, Provenance, series_description
from dicom_node.writers.uids import hashed_uid

SERIES_DESCRIPTION = "SYNTHETIC PET TBR REGIONS - NOT FOR DIAGNOSTIC USE"
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
        tracking_uid=hashed_uid(str(sop_uid), "background"))]
    for lesion in result.lesions:
        np.copyto(labels, lesion_segment_number(lesion.number), where=lesion.mask)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=lesion_segment_number(lesion.number),
            segment_label=f"Lesion {lesion.number} (uptake >= {result.threshold:g} x background)",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
            tracking_id=f"Lesion {lesion.number}",
            tracking_uid=hashed_uid(str(sop_uid), f"lesion-{lesion.number}")))
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
        contributing_equipment=[provenance.contributing_equipment()],
        specific_character_set=OUTPUT_CHARACTER_SET,
        omit_empty_frames=True,
    )
    seg.SeriesDescription = series_description(SERIES_DESCRIPTION, description_suffix)
    return seg
