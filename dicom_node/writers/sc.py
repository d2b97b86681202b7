"""The synthetic fusion series: one RGB Secondary Capture instance per source slice.

Each image carries the "SYNTHETIC - NOT FOR DIAGNOSTIC USE" banner burned into its
pixels (BurnedInAnnotation YES), points at its source slice (SourceImageSequence),
and names the model and weights in its Contributing Equipment. The first image also
shows the TBR summary, for viewers that do not display SR. Both are centred, the banner
at the top and the summary at the bottom, clear of the corners where viewers draw their
own overlay text.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from io import BytesIO
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset, dcmwrite
from pydicom.charset import default_encoding
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import (
    correct_ambiguous_vr_element,
    write_data_element,
    write_file_meta_info,
)
from pydicom.tag import BaseTag

from dicom_node.series.volume import SliceInfo
from dicom_node.writers.provenance import (
    BANNER,
    IHE_SCHEME,
    OUTPUT_CHARACTER_SET,
    Provenance,
    coding_schemes,
    copy_patient_study,
    series_description,
    stamp_series_date,
)

if TYPE_CHECKING:  # types only: the uncertainty module imports torch
    from dicom_node.analysis.tbr import TbrResult
    from dicom_node.analysis.uncertainty import TbrInterval

SERIES_DESCRIPTION = "SYNTHETIC FDOPA PET/T1C FUSION - NOT FOR DIAGNOSTIC USE"


def orientation_letters(direction: Sequence[float]) -> str:
    """Patient-orientation letters (e.g. 'L', 'PF') of a direction cosine vector."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    parts = []
    for axis in np.argsort(-np.abs(np.asarray(direction, dtype=float))):
        value = float(direction[axis])
        if abs(value) < 1e-3:
            continue
        parts.append(letters[axis][0] if value > 0 else letters[axis][1])
    return "".join(parts[:3]) or "L"


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


#: The share of the image width, centred, that burned-in text keeps to: viewers put their
#: own overlay text in the four corners (OHIF, Orthanc's viewers), over the ends of
#: full-width lines. The font shrinks (to 8 pixels at the least) until the widest line fits.
TEXT_WIDTH_FRACTION = 0.8
_MIN_FONT = 8


