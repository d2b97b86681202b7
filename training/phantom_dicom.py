"""Write a :class:`~training.phantom.PhantomPatient` as one DICOM study plus ground truth.

Layout per patient (``out_dir/<PatientID>/``)::

    DICOM/T1C/IM0001.dcm ...     MR Image Storage, MONOCHROME2 uint16, one per slice
    DICOM/PET/IM0001.dcm ...     Positron Emission Tomography Image Storage, Units GML (SUV-like),
                                 uint16 with a series-wide RescaleSlope
    DICOM/FUSION/IM0001.dcm ...  Secondary Capture Image Storage, RGB, DERIVED, referencing the
                                 T1C and PET instance of its slice (SourceImageSequence)
    ground_truth.json      tumours, TBR definitions, study UIDs, realism constants
    ground_truth.npz       uptake, oracle_uptake (float32), oracle_fusion (uint8 RGB),
                           tumour_labels (uint8), oedema, brain_mask, striatum_mask,
                           background_mask (bool); all (slices, rows, cols) at T1C geometry

Slice k of every series has the same position (instance number k + 1, slices ordered
inferior -> superior). All UIDs are derived from (seed, patient index, geometry,
object kind, slice) with :func:`pydicom.uid.generate_uid`, so a re-run reproduces them.
The oracle fusion is ground truth only and is never written as DICOM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicom_node.writers.image_source import new_instance, set_grey_pixels, set_plane
from storage.file_store import atomic_write, atomic_writer
from training import phantom
from training.phantom import PhantomPatient

MANUFACTURER = "dicom-node phantom"
MODEL_NAME = "MNI152-2009 FDOPA PET/MR phantom"
SOFTWARE_VERSION = "dicom-node 0.1.0"
STUDY_DATE = "20250101"
STUDY_DESCRIPTION = "PHANTOM FDOPA PET/MR brain"
T1C_DESCRIPTION = "T1 MPRAGE +C ax"
PET_DESCRIPTION = "FDOPA PET brain AC"
FUSION_DESCRIPTION = "PET/T1C fusion"
F18_HALF_LIFE_S = 6586.2
F18_POSITRON_FRACTION = 0.9673
INJECTED_DOSE_BQ = 185e6
PATIENT_WEIGHT_KG = 70.0
AXIAL_ORIENTATION = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


@dataclass(frozen=True)
class PatientPaths:
    """Where :func:`write_patient` put one patient's files."""

    folder: Path
    dicom: Path
    t1c: tuple[Path, ...]
    pet: tuple[Path, ...]
    fusion: tuple[Path, ...]
    ground_truth_json: Path
    ground_truth_npz: Path


@dataclass(frozen=True)
class PatientUids:
    study: str
    frame_of_reference: str
    t1c_series: str
    pet_series: str
    fusion_series: str
    t1c: tuple[str, ...]
    pet: tuple[str, ...]
    fusion: tuple[str, ...]


def patient_uids(patient: PhantomPatient) -> PatientUids:
    """Deterministic UIDs of one phantom patient's study, series and instances."""
    g = patient.geometry
    base = ["dicom-node-phantom", str(patient.seed), str(patient.index),
            f"{g.rows}x{g.cols}x{g.slices}", f"{g.pixel_spacing_mm:g}", f"{g.slice_spacing_mm:g}"]

    def uid(*parts: str) -> str:
        return str(generate_uid(entropy_srcs=[*base, *parts]))

    n = g.slices
    return PatientUids(
        study=uid("study"),
        frame_of_reference=uid("frame-of-reference"),
        t1c_series=uid("series", "t1c"),
        pet_series=uid("series", "pet"),
        fusion_series=uid("series", "fusion"),
        t1c=tuple(uid("instance", "t1c", str(k)) for k in range(n)),
        pet=tuple(uid("instance", "pet", str(k)) for k in range(n)),
        fusion=tuple(uid("instance", "fusion", str(k)) for k in range(n)),
    )


