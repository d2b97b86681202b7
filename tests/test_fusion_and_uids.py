"""Fusion rendering and its inverse; deterministic output UIDs."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.inference.fusion import (
    NETWORK_T1C_CEILING,
    defuse,
    display_grey,
    fuse,
    to_uint8,
    window_t1c,
)
from dicom_node.inference.fusion_style import FusionStyle
from dicom_node.writers.uids import derive_uid, source_fingerprint


def test_defuse_recovers_uptake_from_an_8_bit_fusion() -> None:
    rng = np.random.default_rng(0)
    grey = rng.random((4, 64, 64)).astype(np.float32)
    uptake = rng.uniform(0.0, 4.0, (4, 64, 64)).astype(np.float32)
    style = FusionStyle()
    fusion = to_uint8(fuse(grey, uptake, style)) / 255.0
    recovered = defuse(fusion, grey, style)
    shown = uptake >= style.display_threshold
    # below the threshold nothing was drawn, and de-fusion says so
    assert (recovered.shown == shown).mean() > 0.99
    error = np.abs(recovered.uptake - uptake)[shown & (grey > 0.05)]
    assert np.percentile(error, 95) < 0.02  # 8-bit colour quantisation


def test_unblended_pixels_are_plain_grey() -> None:
    grey = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    fusion = fuse(grey, np.zeros_like(grey), FusionStyle())
    assert np.allclose(fusion, grey[..., None])


def test_window_t1c_is_in_unit_range() -> None:
    volume = np.random.default_rng(1).normal(500, 100, (3, 20, 20))
    grey = window_t1c(volume)
    assert grey.min() == 0.0 and grey.max() == 1.0


def test_network_grey_keeps_enhancement_the_display_window_clips() -> None:
    """A brain series' 99.5th percentile lies in its brightest white matter: at the display
    window an enhancing lesion (1.25 x white matter) reads exactly as that white matter;
    with the network's headroom it stays brighter (what fdopa-demo 3.2 never saw)."""
    rng = np.random.default_rng(2)
    volume = np.zeros((4, 64, 64), dtype=np.float32)
    volume[:, 8:56, 8:56] = rng.normal(1000.0, 20.0, (4, 48, 48))  # white matter
    volume[1, 30:33, 30:33] = 1250.0  # a small enhancing lesion
    display = window_t1c(volume)
    network = window_t1c(volume, NETWORK_T1C_CEILING)
    brightest_wm = np.percentile(display[:, 8:56, 8:56], 99.9)
    assert display[1, 31, 31] == 1.0 == brightest_wm
    assert network[1, 31, 31] > 1.15 * np.percentile(network[:, 8:56, 8:56], 99.9)
    np.testing.assert_array_equal(display_grey(network), display)
    with pytest.raises(ValueError, match="ceiling"):
        window_t1c(volume, 0.5)


def test_output_uids_are_deterministic_and_distinct() -> None:
    fingerprint = source_fingerprint(["1.2.3.2", "1.2.3.1"])
    assert fingerprint == source_fingerprint(["1.2.3.1", "1.2.3.2"])
    first = derive_uid(fingerprint, "ab" * 32, 1, "sc", 0)
    assert first == derive_uid(fingerprint, "ab" * 32, 1, "sc", 0)
    others = {derive_uid(fingerprint, "ab" * 32, 1, "sc", 1),
              derive_uid(fingerprint, "cd" * 32, 1, "sc", 0),
              derive_uid(fingerprint, "ab" * 32, 2, "sc", 0),
              derive_uid(fingerprint, "ab" * 32, 1, "sr", 0)}
    assert first not in others and len(others) == 4
    assert len(first) <= 64 and first.startswith("2.25.")


def test_sc_series_instances_are_independent(tmp_path) -> None:
    """The fast per-slice copies must not share their per-slice attributes."""
    from dicom_node.config import SelectionConfig
    from dicom_node.series.selection import select_series
    from dicom_node.series.volume import load_volume
    from dicom_node.writers.provenance import Provenance
    from dicom_node.writers.sc import make_sc_series
    from tests.dicom_factory import SeriesSpec, write_series

    files = write_series(tmp_path, SeriesSpec(n_slices=4, rows=32, columns=32), seed=3)
    selection = select_series(files, SelectionConfig(min_slices=2))
    volume = load_volume(selection.slices)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in volume.datasets}
    fusion = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    uids = [f"2.25.{i + 1}" for i in range(4)]
    series = list(make_sc_series(fusion, [by_uid[s.sop_uid] for s in volume.slices],
                                 volume.slices, "2.25.99", uids, 9901,
                                 Provenance("m", "n", "v", "0" * 64), ["summary"]))
    assert [str(ds.SOPInstanceUID) for ds in series] == uids
    assert [str(ds.file_meta.MediaStorageSOPInstanceUID) for ds in series] == uids
    assert [int(ds.InstanceNumber) for ds in series] == [1, 2, 3, 4]
    assert [str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in series] == [
        s.sop_uid for s in volume.slices]
    assert series[0].PixelData != series[1].PixelData  # only the first carries the summary


