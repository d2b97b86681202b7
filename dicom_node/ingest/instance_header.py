"""What the receiver needs of a received instance's header, read without decoding it.

The C-STORE handler files every instance by study, series and SOP Instance UID and
records a few attributes for series tracking. :func:`read_instance_header` reads them
straight from the raw elements of the file's header: the file meta group, then the
dataset up to (0028,0008) Number of Frames, skipping the values of every other element
and never touching the pixel data. This is several times cheaper than ``dcmread`` plus
attribute access (which converts and validates each value), and the handler runs once
per instance on the thread that receives the next one.

Anything unusual goes through pydicom instead (:func:`_read_with_pydicom`), with the same
result: no preamble, a deflated or unknown transfer syntax, or text that is not plain
ASCII (so every character set is decoded by pydicom's own rules).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.filereader import data_element_generator
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID

# Tag numbers of what is read; the dataset is read up to the last of them.
STUDY_UID = 0x0020000D
SERIES_UID = 0x0020000E
SOP_UID = 0x00080018
SOP_CLASS_UID = 0x00080016
MODALITY = 0x00080060
SERIES_DESCRIPTION = 0x0008103E
PATIENT_ID = 0x00100020
ACCESSION_NUMBER = 0x00080050
INSTANCE_NUMBER = 0x00200013
IMAGE_POSITION = 0x00200032
IMAGE_ORIENTATION = 0x00200037
IMAGES_IN_ACQUISITION = 0x00201002
NUMBER_OF_FRAMES = 0x00280008
TAGS = (STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS_UID, MODALITY, SERIES_DESCRIPTION,
        PATIENT_ID, ACCESSION_NUMBER, INSTANCE_NUMBER, IMAGE_POSITION, IMAGE_ORIENTATION,
        IMAGES_IN_ACQUISITION, NUMBER_OF_FRAMES)
KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
            "Modality", "SeriesDescription", "PatientID", "AccessionNumber", "InstanceNumber",
            "ImagePositionPatient", "ImageOrientationPatient", "ImagesInAcquisition",
            "NumberOfFrames")
TRANSFER_SYNTAX = 0x00020010
LAST_TAG = max(TAGS)


class HeaderError(ValueError):
    """The header lacks an identifying attribute or holds an unreadable value."""


@dataclass(frozen=True)
class InstanceHeader:
    """The identifying and series-tracking attributes of one instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    description: str
    patient_id: str
    accession_number: str
    instance_number: int | None
    images_in_acquisition: int | None
    position_mm: float | None  # along the slice normal; None unless one frame with geometry
    transfer_syntax_uid: str  # from the file meta group; "" when the file has none


class _NotPlain(Exception):
    """The fast path cannot read this file: use pydicom."""


def read_instance_header(source: Path | BinaryIO) -> InstanceHeader:
    """The header of a DICOM file (Part 10, with or without pixel data): a path, or a
    seekable binary stream positioned at its start.

    Raises :class:`pydicom.errors.InvalidDicomError` for a file that is not DICOM and
    :class:`HeaderError` when an identifying UID is missing.
    """
    if isinstance(source, Path):
        with source.open("rb") as fp:
            return read_instance_header(fp)
    start = source.tell()
    try:
        values = _read_plain(source)
    except _NotPlain:
        source.seek(start)
        return _read_with_pydicom(source)
    return _header(values)


def _read_plain(fp: BinaryIO) -> dict[int, str]:
    preamble = fp.read(132)
    if len(preamble) < 132 or preamble[128:] != b"DICM":
        raise _NotPlain
    syntax = ""
    for raw in data_element_generator(fp, False, True,
                                      stop_when=lambda tag, vr, length: tag >> 16 != 2):
        if raw.tag == TRANSFER_SYNTAX:
            syntax = _text(raw.value)
    uid = UID(syntax)
    if not uid.is_transfer_syntax or uid.is_deflated:
        raise _NotPlain
    values: dict[int, str] = {TRANSFER_SYNTAX: syntax}
    for raw in data_element_generator(fp, uid.is_implicit_VR, uid.is_little_endian,
                                      stop_when=_past_last, specific_tags=list(TAGS)):
        if raw.tag in TAGS and raw.VR != "SQ":
            values[raw.tag] = _text(raw.value)
    return values


def _past_last(tag: BaseTag, vr: str | None, length: int) -> bool:
    return bool(tag > LAST_TAG)


def _text(value: bytes | None) -> str:
    """A string value of a header element, as pydicom would give it for ASCII text."""
    if not value:
        return ""
    if b"\x1b" in value or max(value) >= 0x80:
        raise _NotPlain  # a character set beyond ASCII: pydicom decodes it
    return value.decode("ascii").strip("\x00 ")


