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

Two PET layouts (``pet_layout``):

- ``same-grid`` (the default of :func:`write_patient`, the layout the shipped model was
  trained on): the PET on the T1C's grid, slice k at T1C slice k, ``Units GML`` (the
  SUV-like uptake itself, one RescaleSlope for the series, DecayFactor 1).
- ``scanner`` (:class:`ScannerPet`; the default of ``dicom-node-train phantom``): the PET as a
  PET/MR scanner writes it, on its own grid (default 172 x 172 at 2.09 mm, 2.03 mm slices,
  its own in-plane centre, first slice and axial extent), in Bq/mL (``Units BQML``,
  ``DecayCorrection START``, one RescaleSlope per slice), with the dose, half-life, weight,
  injection and series/acquisition times that SUVbw needs
  (:func:`training.suv.suv_scale` gives back the phantom's uptake); the values are the
  T1C-grid uptake interpolated at the PET's voxel centres (cubic B-spline, clipped at 0;
  0 outside the T1C's extent). Same FrameOfReferenceUID as the T1C (simultaneous PET/MR). The fusion
  export is optional (``fusion``): ``none`` (default), ``t1c-refs`` (the vendor style: RGB
  Secondary Capture without geometry, SourceImageSequence -> the T1C instance) or
  ``bare`` (no references at all).

In the same-grid layout slice k of every series has the same position (instance number
k + 1, slices ordered inferior -> superior). All UIDs are derived from (seed, patient index, geometry,
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
from scipy import ndimage

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
INJECTION_TIME = "113000"
PET_SERIES_TIME = "120000"
T1C_ACQUISITION_TIME = "121500"
PET_LAYOUTS = ("scanner", "same-grid")
FUSION_EXPORTS = ("none", "t1c-refs", "bare")


@dataclass(frozen=True)
class ScannerPet:
    """The PET grid of the ``scanner`` layout: a PET/MR scanner's own reconstruction grid
    (defaults: a 3 T PET/MR's 172 x 172 brain matrix, 2.09 mm pixels, 2.03 mm slices),
    centred ``centre_offset_mm`` (LPS x, y) from the T1C's centre, axially covering the
    T1C's extent plus ``margin_mm`` on each side, starting ``first_offset_mm`` lower still."""

    matrix: int = 172
    pixel_spacing_mm: float = 2.09
    slice_spacing_mm: float = 2.03
    centre_offset_mm: tuple[float, float] = (0.7, -1.1)
    margin_mm: float = 3.0
    first_offset_mm: float = 0.61
    frame_duration_s: float = 1200.0

    def __post_init__(self) -> None:
        if self.matrix < 16 or self.pixel_spacing_mm <= 0 or self.slice_spacing_mm <= 0:
            raise ValueError("PET matrix must be at least 16 and spacings positive")

    def positions(self, geometry: phantom.PhantomGeometry) -> list[tuple[float, float, float]]:
        """ImagePositionPatient of every PET slice, inferior -> superior."""
        z = geometry.axis_mm(0)
        first = float(z[0]) - self.margin_mm - self.first_offset_mm
        n = int(np.floor((float(z[-1]) + self.margin_mm - first) / self.slice_spacing_mm)) + 1
        half = (self.matrix - 1) / 2.0 * self.pixel_spacing_mm
        x0 = self.centre_offset_mm[0] - half
        y0 = self.centre_offset_mm[1] - half
        return [(round(x0, 4), round(y0, 4), round(first + k * self.slice_spacing_mm, 4))
                for k in range(n)]

    def as_dict(self) -> dict[str, object]:
        return {"matrix": self.matrix, "pixel_spacing_mm": self.pixel_spacing_mm,
                "slice_spacing_mm": self.slice_spacing_mm,
                "centre_offset_mm": list(self.centre_offset_mm), "margin_mm": self.margin_mm,
                "first_offset_mm": self.first_offset_mm,
                "frame_duration_s": self.frame_duration_s}


def f18_decay(seconds: float) -> float:
    """Fraction of F-18 left after ``seconds``."""
    return float(2.0 ** (-seconds / F18_HALF_LIFE_S))


#: Bq/mL per unit of SUVbw in the scanner layout: the dose decayed from injection (11:30)
#: to the PET series start (12:00) over the patient's weight in grams.
BQML_PER_SUV = INJECTED_DOSE_BQ * f18_decay(1800.0) / (PATIENT_WEIGHT_KG * 1000.0)


def scanner_pet_volume(patient: PhantomPatient, grid: ScannerPet
                       ) -> tuple[list[tuple[float, float, float]], NDArray[np.float32]]:
    """The PET slice positions and the SUV-like uptake at the PET's voxel centres
    (cubic B-spline from the T1C grid, clipped at 0; 0 outside the T1C's extent: cubic
    rather than trilinear so that the builder's own trilinear resampling back is most of
    the smoothing the two layouts differ by)."""
    g = patient.geometry
    positions = grid.positions(g)
    x = positions[0][0] + np.arange(grid.matrix) * grid.pixel_spacing_mm
    y = positions[0][1] + np.arange(grid.matrix) * grid.pixel_spacing_mm
    z = np.array([p[2] for p in positions])
    ax_z, ax_y, ax_x = g.axis_mm(0), g.axis_mm(1), g.axis_mm(2)
    kz = (z - ax_z[0]) / g.slice_spacing_mm
    ky = (y - ax_y[0]) / g.pixel_spacing_mm
    kx = (x - ax_x[0]) / g.pixel_spacing_mm
    coords = np.meshgrid(kz, ky, kx, indexing="ij")
    values = ndimage.map_coordinates(patient.uptake.astype(np.float32), coords, order=3,
                                     mode="constant", cval=0.0)
    return positions, np.clip(values, 0.0, None).astype(np.float32)


def scanner_pet_series(patient: PhantomPatient, grid: ScannerPet,
                       uids: PatientUids | None = None) -> list[Dataset]:
    """The scanner-layout PET series of ``patient`` (one dataset per slice, pixel data
    included), as :func:`write_patient` writes it; also what ``phantom-dataset`` reads in
    memory for its ``scanner`` layout."""
    uids = uids or patient_uids(patient)
    positions, volume = scanner_pet_volume(patient, grid)
    series_uid = _uid(patient, "series", "pet-scanner", *map(str, grid.as_dict().values()))
    return [_scanner_pet_slice(patient, uids, grid, series_uid,
                               _uid(patient, "instance", "pet-scanner", series_uid, str(k)),
                               k, len(positions), position, volume[k])
            for k, position in enumerate(positions)]


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


def _uid(patient: PhantomPatient, *parts: str) -> str:
    g = patient.geometry
    base = ["dicom-node-phantom", str(patient.seed), str(patient.index),
            f"{g.rows}x{g.cols}x{g.slices}", f"{g.pixel_spacing_mm:g}", f"{g.slice_spacing_mm:g}"]
    return str(generate_uid(entropy_srcs=[*base, *parts]))


def patient_uids(patient: PhantomPatient) -> PatientUids:
    """Deterministic UIDs of one phantom patient's study, series and instances."""

    def uid(*parts: str) -> str:
        return _uid(patient, *parts)

    g = patient.geometry

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


def write_patient(patient: PhantomPatient, out_dir: Path, pet_layout: str = "same-grid",
                  scanner: ScannerPet | None = None, fusion: str | None = None
                  ) -> PatientPaths:
    """Write the patient's series and ground truth under ``out_dir/<PatientID>/``.

    ``pet_layout``: ``same-grid`` or ``scanner`` (see the module docstring; ``scanner``
    the grid, default :class:`ScannerPet`). ``fusion``: ``none``, ``t1c-refs`` or ``bare``;
    default: the same-grid fusion referencing the T1C and PET slice, or none for the
    scanner layout."""
    if pet_layout not in PET_LAYOUTS:
        raise ValueError(f"pet_layout must be one of {PET_LAYOUTS}, got {pet_layout!r}")
    if fusion is not None and fusion not in FUSION_EXPORTS:
        raise ValueError(f"fusion must be one of {FUSION_EXPORTS}, got {fusion!r}")
    fusion_refs = fusion or ("t1c-pet-refs" if pet_layout == "same-grid" else "none")
    grid = (scanner or ScannerPet()) if pet_layout == "scanner" else None
    uids = patient_uids(patient)
    folder = Path(out_dir) / patient.patient_id
    dicom = folder / "DICOM"
    for sub in ("T1C", "PET") + (("FUSION",) if fusion_refs != "none" else ()):
        (dicom / sub).mkdir(parents=True, exist_ok=True)
    t1c_paths, pet_paths, fusion_paths = [], [], []
    t1c_window = t1c_display_window(patient.t1c)
    for k in range(patient.geometry.slices):
        name = f"IM{k + 1:04d}.dcm"
        t1c = _t1c_slice(patient, uids, k, t1c_window)
        t1c_paths.append(_write(t1c, dicom / "T1C" / name))
        if grid is None:
            pet_paths.append(_write(_pet_slice(patient, uids, k), dicom / "PET" / name))
        if fusion_refs != "none":
            fusion_paths.append(_write(_fusion_slice(patient, uids, k, fusion_refs),
                                       dicom / "FUSION" / name))
    scanner_uids: dict[str, object] = {}
    if grid is not None:
        series = scanner_pet_series(patient, grid, uids)
        scanner_uids = {"series": str(series[0].SeriesInstanceUID), "slices": len(series)}
        for k, ds in enumerate(series):
            pet_paths.append(_write(ds, dicom / "PET" / f"IM{k + 1:04d}.dcm"))
    document = ground_truth_document(patient, uids)
    document["pet_layout"] = ({"layout": "same-grid", "units": "GML"} if grid is None else
                              {"layout": "scanner", "units": "BQML",
                               "bqml_per_suv": BQML_PER_SUV, "grid": grid.as_dict(),
                               "series_instance_uid": scanner_uids["series"],
                               "slices": scanner_uids["slices"]})
    document["fusion_export"] = fusion_refs
    json_path = folder / "ground_truth.json"
    _write_bytes(json.dumps(document, indent=2).encode(), json_path)
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
    ds.AcquisitionTime = T1C_ACQUISITION_TIME
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
    slope = patient.pet_rescale_slope
    _pet_modules(ds, k, patient.geometry.slices, units="GML", frame_s=600.0,
                 decay_factor=1.0, frame_reference_ms=0.0)
    ds.RescaleSlope = f"{slope:.6g}"
    stored = np.rint(patient.uptake[k] / np.float32(slope)).astype(np.uint16)
    set_grey_pixels(ds, stored)
    ds.WindowCenter = 2.0
    ds.WindowWidth = 4.0
    return ds


def _scanner_pet_slice(patient: PhantomPatient, uids: PatientUids, grid: ScannerPet,
                       series_uid: str, sop_uid: str, k: int, n: int,
                       position: tuple[float, float, float], suv: NDArray[np.float32]
                       ) -> Dataset:
    """Slice k of the scanner-layout PET: Bq/mL, per-slice RescaleSlope (uint16 up to
    65000), decayed to the series start over a frame of ``grid.frame_duration_s``."""
    ds = _common(patient, uids, PositronEmissionTomographyImageStorage, sop_uid, "PT",
                 series_uid, 2, PET_DESCRIPTION, k)
    ds.SeriesTime = PET_SERIES_TIME
    set_plane(ds, frame_of_reference_uid=uids.frame_of_reference, position=list(position),
              orientation=AXIAL_ORIENTATION, pixel_spacing_mm=grid.pixel_spacing_mm,
              slice_thickness_mm=grid.slice_spacing_mm,
              spacing_between_slices_mm=grid.slice_spacing_mm, slice_location=position[2])
    lam = np.log(2.0) / F18_HALF_LIFE_S
    x = lam * grid.frame_duration_s
    decay_factor = x / (1.0 - np.exp(-x))  # frame average -> frame (= series) start
    _pet_modules(ds, k, n, units="BQML", frame_s=grid.frame_duration_s,
                 decay_factor=float(decay_factor),
                 frame_reference_ms=float(np.log(decay_factor) / lam * 1000.0))
    bqml = suv.astype(np.float64) * BQML_PER_SUV
    top = float(bqml.max())
    slope = float(f"{top / 65000.0:.6g}") if top > 0 else 1.0
    ds.RescaleSlope = f"{slope:.6g}"
    set_grey_pixels(ds, np.clip(np.rint(bqml / slope), 0, 65535).astype(np.uint16))
    ds.WindowCenter = round(2.0 * BQML_PER_SUV, 1)
    ds.WindowWidth = round(4.0 * BQML_PER_SUV, 1)
    return ds


def _pet_modules(ds: Dataset, k: int, n: int, *, units: str, frame_s: float,
                 decay_factor: float, frame_reference_ms: float) -> None:
    """PET Series, PET Isotope, NM/PET Patient Orientation and PET Image attributes."""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.AcquisitionDate = STUDY_DATE
    ds.AcquisitionTime = PET_SERIES_TIME
    # PET Series
    ds.Units = units
    ds.SUVType = "BW"
    ds.CountsSource = "EMISSION"
    ds.SeriesType = ["STATIC", "IMAGE"]
    ds.CorrectedImage = ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]
    ds.RandomsCorrectionMethod = "DLYD"
    ds.AttenuationCorrectionMethod = "MR-based"
    ds.ReconstructionMethod = "OSEM"
    ds.DecayCorrection = "START"
    ds.NumberOfSlices = n
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
    info.RadiopharmaceuticalStartTime = INJECTION_TIME
    info.RadiopharmaceuticalStartDateTime = f"{STUDY_DATE}{INJECTION_TIME}"
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
    ds.FrameReferenceTime = round(frame_reference_ms, 1)
    ds.ImageIndex = k + 1
    ds.ActualFrameDuration = round(frame_s * 1000.0)
    ds.DecayFactor = f"{decay_factor:.6g}"
    ds.DoseCalibrationFactor = 1.0
    ds.RescaleIntercept = 0


def _fusion_slice(patient: PhantomPatient, uids: PatientUids, k: int,
                  references: str = "t1c-pet-refs") -> Dataset:
    ds = _common(patient, uids, SecondaryCaptureImageStorage, uids.fusion[k], "OT",
                 uids.fusion_series, 3, FUSION_DESCRIPTION, k)
    ds.ImageType = ["DERIVED", "SECONDARY", "FUSION"]
    ds.ConversionType = "SYN"
    ds.PatientOrientation = ["L", "P"]
    ds.BurnedInAnnotation = "NO"
    ds.DerivationDescription = (
        "T1C windowed 0.5-99.5 percentile, FDOPA uptake overlaid with "
        + ", ".join(f"{key}={value}" for key, value in patient.fusion_style.as_dict().items()))
    refs = [(MRImageStorage, uids.t1c[k])]
    if references == "t1c-pet-refs":
        refs.append((PositronEmissionTomographyImageStorage, uids.pet[k]))
    sources = []
    for sop_class, sop_uid in refs if references != "bare" else []:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        sources.append(item)
    if sources:
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
