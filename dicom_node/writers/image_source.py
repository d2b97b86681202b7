"""The parts of a grey image data set every builder of source images shares: the file
meta and SOP identity, the image plane, and unsigned 16-bit MONOCHROME2 pixels. Used by
the writers' warm-up, the phantom (training) and the tests' series factory, which each
add their own patient, study and acquisition attributes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian


def new_instance(sop_class: str, sop_uid: str) -> Dataset:
    """An empty data set with its file meta (Explicit VR Little Endian) and SOP identity."""
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    return ds


def set_plane(ds: Dataset, *, frame_of_reference_uid: str, position: Sequence[float],
              orientation: Sequence[float], pixel_spacing_mm: float,
              slice_thickness_mm: float, spacing_between_slices_mm: float | None = None,
              slice_location: float | None = None) -> None:
    """The image plane (PS3.3 C.7.6.2) and frame of reference."""
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = list(position)
    ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    ds.SliceThickness = slice_thickness_mm
    if spacing_between_slices_mm is not None:
        ds.SpacingBetweenSlices = spacing_between_slices_mm
    if slice_location is not None:
        ds.SliceLocation = slice_location


def set_grey_pixels(ds: Dataset, pixels: NDArray[np.generic], bits_stored: int = 16) -> None:
    """Unsigned 16-bit MONOCHROME2 pixel data, ``bits_stored`` of them used."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