def write_patient(patient: PhantomPatient, out_dir: Path) -> PatientPaths:
    """Write the patient's three series and ground truth under ``out_dir/<PatientID>/``."""
    uids = patient_uids(patient)
    folder = Path(out_dir) / patient.patient_id
    dicom = folder / "DICOM"
    for sub in ("T1C", "PET", "FUSION"):
        (dicom / sub).mkdir(parents=True, exist_ok=True)
    t1c_paths, pet_paths, fusion_paths = [], [], []
    t1c_window = t1c_display_window(patient.t1c)
    for k in range(patient.geometry.slices):
        name = f"IM{k + 1:04d}.dcm"
        t1c = _t1c_slice(patient, uids, k, t1c_window)
        t1c_paths.append(_write(t1c, dicom / "T1C" / name))
        pet_paths.append(_write(_pet_slice(patient, uids, k), dicom / "PET" / name))
        fusion_paths.append(_write(_fusion_slice(patient, uids, k), dicom / "FUSION" / name))
    json_path = folder / "ground_truth.json"
    _write_bytes(json.dumps(ground_truth_document(patient, uids), indent=2).encode(), json_path)
    npz_path = folder / "ground_truth.npz"
    _write_npz(patient, npz_path)
    return PatientPaths(folder=folder, dicom=dicom, t1c=tuple(t1c_paths), pet=tuple(pet_paths),
                        fusion=tuple(fusion_paths), ground_truth_json=json_path,
                        ground_truth_npz=npz_path)


def ground_truth_document(patient: PhantomPatient, uids: PatientUids | None = None
                          ) -> dict[str, object]:
    """The content of ground_truth.json."""
    uids = uids or patient_uids(patient)
    g = patient.geometry
    model = phantom.TUMOUR_MODEL
    return {
        "patient_id": patient.patient_id,
        "index": patient.index,
        "seed": patient.seed,
        "study_instance_uid": uids.study,
        "series_instance_uid": {"t1c": uids.t1c_series, "pet": uids.pet_series,
                                "fusion": uids.fusion_series},
        "geometry": {"rows": g.rows, "cols": g.cols, "slices": g.slices,
                     "pixel_spacing_mm": g.pixel_spacing_mm,
                     "slice_spacing_mm": g.slice_spacing_mm},
        "pose": patient.pose,
        "fusion_style": patient.fusion_style.as_dict(),
        "background_mean": patient.background_mean,
        "striatum_ratio": patient.striatum_ratio,
        "definitions": {
            "coordinates": "DICOM patient coordinates (LPS), mm",
            "background": ("brain mask minus every voxel within "
                           f"{phantom.BACKGROUND_MARGIN_MM} mm of tumour, oedema or striatum"),
            "tbr_max": "max of noisy PET uptake over the lesion mask / background mean",
            "tbr_mean": "mean of noisy PET uptake over the lesion mask / background mean",
            "oracle_tbr": "the same on the oracle uptake (its own background mean)",
            "tbr_model": ("viable-tumour uptake / noise-free background mean before blurring "
                          "(the drawn TBR of the uptake model)"),
            "tbr_predicted": "E[tbr_model | kind, diameter, oedema]: the oracle's tumour ratio",
            "tumour_model": {
                "formula": "TBR = 1 + 3 * sigmoid(eta), eta = intercept + solid*[solid] "
                           "+ rim*[rim] + size*log2(diameter/12mm) + oedema*(oedema_mm/10) + e",
                "intercept": model.intercept, "solid": model.solid, "rim": model.rim,
                "size": model.size, "oedema": model.oedema, "noise_sd": model.noise_sd,
            },
            "pet_fwhm_mm": phantom.PET_FWHM_MM,
            "pet_noise_rel_sd_at_uptake_1": phantom.PET_NOISE_REL_SD,
            "t1c_noise_rel_sd": phantom.T1C_NOISE_REL_SD,
        },
        "tumours": [
            {"label": t.label, "type": t.kind.value, "centre_mm": list(t.centre_mm),
             "radius_mm": t.radius_mm, "oedema_mm": t.oedema_mm, "voxels": t.voxels,
             "tbr_model": t.tbr_model, "tbr_predicted": t.tbr_predicted,
             "tbr_max": t.tbr_max, "tbr_mean": t.tbr_mean,
             "oracle_tbr_max": t.oracle_tbr_max, "oracle_tbr_mean": t.oracle_tbr_mean}
            for t in patient.tumours
        ],
    }


# --- datasets ---------------------------------------------------------------------------------