def _header(values: dict[int, str]) -> InstanceHeader:
    for tag, keyword in ((STUDY_UID, "StudyInstanceUID"), (SERIES_UID, "SeriesInstanceUID"),
                         (SOP_UID, "SOPInstanceUID")):
        if not values.get(tag):
            raise HeaderError(f"no {keyword}")
    frames = _int(values.get(NUMBER_OF_FRAMES))
    return InstanceHeader(
        study_uid=values[STUDY_UID], series_uid=values[SERIES_UID], sop_uid=values[SOP_UID],
        sop_class_uid=values.get(SOP_CLASS_UID, ""), modality=values.get(MODALITY, "")[:16],
        description=values.get(SERIES_DESCRIPTION, "")[:64],
        patient_id=values.get(PATIENT_ID, "")[:64],
        accession_number=values.get(ACCESSION_NUMBER, "")[:16],
        instance_number=_int(values.get(INSTANCE_NUMBER)),
        images_in_acquisition=_int(values.get(IMAGES_IN_ACQUISITION)),
        position_mm=None if frames not in (None, 1) else slice_position_mm(
            _floats(values.get(IMAGE_ORIENTATION)), _floats(values.get(IMAGE_POSITION))),
        transfer_syntax_uid=values.get(TRANSFER_SYNTAX, ""))


def _int(text: str | None) -> int | None:
    if not text:
        return None
    try:
        return int(float(text.split("\\")[0]))
    except ValueError:
        return None


def _floats(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(v) for v in text.split("\\")]
    except ValueError:
        return None


def slice_position_mm(orientation: Sequence[float] | None,
                      position: Sequence[float] | None) -> float | None:
    """Position along the slice normal (row x column direction); None when not computable."""
    if orientation is None or position is None or len(orientation) != 6 or len(position) != 3:
        return None
    r, c = orientation[:3], orientation[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    return float(sum(n * p for n, p in zip(normal, position, strict=True)))


def _read_with_pydicom(source: BinaryIO) -> InstanceHeader:
    header = dcmread(source, stop_before_pixels=True, specific_tags=list(KEYWORDS))
    values: dict[int, str] = {
        TRANSFER_SYNTAX: str(header.file_meta.get("TransferSyntaxUID", ""))}
    for tag, keyword in zip(TAGS, KEYWORDS, strict=True):
        value: Any = header.get(keyword)
        if value is None or value == "":
            continue
        if isinstance(value, list | tuple | MultiValue):
            values[tag] = "\\".join(str(v) for v in value)
        else:
            values[tag] = str(value).strip("\x00 ")
    return _header(values)


def truncation(source: Path | BinaryIO) -> str | None:
    """Why the instance is cut short, or None: walks every top-level element (values of
    more than a few hundred bytes are skipped, not read) and compares where the last one
    ends with the size of the data. A deflated instance is not walked (its elements are
    compressed); pydicom reads it whole later. Cheap: well under a millisecond per
    MR slice."""
    if isinstance(source, Path):
        with source.open("rb") as fp:
            return truncation(fp)
    start = source.tell()
    size = source.seek(0, 2) - start
    source.seek(start)
    try:
        preamble = source.read(132)
        if len(preamble) < 132 or preamble[128:] != b"DICM":
            return None  # no Part 10 header: read_instance_header judges it
        syntax = ""
        for raw in data_element_generator(source, False, True,
                                          stop_when=lambda tag, vr, length: tag >> 16 != 2):
            if raw.tag == TRANSFER_SYNTAX:
                syntax = (raw.value or b"").decode("ascii", "replace").strip("\x00 ")
        uid = UID(syntax)
        if not uid.is_transfer_syntax or uid.is_deflated:
            return None
        end, last = 0, 0
        for raw in data_element_generator(source, uid.is_implicit_VR, uid.is_little_endian,
                                          defer_size=256):
            length = getattr(raw, "length", 0xFFFFFFFF)  # a sequence arrives parsed
            value_tell = getattr(raw, "value_tell", 0)
            reach = (value_tell + length if length != 0xFFFFFFFF
                     else source.tell()) - start
            if reach > end:
                end, last = reach, int(raw.tag)
    except (EOFError, ValueError, OSError, KeyError, NotImplementedError) as exc:
        return f"the data set cannot be walked to its end: {exc}"
    finally:
        source.seek(start)
    if end > size:
        return (f"truncated: element ({last >> 16:04X},{last & 0xFFFF:04X}) runs to byte "
                f"{end} of an instance of {size} bytes")
    if 0 < size - end < 8:  # part of an element's tag and length, and nothing after it
        return f"truncated: the instance ends {size - end} bytes into an element's header"
    return None
