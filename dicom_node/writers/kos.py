"""The result set as one object: a Key Object Selection document (KOS) that lists every
instance a job wrote for one version of a series (the SC fusion images, the SEG, the
volumetric SR and, when there is one, the image-anchored SR).

An archive or viewer that groups by KOS presents the set as one result; the KOS is in
its own series (``output.series_number_kos``, 9905), in the source study, and lists the
instances both in its content tree (TID 2010: one IMAGE item per SC and the SEG, one
COMPOSITE item per SR) and in its Current Requested Procedure Evidence Sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_node.writers.provenance import (
    IHE_SCHEME,
    OUTPUT_CHARACTER_SET,
    Provenance,
    coding_schemes,
    series_description,
    stamp_series_date,
)
from dicom_node.writers.sr import device_observer

SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage
#: The document title, from CID 7010 (Key Object Selection Document Title):
#: (113000, DCM, "Of Interest"), the generic title viewers list as key objects.
TITLE = codes.DCM.OfInterest
SERIES_DESCRIPTION = "TBR RESULT SET (KOS) - SYNTHETIC PET, NOT FOR DIAGNOSTIC USE"
DESCRIPTION = ("dicom-node result set: synthetic FDOPA PET/T1C fusion (SC), TBR regions "
               "(SEG), TBR reports (SR). Synthetic PET, NOT FOR DIAGNOSTIC USE.")


def make_kos(
    members: Sequence[Dataset],
    series_uid: str,
    sop_uid: str,
    series_number: int,
    provenance: Provenance,
    description_suffix: str = "",
) -> Dataset:
    """A KOS listing ``members`` (the written result set, all in one study). The
    patient and study attributes come from the first member, so pass the SR first."""
    if not members:
        raise ValueError("a result set KOS needs at least one member")
    studies = {str(ds.StudyInstanceUID) for ds in members}
    if len(studies) != 1:
        raise ValueError(f"the result set spans {len(studies)} studies; a KOS lists one")
    content = hd.ko.KeyObjectSelection(
        document_title=TITLE, referenced_objects=list(members),
        observer_device_context=device_observer(provenance), description=DESCRIPTION)
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=list(members),
        content=content,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=provenance.manufacturer,
        institution_name=provenance.institution_name or None,
        contributing_equipment=provenance.contributing_equipment(),
        specific_character_set=OUTPUT_CHARACTER_SET,
    )
    for item in kos.ContentSequence:
        if item.ValueType in ("IMAGE", "COMPOSITE"):
            # highdicom names each reference (260753009, SCT, "Source"); TID 2010 rows 8
            # and 10 forbid a concept name there (pixelmed's validator rejects it)
            del item.ConceptNameCodeSequence
    kos.SeriesDescription = series_description(SERIES_DESCRIPTION, description_suffix)
    kos.CodingSchemeIdentificationSequence = coding_schemes(IHE_SCHEME)
    stamp_series_date(kos)
    return kos


def listed_instances(kos: Dataset) -> set[str]:
    """The SOP Instance UIDs a KOS's content tree lists."""
    return {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for item in kos.ContentSequence if "ReferencedSOPSequence" in item}