def _common(patient: PhantomPatient, uids: PatientUids, sop_class: str, sop_uid: str,
            modality: str, series_uid: str, series_number: int, description: str,
            k: int) -> Dataset:
    ds = new_instance(sop_class, sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = STUDY_DATE
    ds.InstanceCreationTime = "120000"
    # Patient / study
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientAge = "050Y"
    ds.PatientWeight = PATIENT_WEIGHT_KG
    ds.StudyInstanceUID = uids.study
    ds.StudyDate = STUDY_DATE
    ds.StudyTime = "120000"
    ds.StudyID = f"{patient.index + 1}"
    ds.AccessionNumber = f"PHA{patient.index + 1:06d}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = STUDY_DESCRIPTION
    # Series / equipment
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = STUDY_DATE
    ds.SeriesTime = "120000"
    ds.SeriesDescription = description
    ds.BodyPartExamined = "BRAIN"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.InstitutionName = "PHANTOM"
    # Image
    ds.InstanceNumber = k + 1
    ds.ContentDate = STUDY_DATE
    ds.ContentTime = "120000"
    return ds


def _plane(ds: Dataset, patient: PhantomPatient, uids: PatientUids, k: int) -> None:
    g = patient.geometry
    set_plane(ds, frame_of_reference_uid=uids.frame_of_reference,
              position=[round(v, 4) for v in g.image_position(k)],
              orientation=AXIAL_ORIENTATION, pixel_spacing_mm=g.pixel_spacing_mm,
              slice_thickness_mm=g.slice_spacing_mm,
              spacing_between_slices_mm=g.slice_spacing_mm,
              slice_location=round(g.image_position(k)[2], 4))


def t1c_display_window(t1c: NDArray[np.generic]) -> tuple[float, float]:
    """(WindowCenter, WindowWidth) that fit the T1C a viewer shows: from the 0.5th to the
    99.5th percentile of the head (voxels above a tenth of the 99.5th percentile of the
    volume), so brain is mid-grey and enhancement bright, not a white blob (the median of
    all non-zero voxels, mostly air noise, gave a centre of about 28 for brain at
    1100-1300)."""
    values = np.asarray(t1c, dtype=np.float64)
    top = float(np.percentile(values, 99.5)) if values.size else 0.0
    head = values[values > 0.1 * top]
    if head.size == 0 or top <= 0:
        return 500.0, 1000.0
    low, high = (float(v) for v in np.percentile(head, [0.5, 99.5]))
    low = min(low, 0.5 * high)  # keep the darker tissue (CSF) inside the window
    return round((low + high) / 2.0, 1), round(max(high - low, 1.0), 1)


def _t1c_slice(patient: PhantomPatient, uids: PatientUids, k: int,
               window: tuple[float, float]) -> Dataset:
    ds = _common(patient, uids, MRImageStorage, uids.t1c[k], "MR", uids.t1c_series, 1,
                 T1C_DESCRIPTION, k)
    _plane(ds, patient, uids, k)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = STUDY_DATE
    ds.AcquisitionTime = "121500"
    ds.ScanningSequence = ["GR", "IR"]
    ds.SequenceVariant = ["SP", "MP"]
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D"
    ds.SequenceName = "tfl3d1"
    ds.RepetitionTime = 2300.0
    ds.EchoTime = 2.98
    ds.InversionTime = 900.0
    ds.EchoTrainLength = 1
    ds.FlipAngle = 9.0
    ds.MagneticFieldStrength = 3.0
    ds.ImagedNucleus = "1H"
    ds.PatientPosition = "HFS"
    ds.ContrastBolusAgent = "Gadobutrol"
    ds.ContrastBolusRoute = "IV"
    ds.ContrastBolusVolume = 7.0
    ds.ContrastBolusStartTime = "121000"
    ds.ContrastBolusIngredient = "GADOLINIUM"
    set_grey_pixels(ds, patient.t1c[k])
    ds.WindowCenter, ds.WindowWidth = window
    return ds


def _pet_slice(patient: PhantomPatient, uids: PatientUids, k: int) -> Dataset:
    ds = _common(patient, uids, PositronEmissionTomographyImageStorage, uids.pet[k], "PT",
                 uids.pet_series, 2, PET_DESCRIPTION, k)
    _plane(ds, patient, uids, k)
    g = patient.geometry
    slope = patient.pet_rescale_slope
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.AcquisitionDate = STUDY_DATE
    ds.AcquisitionTime = "120000"
    # PET Series
    ds.Units = "GML"
    ds.SUVType = "BW"
    ds.CountsSource = "EMISSION"
    ds.SeriesType = ["STATIC", "IMAGE"]
    ds.CorrectedImage = ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]
    ds.RandomsCorrectionMethod = "DLYD"
    ds.AttenuationCorrectionMethod = "MR-based"
    ds.ReconstructionMethod = "OSEM"
    ds.DecayCorrection = "START"
    ds.NumberOfSlices = g.slices
    ds.CollimatorType = "NONE"
    ds.AxialAcceptance = 0
    # PET Isotope
    radionuclide = Dataset()
    radionuclide.CodeValue = "77004003"
    radionuclide.CodingSchemeDesignator = "SCT"
    radionuclide.CodeMeaning = "^18^Fluorine"
    info = Dataset()
    info.RadionuclideCodeSequence = Sequence([radionuclide])
    info.Radiopharmaceutical = "Fluorodopa F^18^"
    drug = Dataset()
    drug.CodeValue = "5811000122108"
    drug.CodingSchemeDesignator = "SCT"
    drug.CodeMeaning = "Fluorodopa F^18^"
    info.RadiopharmaceuticalCodeSequence = Sequence([drug])
    info.RadiopharmaceuticalRoute = "IV"
    info.RadiopharmaceuticalStartTime = "113000"
    info.RadiopharmaceuticalStartDateTime = f"{STUDY_DATE}113000"
    info.RadionuclideTotalDose = INJECTED_DOSE_BQ
    info.RadionuclideHalfLife = F18_HALF_LIFE_S
    info.RadionuclidePositronFraction = F18_POSITRON_FRACTION
    ds.RadiopharmaceuticalInformationSequence = Sequence([info])
    # NM/PET Patient Orientation
    orientation = Dataset()
    orientation.CodeValue = "102538003"
    orientation.CodingSchemeDesignator = "SCT"
    orientation.CodeMeaning = "recumbent"
    gantry = Dataset()
    gantry.CodeValue = "102540008"
    gantry.CodingSchemeDesignator = "SCT"
    gantry.CodeMeaning = "headfirst"
    ds.PatientOrientationCodeSequence = Sequence([orientation])
    ds.PatientGantryRelationshipCodeSequence = Sequence([gantry])
    # PET Image
    ds.FrameReferenceTime = 0.0
    ds.ImageIndex = k + 1
    ds.ActualFrameDuration = 600000
    ds.DecayFactor = 1.0
    ds.DoseCalibrationFactor = 1.0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = f"{slope:.6g}"
    stored = np.rint(patient.uptake[k] / np.float32(slope)).astype(np.uint16)
    set_grey_pixels(ds, stored)
    ds.WindowCenter = 2.0
    ds.WindowWidth = 4.0
    return ds