def test_series_encoder_writes_the_bytes_of_dcmwrite(tmp_path) -> None:
    """SeriesEncoder encodes the shared elements once; every instance must still be
    byte for byte what dcmwrite writes, also with a non-ASCII patient name, UIDs of
    different lengths, and references to frames of a multi-frame source."""
    import copy
    from dataclasses import replace
    from io import BytesIO

    from pydicom import dcmread

    from dicom_node.config import SelectionConfig
    from dicom_node.series.selection import select_series
    from dicom_node.series.volume import load_volume
    from dicom_node.writers.provenance import Provenance
    from dicom_node.writers.sc import SeriesEncoder, encode, make_sc_series
    from tests.dicom_factory import SeriesSpec, write_series

    files = write_series(tmp_path, SeriesSpec(n_slices=5, rows=64, columns=48,
                                              patient_name="Müller^Zoë"), seed=4)
    selection = select_series(files, SelectionConfig(min_slices=2))
    volume = load_volume(selection.slices)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in volume.datasets}
    rng = np.random.default_rng(0)
    fusion = rng.integers(0, 255, (5, 64, 48, 3), dtype=np.uint8)
    uids = ["2.25.7", "2.25.1234567890123456789", "2.25.12", "2.25.3", "2.25.99999"]
    infos = [replace(s, frame_index=k) if k % 2 else s for k, s in enumerate(volume.slices)]
    series = list(make_sc_series(fusion, [by_uid[s.sop_uid] for s in volume.slices], infos,
                                 "2.25.98", uids, 9901,
                                 Provenance("m", "n", "v", "0" * 64), ["TBR 2.1"]))
    encoder = SeriesEncoder(series[0])
    assert encoder.reuses_template
    metas_before = [copy.deepcopy(ds.file_meta) for ds in series]
    for k, ds in enumerate(series):
        data = encoder.encode(ds)
        assert data == encode(ds), k
        # the instances share file meta elements: encoding one must not change another's
        assert [m == b for m, b in zip([d.file_meta for d in series], metas_before,
                                       strict=True)] == [True] * len(series), k
        path = tmp_path / f"sc{k}.dcm"
        path.write_bytes(data)
        back = dcmread(path)
        assert str(back.SOPInstanceUID) == uids[k] == str(back.file_meta.MediaStorageSOPInstanceUID)
        assert str(back.PatientName) == "Müller^Zoë"
        # the middle rows: between the banner band (top) and the summary band (bottom)
        np.testing.assert_array_equal(back.pixel_array[20:40], fusion[k][20:40])
    # an instance that differs from the template elsewhere is still encoded right
    changed = series[2]
    changed.add_new(0x0008103E, "LO", "another description")  # SeriesDescription
    del changed.BodyPartExamined
    assert encoder.encode(changed) == encode(changed)
    assert dcmread(BytesIO(encoder.encode(changed))).SeriesDescription == "another description"


def test_fuse_uint8_is_to_uint8_of_fuse_bit_for_bit() -> None:
    from dicom_node.inference.fusion import fuse_uint8

    rng = np.random.default_rng(7)
    grey = rng.random((6, 40, 52), dtype=np.float32)
    uptake = (rng.random((6, 40, 52), dtype=np.float32) * 5.0).astype(np.float32)
    style = FusionStyle(alpha=0.55, window_low=0.1, window_high=3.7, display_threshold=0.4)
    uptake[0, :3] = style.display_threshold  # exactly at the threshold: shown
    uptake[1, :3] = np.nextafter(np.float32(style.display_threshold), np.float32(0))
    grey[2, :2] = [[0.0] * 52, [1.0] * 52]
    for s in (style, FusionStyle()):
        fast = fuse_uint8(grey, uptake, s)
        assert fast.dtype == np.uint8 and fast.shape == (6, 40, 52, 3)
        assert np.array_equal(fast, to_uint8(fuse(grey, uptake, s)))


def test_burn_in_copies_a_band_drawn_once_with_the_same_pixels() -> None:
    from dicom_node.writers.provenance import BANNER
    from dicom_node.writers.sc import _draw_band, burn_in

    rng = np.random.default_rng(8)
    for rows, cols in ((256, 256), (512, 512), (96, 64), (300, 1000), (12, 256)):
        image = rng.integers(0, 256, (rows, cols, 3), dtype=np.uint8)
        for lines in ([BANNER], [BANNER, "TBR (synthetic uptake) 1.6 x bg", "Lesion 1: gy"]):
            before = image.copy()
            assert np.array_equal(burn_in(image, lines), _draw_band(image, lines))
            assert np.array_equal(image, before)  # the slice itself is left alone
