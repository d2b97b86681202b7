"""What every output says about where it came from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_node.config import OutputConfig
from dicom_node.net.identity import MANUFACTURER_MODEL_NAME, software_version
from dicom_node.writers.uids import hashed_uid

BANNER = "SYNTHETIC - NOT FOR DIAGNOSTIC USE"
# Private coding scheme for concepts no standard code covers (declared in each SR).
PRIVATE_SCHEME = "99DCMNODE"
PRIVATE_SCHEME_NAME = "dicom-node private codes"
PRIVATE_SCHEME_ORG = "dicom-node project"
#: IHE AI Results (AIR) Rev 1.1, 6.5.3.1: the Purpose of Reference of the Contributing
#: Equipment item that names the algorithm. DICOM's CID 7005 (Contributing Equipment
#: Purposes of Reference) has no "Processing Algorithm" concept (pydicom 3.0.2's tables
#: list 109100-109106, FILMD and the digitizers), so AIR defines its own, in the 99IHE
#: scheme, with the value "Newcode1" (the "1630" printed beside it in the supplement is
#: its line number, not a code).
IHE_SCHEME = "99IHE"
IHE_SCHEME_NAME = "IHE Radiology Technical Framework codes"
IHE_SCHEME_ORG = "IHE International"
PROCESSING_ALGORITHM = hd.sr.CodedConcept("Newcode1", IHE_SCHEME, "Processing Algorithm")


def coding_schemes(*designators: str) -> list[Dataset]:
    """Coding Scheme Identification Sequence items (SOP Common) declaring the private and
    IHE schemes an object uses."""
    known = {PRIVATE_SCHEME: (PRIVATE_SCHEME_NAME, PRIVATE_SCHEME_ORG),
             IHE_SCHEME: (IHE_SCHEME_NAME, IHE_SCHEME_ORG)}
    items = []
    for designator in designators:
        name, organisation = known[designator]
        item = Dataset()
        item.CodingSchemeDesignator = designator
        item.CodingSchemeName = name
        item.CodingSchemeResponsibleOrganization = organisation
        items.append(item)
    return items


@dataclass(frozen=True)
class Provenance:
    manufacturer: str
    model_name: str
    model_version: str
    weights_sha256: str
    institution_name: str = ""

    @property
    def software_versions(self) -> str:
        return f"dicom-node {software_version()}"

    @property
    def model_text(self) -> str:
        return f"{self.model_name} {self.model_version} sha256:{self.weights_sha256}"

    @property
    def device_uid(self) -> str:
        """The algorithm's Device UID: one per node version and model (name, version and
        weights), so a retrained model or a new node release is a new device (AIR)."""
        return str(hashed_uid("dicom-node algorithm device", self.software_versions,
                              self.model_name, self.model_version, self.weights_sha256))

    def contributing_equipment(self) -> list[hd.ContributingEquipment]:
        """The Contributing Equipment items of every output: the node that ran the model
        (DCM "Processing Equipment") and, as IHE AIR asks, the algorithm itself
        ("Processing Algorithm": manufacturer, the model's name, the node's and the
        model's versions, a Device UID)."""
        description = (f"Pix2Pix generator {self.model_name} {self.model_version}, "
                       f"weights sha256 {self.weights_sha256}")[:1024]
        node = hd.ContributingEquipment(
            manufacturer=self.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=MANUFACTURER_MODEL_NAME,
            software_versions=self.software_versions,
            institution_name=self.institution_name or None,
            contribution_description=description,
        )
        algorithm = hd.ContributingEquipment(
            manufacturer=self.manufacturer,
            # highdicom accepts only CID 7005's codes here: built with one of them, then
            # given AIR's own purpose below
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.model_name[:64],
            software_versions=[self.software_versions[:64],
                               f"{self.model_name} {self.model_version}"[:64]],
            institution_name=self.institution_name or None,
            contribution_description=description,
        )
        algorithm.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
        algorithm.DeviceUID = self.device_uid
        return [node, algorithm]


# Outputs are always written in UTF-8, whatever character set the source used; names
# are copied as decoded text.
OUTPUT_CHARACTER_SET = "ISO_IR 192"


def copy_patient_study(source: Dataset) -> dict[str, object]:
    """Patient and study attributes shared by every output (same study as the source)."""
    return {
        "patient_id": str(source.get("PatientID", "")) or None,
        "patient_name": str(source.get("PatientName", "")) or None,
        "patient_birth_date": str(source.get("PatientBirthDate", "")) or None,
        "patient_sex": str(source.get("PatientSex", "")) or None,
        "accession_number": str(source.get("AccessionNumber", "")) or None,
        "study_id": str(source.get("StudyID", "")) or None,
        "study_date": str(source.get("StudyDate", "")) or None,
        "study_time": str(source.get("StudyTime", "")) or None,
        "referring_physician_name": str(source.get("ReferringPhysicianName", "")) or None,
    }


def series_description(base: str, version_suffix: str = "") -> str:
    """A SeriesDescription (LO, 64 characters) that keeps a re-run's version suffix
    whole: the base is shortened instead."""
    return base[: 64 - len(version_suffix)] + version_suffix


@dataclass(frozen=True)
class VersionLabels:
    """How a re-run's outputs tell themselves apart from the set they supersede in the
    viewer: version 1 keeps the configured series numbers and descriptions; version n
    adds 10 x (n - 1) to each number and " (v n)" to each description."""

    series_number_sc: int
    series_number_seg: int
    series_number_sr: int
    description_suffix: str
    series_number_sr_image: int = 0
    series_number_kos: int = 0

    @classmethod
    def of(cls, version: int, output: OutputConfig) -> VersionLabels:
        offset = 10 * (version - 1)
        return cls(output.series_number_sc + offset, output.series_number_seg + offset,
                   output.series_number_sr + offset, f" (v{version})" if version > 1 else "",
                   output.series_number_sr_image + offset, output.series_number_kos + offset)


def stamp_series_date(ds: Dataset) -> None:
    """SeriesDate/SeriesTime of an output: when the node made it (its ContentDate and
    ContentTime, which the writers set), so a study browser files the series under a
    date instead of "?"."""
    now = datetime.now()
    if not ds.get("ContentDate"):
        ds.ContentDate = now.strftime("%Y%m%d")
        ds.ContentTime = now.strftime("%H%M%S")
    ds.SeriesDate = ds.ContentDate
    ds.SeriesTime = ds.get("ContentTime") or now.strftime("%H%M%S")