def _fusion_slice(patient: PhantomPatient, uids: PatientUids, k: int) -> Dataset:
    ds = _common(patient, uids, SecondaryCaptureImageStorage, uids.fusion[k], "OT",
                 uids.fusion_series, 3, FUSION_DESCRIPTION, k)
    ds.ImageType = ["DERIVED", "SECONDARY", "FUSION"]
    ds.ConversionType = "SYN"
    ds.PatientOrientation = ["L", "P"]
    ds.BurnedInAnnotation = "NO"
    ds.DerivationDescription = (
        "T1C windowed 0.5-99.5 percentile, FDOPA uptake overlaid with "
        + ", ".join(f"{key}={value}" for key, value in patient.fusion_style.as_dict().items()))
    sources = []
    for sop_class, sop_uid in ((MRImageStorage, uids.t1c[k]),
                               (PositronEmissionTomographyImageStorage, uids.pet[k])):
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        sources.append(item)
    ds.SourceImageSequence = Sequence(sources)
    rgb = patient.fusion[k]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    return ds


# --- atomic writes ----------------------------------------------------------------------------


def _write(ds: Dataset, path: Path) -> Path:
    with atomic_writer(path) as handle:
        ds.save_as(handle, enforce_file_format=True)
    return path


def _write_bytes(data: bytes, path: Path) -> Path:
    atomic_write(path, data)
    return path


def _write_npz(patient: PhantomPatient, path: Path) -> Path:
    with atomic_writer(path) as handle:
        np.savez_compressed(
            handle,
            uptake=patient.uptake.astype(np.float32),
            oracle_uptake=patient.oracle_uptake.astype(np.float32),
            oracle_fusion=patient.oracle_fusion,
            tumour_labels=patient.tumour_labels.astype(np.uint8),
            oedema=patient.oedema,
            brain_mask=patient.brain_mask,
            striatum_mask=patient.striatum_mask,
            background_mask=patient.background_mask,
        )
    return path
