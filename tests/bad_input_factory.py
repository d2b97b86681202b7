"""Awkward but legal (and some illegal) DICOM input for the bad-input tests.

Builds small multi-slice series out of the real vendor files in pydicom-data (copies
with new UIDs and positions, pixel data kept byte for byte, compressed or not),
compresses tests/dicom_factory series with pydicom's encoders or DCMTK's dcmcjpeg,
and writes instances that are broken on purpose.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydicom import Dataset, config, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import UID, generate_uid

from tests.dicom_factory import SeriesSpec, write_series

T1C_DESCRIPTION = "T1 +C ax"


def vendor_file(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not in pydicom-data")
    return Path(str(path))


def vendor_series(name: str, out_dir: Path, n_slices: int, seed: int,
                  description: str = T1C_DESCRIPTION) -> list[Path]:
    """``n_slices`` copies of one single-frame vendor file as one axial T1C series.

    The pixel data (compressed or not, in the file's own byte order) is copied
    unchanged; only UIDs, slice position and the selection-relevant header change.
    """
    source = dcmread(vendor_file(name))
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid(entropy_srcs=["vendor-study", name, str(seed)])
    series_uid = generate_uid(entropy_srcs=["vendor-series", name, str(seed)])
    frame_uid = generate_uid(entropy_srcs=["vendor-frame", name, str(seed)])
    spacing = float(source.get("SliceThickness", 1.0) or 1.0) or 1.0
    paths = []
    for i in range(n_slices):
        ds = copy.deepcopy(source)
        sop_uid = generate_uid(entropy_srcs=["vendor-sop", name, str(seed), str(i)])
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesDescription = description
        ds.ContrastBolusAgent = "Gadobutrol"
        ds.PatientID = f"VENDOR{seed:04d}"
        ds.InstanceNumber = i + 1
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [-10.0, -10.0, round(-20.0 + i * spacing, 4)]
        ds.SliceLocation = round(-20.0 + i * spacing, 4)
        path = out_dir / f"{name.removesuffix('.dcm')}-{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def vendor_enhanced_mr(name: str, out_dir: Path, seed: int,
                       description: str = T1C_DESCRIPTION, with_geometry: bool = False) -> Path:
    """One Enhanced MR multi-frame vendor instance, relabelled as an axial T1C.

    The pydicom-data files carry no functional groups (no plane geometry at all);
    with_geometry adds shared pixel measures / orientation and per-frame positions.
    """
    ds = dcmread(vendor_file(name))
    if with_geometry:
        measures = Dataset()
        measures.PixelSpacing = [3.0, 3.0]
        measures.SliceThickness = 4.0
        orientation = Dataset()
        orientation.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        shared = Dataset()
        shared.PixelMeasuresSequence = [measures]
        shared.PlaneOrientationSequence = [orientation]
        ds.SharedFunctionalGroupsSequence = [shared]
        frames = []
        for index in range(int(ds.NumberOfFrames)):
            position = Dataset()
            position.ImagePositionPatient = [-96.0, -96.0, -20.0 + 4.0 * index]
            frame = Dataset()
            frame.PlanePositionSequence = [position]
            frames.append(frame)
        ds.PerFrameFunctionalGroupsSequence = frames
        ds.ContrastBolusAgent = "Gadobutrol"
    sop_uid = generate_uid(entropy_srcs=["emr-sop", name, str(seed)])
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["emr-study", name, str(seed)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["emr-series", name, str(seed)])
    ds.SeriesDescription = description
    ds.PatientID = f"EMR{seed:04d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    ds.save_as(path, enforce_file_format=True)
    return path


def to_8bit(paths: list[Path], out_dir: Path) -> list[Path]:
    """The same series stored as 8-bit (JPEG baseline can only carry 8 bits)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        ds = dcmread(path)
        pixels = (ds.pixel_array.astype(np.uint32) >> 4).astype(np.uint8)
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = pixels.tobytes()
        target = out_dir / path.name
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


# dcmcjpeg option -> transfer syntax it produces
DCMTK_JPEG = {
    "1.2.840.10008.1.2.4.50": "+eb",  # JPEG baseline (process 1), lossy 8 bit
    "1.2.840.10008.1.2.4.51": "+ee",  # JPEG extended (process 2 & 4), lossy 12 bit
    "1.2.840.10008.1.2.4.57": "+el",  # JPEG lossless, non-hierarchical (process 14)
    "1.2.840.10008.1.2.4.70": "+e1",  # JPEG lossless, first-order prediction (SV1)
}


def compress_series(paths: list[Path], syntax: str, out_dir: Path) -> list[Path]:
    """The series re-encoded in ``syntax``: dcmcjpeg for JPEG, pydicom's encoders otherwise."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        target = out_dir / path.name
        if syntax in DCMTK_JPEG:
            binary = shutil.which("dcmcjpeg")
            if binary is None:
                raise FileNotFoundError("dcmcjpeg (DCMTK) is not installed")
            subprocess.run([binary, DCMTK_JPEG[syntax], str(path), str(target)], check=True,
                           capture_output=True, timeout=60)
        else:
            ds = dcmread(path)
            kwargs: dict[str, object] = {}
            if syntax == "1.2.840.10008.1.2.4.81":  # JPEG-LS near-lossless
                kwargs["jls_error"] = 2
            elif syntax == "1.2.840.10008.1.2.4.91":  # JPEG 2000 lossy
                kwargs["j2k_cr"] = [20]
            ds.compress(UID(syntax), **kwargs)  # type: ignore[arg-type]
            ds.save_as(target, enforce_file_format=True)
        assert str(dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
        out.append(target)
    return out


def uncompressed_series(out_dir: Path, n_slices: int, seed: int,
                        description: str = T1C_DESCRIPTION, rows: int = 64,
                        columns: int = 64, patient_name: str = "TEST^PATIENT") -> list[Path]:
    return write_series(out_dir, SeriesSpec(n_slices=n_slices, description=description,
                                            rows=rows, columns=columns,
                                            patient_name=patient_name), seed=seed)


def rewrite(path: Path, target: Path, transfer_syntax: str | None = None,
            **attributes: object) -> Path:
    """Copy one instance with some attributes set (None deletes the attribute) and,
    optionally, in another uncompressed transfer syntax."""
    ds = dcmread(path)
    for name, value in attributes.items():
        if value is None:
            if name in ds:
                delattr(ds, name)
        else:
            setattr(ds, name, value)
    if attributes.get("SOPInstanceUID") is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = UID(str(attributes["SOPInstanceUID"]))
    if transfer_syntax is not None:
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


@contextmanager
def lax_uid_validation() -> Iterator[None]:
    """Let pydicom write (and read) UIDs that are not valid, as a broken sender would."""
    settings = config.settings
    saved = (settings.reading_validation_mode, settings.writing_validation_mode)
    settings.reading_validation_mode = config.IGNORE
    settings.writing_validation_mode = config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = saved


def big_instance(path: Path, target: Path, rows: int, columns: int, seed: int) -> Path:
    """One single-frame MR instance with a ``rows`` x ``columns`` 16-bit matrix."""
    ds = dcmread(path)
    rng = np.random.default_rng(seed)
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelData = rng.integers(0, 4096, size=(rows, columns), dtype=np.uint16).tobytes()
    sop_uid = generate_uid(entropy_srcs=["big", str(seed)])
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


def dataset_without_meta(path: Path) -> Dataset:
    ds = dcmread(path)
    return Dataset(ds)  # the data set proper, file meta left out