def _font_size(width: int, lines: Sequence[str]) -> int:
    size = max(_MIN_FONT, min(18, width // 28))
    limit = TEXT_WIDTH_FRACTION * width
    while size > _MIN_FONT and max((_font(size).getlength(line) for line in lines),
                                   default=0.0) > limit:
        size -= 1
    return size


def burn_in(rgb: NDArray[np.uint8], lines: Sequence[str],
            bottom_lines: Sequence[str] = ()) -> NDArray[np.uint8]:
    """Draw text lines, each centred, on a dark band at the top of the image, and
    ``bottom_lines`` (the TBR summary) on one at the bottom: the top and bottom centre are
    where viewers' corner overlays leave the image uncovered.

    The top band is opaque and the text lies inside it, so the band does not depend on
    the image: it is drawn once per width and text (:func:`_band`) and copied over the
    top rows of each slice, which gives the same pixels as drawing on every slice."""
    band = _band(rgb.shape[1], tuple(lines))
    if band is None or rgb.ndim != 3 or rgb.shape[0] < len(band):
        out = _draw_band(rgb, lines)
    else:
        out = np.array(rgb, dtype=np.uint8, copy=True)
        out[: len(band)] = band
    if bottom_lines:
        out = _draw_band(out, bottom_lines, at_bottom=True)
    return out


@functools.lru_cache(maxsize=32)
def _band(width: int, lines: tuple[str, ...]) -> NDArray[np.uint8] | None:
    """The top rows :func:`_draw_band` writes on an image of this width; None if its
    text would reach below the band (and mix with the image)."""
    size = _font_size(width, lines)
    rows = (size + 3) * len(lines) + 4 + 1  # the rectangle's last row is inclusive
    probe = _draw_band(np.zeros((rows + 64, width, 3), np.uint8), lines)
    if probe[rows:].any():
        return None
    band = probe[:rows]
    band.flags.writeable = False
    return band


def _draw_band(rgb: NDArray[np.uint8], lines: Sequence[str],
               at_bottom: bool = False) -> NDArray[np.uint8]:
    image = Image.fromarray(rgb, mode="RGB")
    height, width = rgb.shape[:2]
    size = _font_size(width, lines)
    font = _font(size)
    draw = ImageDraw.Draw(image)
    line_height = size + 3
    band = line_height * len(lines) + 4
    top = max(0, height - 1 - band) if at_bottom else 0
    draw.rectangle((0, top, width, top + band), fill=(0, 0, 0))
    for i, line in enumerate(lines):
        draw.text((width / 2, top + 2 + i * line_height), line, fill=(255, 255, 0), font=font,
                  anchor="ma")  # "ma": the point is the middle of the line's top
    return np.asarray(image, dtype=np.uint8)


def encode(ds: Dataset) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# The top-level elements in which the instances of one SC series differ (make_sc_series).
PER_INSTANCE_TAGS = frozenset({0x00080018, 0x00082112, 0x00200013, 0x7FE00010})


class SeriesEncoder:
    """``encode`` for the instances of one :func:`make_sc_series`, without re-encoding
    what they share: the template's elements are encoded once, and each instance adds
    only its file meta and its per-instance elements (SOP Instance UID, Instance
    Number, Source Image Sequence, Pixel Data). The bytes equal :func:`encode`'s
    (checked on the template here, on whole series in the tests); a template that does
    not reproduce, or an instance that does not share every other element with the
    template (the copies of make_sc_series share the element objects), is encoded
    whole by :func:`encode`."""

    def __init__(self, template: Dataset) -> None:
        self._charset = template.get("SpecificCharacterSet", default_encoding)
        self._parts: list[bytes | BaseTag] | None = []
        self._keys = set(template.keys())
        self._shared = [(tag, template.get_item(tag)) for tag in template.keys()  # noqa: SIM118
                        if int(tag) not in PER_INSTANCE_TAGS]
        run: list[bytes] = []
        for tag in sorted(template.keys()):
            if tag.element == 0 and tag.group > 6:
                continue  # retired group lengths are not written (as write_dataset)
            if int(tag) in PER_INSTANCE_TAGS:
                self._parts.append(b"".join(run))
                self._parts.append(tag)
                run = []
            else:
                run.append(self._element(template, tag))
        self._parts.append(b"".join(run))
        if self.encode(template) != encode(template):
            self._parts = None

    @property
    def reuses_template(self) -> bool:
        """False when the template did not reproduce and every instance is encoded whole."""
        return self._parts is not None

    def _element(self, ds: Dataset, tag: BaseTag) -> bytes:
        buffer = DicomBytesIO()
        buffer.is_implicit_VR, buffer.is_little_endian = False, True
        # 'OB or OW' pixel data and the like get their VR as dcmwrite would give it
        write_data_element(buffer, correct_ambiguous_vr_element(ds[tag], ds, True),
                           self._charset)
        return buffer.getvalue()

    def encode(self, ds: Dataset) -> bytes:
        if self._parts is None or set(ds.keys()) != self._keys or any(
                ds.get_item(tag) is not element for tag, element in self._shared):
            return encode(ds)
        meta = DicomBytesIO()
        meta.is_implicit_VR, meta.is_little_endian = False, True
        # a copy, as dcmwrite: writing sets the group length, and the instances of a
        # series share the template's file meta elements. Only the group length element
        # is written into, so a shallow copy with a fresh one of it is enough (a deep
        # copy took a third of the encoding time).
        file_meta = FileMetaDataset()
        file_meta.update(ds.file_meta)
        if 0x00020000 in file_meta:
            file_meta.add_new(0x00020000, "UL", 0)
        write_file_meta_info(meta, file_meta, enforce_standard=True)
        out = [b"\x00" * 128, b"DICM", meta.getvalue()]
        for part in self._parts:
            if isinstance(part, bytes):
                out.append(part)
            elif part in ds:
                out.append(self._element(ds, part))
        return b"".join(out)


def make_sc_instance(
    fusion_rgb: NDArray[np.uint8],
    source: Dataset,
    slice_info: SliceInfo,
    series_uid: str,
    sop_uid: str,
    instance_number: int,
    series_number: int,
    provenance: Provenance,
    summary_lines: Sequence[str] = (),
    description_suffix: str = "",
) -> Dataset:
    """One SC instance for one slice; ``summary_lines`` are burned in at the bottom centre
    (the banner at the top centre); ``description_suffix`` marks a re-run's version in
    the series description."""
    pixels = burn_in(fusion_rgb, [BANNER], summary_lines)
    row, col = slice_info.orientation[:3], slice_info.orientation[3:]
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=str(source.StudyInstanceUID),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=provenance.manufacturer,
        pixel_spacing=slice_info.pixel_spacing,
        patient_orientation=(orientation_letters(row), orientation_letters(col)),
        contributing_equipment=provenance.contributing_equipment(),
        specific_character_set=OUTPUT_CHARACTER_SET,
        **copy_patient_study(source),  # type: ignore[arg-type]
    )
    sc.SeriesDescription = series_description(SERIES_DESCRIPTION, description_suffix)
    stamp_series_date(sc)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.ManufacturerModelName = provenance.model_name[:64]
    sc.SoftwareVersions = provenance.software_versions
    sc.BodyPartExamined = "BRAIN"
    sc.CodingSchemeIdentificationSequence = coding_schemes(IHE_SCHEME)
    sc.DerivationDescription = (f"Synthetic 18F-FDOPA PET/T1C fusion by Pix2Pix "
                                f"({provenance.model_name} {provenance.model_version}) "
                                f"from the T1C slice. NOT FOR DIAGNOSTIC USE.")[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID = slice_info.sop_class_uid
    ref.ReferencedSOPInstanceUID = slice_info.sop_uid
    if slice_info.frame_index is not None:
        ref.ReferencedFrameNumber = slice_info.frame_index + 1
    sc.SourceImageSequence = [ref]
    if "FrameOfReferenceUID" in source:
        sc.FrameOfReferenceUID = source.FrameOfReferenceUID
    return sc


class ScSeries:
    """The SC instances of one fusion series, one per source slice, built on demand in
    any order. The template (slice 1, banner only) is built and validated by highdicom
    once; every instance is a copy of it with only the per-slice attributes replaced,
    which avoids highdicom's per-instance checks on a series of hundreds of slices. So
    the job can write and send slices 2..N while the TBR analysis runs, and slice 1,
    which also shows the TBR summary, afterwards."""

    def __init__(self, fusion_rgb: NDArray[np.uint8], sources: Sequence[Dataset],
                 slices: Sequence[SliceInfo], series_uid: str, sop_uids: Sequence[str],
                 series_number: int, provenance: Provenance,
                 description_suffix: str = "") -> None:
        if not len(fusion_rgb) == len(slices) == len(sop_uids) or not len(slices):
            raise ValueError("one fusion image, slice and SOP Instance UID per instance")
        self._fusion = fusion_rgb
        self._slices = slices
        self._sop_uids = sop_uids
        self.template = make_sc_instance(fusion_rgb[0], sources[0], slices[0], series_uid,
                                         sop_uids[0], 1, series_number, provenance,
                                         description_suffix=description_suffix)
        self._encoder: SeriesEncoder | None = None

    def __len__(self) -> int:
        return len(self._slices)

    def instance(self, index: int, summary_lines: Sequence[str] = (),
                 sop_uid: str | None = None) -> Dataset:
        """Slice ``index`` (0-based); ``summary_lines`` are burned in at the bottom centre.
        ``sop_uid`` replaces the slice's own UID (for a variant with other pixels)."""
        template, info = self.template, self._slices[index]
        uid = sop_uid or self._sop_uids[index]
        ds = Dataset()  # a new element dict sharing the template's unchanged elements;
        ds.update(template)  # every element replaced below gets a new DataElement
        meta = FileMetaDataset()
        meta.update(template.file_meta)
        meta.add_new(0x00020003, "UI", uid)  # MediaStorageSOPInstanceUID
        ds.file_meta = meta
        ds.add_new(0x00080018, "UI", uid)  # SOPInstanceUID
        ds.add_new(0x00200013, "IS", index + 1)  # InstanceNumber
        pixels = burn_in(self._fusion[index], [BANNER], summary_lines)
        ds.add_new(0x7FE00010, "OB", pixels.tobytes())
        ref = Dataset()
        ref.ReferencedSOPClassUID = info.sop_class_uid
        ref.ReferencedSOPInstanceUID = info.sop_uid
        if info.frame_index is not None:
            ref.ReferencedFrameNumber = info.frame_index + 1
        ds.add_new(0x00082112, "SQ", [ref])  # SourceImageSequence
        return ds

    def encode(self, ds: Dataset) -> bytes:
        """The file bytes of one of this series' instances (:class:`SeriesEncoder`)."""
        if self._encoder is None:
            self._encoder = SeriesEncoder(self.template)
        return self._encoder.encode(ds)


def make_sc_series(
    fusion_rgb: NDArray[np.uint8],
    sources: Sequence[Dataset],
    slices: Sequence[SliceInfo],
    series_uid: str,
    sop_uids: Sequence[str],
    series_number: int,
    provenance: Provenance,
    summary_lines: Sequence[str] = (),
) -> Iterator[Dataset]:
    """Every instance of an :class:`ScSeries` in order, the first with the summary."""
    series = ScSeries(fusion_rgb, sources, slices, series_uid, sop_uids, series_number,
                      provenance)
    for index in range(len(series)):
        yield series.instance(index, summary_lines if index == 0 else ())


def summary_lines(result: TbrResult, intervals: Sequence[TbrInterval] = (),
                  level: float = 0.0) -> list[str]:
    """The text on the first SC slice: the ratios, with their intervals when measured
    (then two short lines per lesion, so that the central 80 % of a 256-pixel-wide slice
    holds them in an 8-pixel font)."""
    by_lesion = {interval.lesion: interval for interval in intervals}
    lines = [f"TBR, synthetic uptake: threshold {result.threshold:g} x bg, "
             f"bg {result.background_mean:.2f}"]
    if not result.lesions:
        lines.append(result.finding[:1].upper() + result.finding[1:])
    for lesion in result.lesions[:3]:
        interval = by_lesion.get(lesion.number)
        if interval is None:
            lines.append(f"Lesion {lesion.number}: TBRmax {lesion.tbr_max:.2f}  "
                         f"TBRmean {lesion.tbr_mean:.2f}  {lesion.volume_ml:.1f} mL")
            continue
        lines.append(f"Lesion {lesion.number}{' EQUIVOCAL' if interval.equivocal else ''}: "
                     f"{lesion.volume_ml:.1f} mL, {level:.0%} intervals")
        lines.append(f" TBRmax {lesion.tbr_max:.2f} ({interval.tbr_max_low:.2f}-"
                     f"{interval.tbr_max_high:.2f}) TBRmean {lesion.tbr_mean:.2f} "
                     f"({interval.tbr_mean_low:.2f}-{interval.tbr_mean_high:.2f})")
    if len(result.lesions) > 3:
        lines.append(f"... {len(result.lesions) - 3} more lesion(s) in the SR")
    return lines
