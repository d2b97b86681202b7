"""Seeded, valid synthetic MR series for tests: full geometry, one study per call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import MRImageStorage, generate_uid

from dicom_node.writers.image_source import new_instance, set_grey_pixels, set_plane


@dataclass(frozen=True)
class SeriesSpec:
    n_slices: int = 20
    rows: int = 64
    columns: int = 64
    description: str = "T1 MPRAGE +C ax"
    modality: str = "MR"
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # axial
    contrast_agent: str = "Gadobutrol"
    pixel_spacing_mm: float = 3.0
    slice_spacing_mm: float = 4.0
    patient_name: str = "TEST^PATIENT"
    patient_id: str = "TEST0001"


def head_phantom(spec: SeriesSpec, seed: int) -> np.ndarray:
    """A skull ring, brain ellipse and one bright enhancing lesion."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.linspace(-1, 1, spec.n_slices), np.linspace(-1, 1, spec.rows),
                          np.linspace(-1, 1, spec.columns), indexing="ij")
    r = np.sqrt((x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 1.1) ** 2)
    volume = np.where(r < 0.85, 600.0, 0.0) + np.where((r >= 0.85) & (r < 1.0), 300.0, 0.0)
    lesion = np.sqrt((x - 0.3) ** 2 + (y + 0.2) ** 2 + (z - 0.1) ** 2) < 0.18
    volume[lesion] = 1400.0
    volume += rng.normal(0.0, 20.0, volume.shape)
    return np.clip(volume, 0, 4095).astype(np.uint16)


def write_series(out_dir: Path, spec: SeriesSpec | None = None, seed: int = 0,
                 study_uid: str | None = None) -> list[Path]:
    """Write one MR series as single-frame files; returns the paths in slice order."""
    spec = spec or SeriesSpec()
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = head_phantom(spec, seed)
    study_uid = study_uid or generate_uid(entropy_srcs=["study", str(seed)])
    series_uid = generate_uid(entropy_srcs=["series", str(seed), spec.description])
    frame_uid = generate_uid(entropy_srcs=["frame", str(seed)])
    row = np.array(spec.orientation[:3])
    col = np.array(spec.orientation[3:])
    normal = np.cross(row, col)
    paths = []
    for i in range(spec.n_slices):
        sop_uid = generate_uid(entropy_srcs=["sop", str(seed), spec.description, str(i)])
        ds = new_instance(MRImageStorage, sop_uid)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientName = spec.patient_name
        ds.PatientID = spec.patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.StudyDate = "20261125"
        ds.StudyTime = "101500"
        ds.SeriesDate = "20261125"
        ds.SeriesTime = "102000"
        ds.ContentDate = "20261125"
        ds.ContentTime = "102000"
        ds.AccessionNumber = f"ACC{seed:05d}"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.Modality = spec.modality
        ds.Manufacturer = "dicom-node tests"
        ds.SeriesDescription = spec.description
        ds.SeriesNumber = 5
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = 2300
        ds.EchoTime = 2.3
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 3
        ds.ContrastBolusAgent = spec.contrast_agent
        ds.BodyPartExamined = "BRAIN"
        ds.PatientPosition = "HFS"
        origin = np.array([-spec.columns * spec.pixel_spacing_mm / 2,
                           -spec.rows * spec.pixel_spacing_mm / 2, -40.0])
        position = origin + normal * i * spec.slice_spacing_mm
        set_plane(ds, frame_of_reference_uid=frame_uid,
                  position=[round(float(v), 4) for v in position],
                  orientation=spec.orientation, pixel_spacing_mm=spec.pixel_spacing_mm,
                  slice_thickness_mm=spec.slice_spacing_mm,
                  spacing_between_slices_mm=spec.slice_spacing_mm,
                  slice_location=round(float(np.dot(normal, position)), 4))
        set_grey_pixels(ds, pixels[i], bits_stored=12)
        path = out_dir / f"slice{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
