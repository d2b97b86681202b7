"""Bad and awkward input (issue 5, "Bad input"): real peers on loopback, real vendor files.

Every test checks three things: the node answers with the right DIMSE status (or
stores the instance and later skips / fails the series with a reason), it keeps
serving (a valid series sent afterwards is still stored), and it audits what it did.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import tempfile
import tracemalloc
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from sqlalchemy import select

from dicom_node.config import NodeConfig, SelectionConfig
from dicom_node.net import dimse_status
from dicom_node.series.selection import select_series
from dicom_node.series.volume import load_volume
from dicom_node.service import Node
from storage.models import Association as AssociationRow
from storage.models import AuditEvent, Instance, Series
from tests.bad_input_factory import (
    T1C_DESCRIPTION,
    big_instance,
    compress_series,
    dataset_without_meta,
    lax_uid_validation,
    rewrite,
    to_8bit,
    uncompressed_series,
    vendor_enhanced_mr,
    vendor_file,
    vendor_series,
)
from tests.conftest import PynetdicomPacs, require_tool, storescu, validate_dicom, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FINISHED = ("done", "skipped", "failed")


# -- fixtures and helpers ---------------------------------------------------------------------
@pytest.fixture
def quiet_node(make_config: Callable[..., NodeConfig],
               start_node: Callable[[NodeConfig], Node]) -> Node:
    """A node that stores but never declares a series ready (so the test inspects storage)."""
    return start_node(make_config(series={"stable_after_s": 3600.0, "complete_grace_s": 0.0,
                                          "sweep_interval_s": 0.25}))


@pytest.fixture
def node(make_config: Callable[..., NodeConfig],
         start_node: Callable[[NodeConfig], Node]) -> Node:
    """A node that processes a series 1 s after its last instance (4 slices are enough)."""
    return start_node(make_config(selection={"min_slices": 4}))


def send(files: list[Path], port: int, *, raw: bool = False, calling_ae: str = "TESTSCU",
         abort_after: int | None = None) -> list[int]:
    """C-STORE each file with a pynetdicom SCU that proposes each file's own transfer syntax.

    raw: hand pynetdicom the path, so the bytes after the file meta go out as they are
    on disk (a truncated file stays truncated). abort_after: A-ABORT after that many.
    """
    ae = AE(ae_title=calling_ae)
    headers = [dcmread(p, stop_before_pixels=True) for p in files]
    by_class: dict[str, set[str]] = {}
    for ds in headers:
        by_class.setdefault(str(ds.file_meta.MediaStorageSOPClassUID), set()).add(
            str(ds.file_meta.TransferSyntaxUID))
    for sop_class, syntaxes in sorted(by_class.items()):
        for syntax in sorted(syntaxes):  # one context per syntax: the node must accept each
            ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established, "association with the node failed"
    statuses: list[int] = []
    for index, path in enumerate(files):
        if abort_after is not None and index == abort_after:
            assoc.abort()
            return statuses
        rsp = assoc.send_c_store(path if raw else dcmread(path))
        statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    assoc.release()
    return statuses


def events(node: Node, kind: str, **where: str) -> list[AuditEvent]:
    with node.sessions() as session:
        query = select(AuditEvent).where(AuditEvent.kind == kind)
        for column, value in where.items():
            query = query.where(getattr(AuditEvent, column) == value)
        return list(session.scalars(query.order_by(AuditEvent.id)).all())


def detail(event: AuditEvent) -> dict[str, Any]:
    return json.loads(event.detail) if event.detail else {}


def series_row(node: Node, series_uid: str) -> Series | None:
    with node.sessions() as session:
        return session.scalars(select(Series).where(Series.series_uid == series_uid)).first()


def state_of(node: Node, series_uid: str) -> str | None:
    row = series_row(node, series_uid)
    return row.state if row else None


def finished_reason(node: Node, series_uid: str, timeout_s: float = 90.0) -> tuple[str, str]:
    """Wait until the series is done / skipped / failed; (state, reason from the audit log)."""
    assert wait_for(lambda: state_of(node, series_uid) in FINISHED, timeout_s), \
        f"series stayed {state_of(node, series_uid)!r}"
    state = state_of(node, series_uid)
    assert state is not None
    audited = [detail(e) for e in events(node, "series.state", series_uid=series_uid)]
    final = [d for d in audited if d.get("to") == state]
    assert final, f"no series.state audit event for {state}"
    return state, str(final[-1].get("reason", ""))


def stored_instances(node: Node, series_uid: str) -> list[Instance]:
    with node.sessions() as session:
        series = session.scalars(select(Series).where(Series.series_uid == series_uid)).first()
        if series is None:
            return []
        return list(session.scalars(select(Instance).where(Instance.series_id == series.id)
                                    .order_by(Instance.instance_number)).all())


def uid_of(path: Path, name: str = "SeriesInstanceUID") -> str:
    return str(dcmread(path, stop_before_pixels=True).get(name))


_probe_seed = iter(range(9000, 10000))


def assert_keeps_serving(node: Node, tmp_path: Path) -> None:
    """A valid (two-slice) series sent now is still accepted and stored."""
    seed = next(_probe_seed)
    probe = uncompressed_series(tmp_path / f"probe-{seed}", 2, seed, description="T1 +C probe")
    assert send(probe, node.receiver.port) == [dimse_status.SUCCESS] * 2
    stored = {i.sop_uid for i in stored_instances(node, uid_of(probe[0]))}
    assert stored == {uid_of(p, "SOPInstanceUID") for p in probe}
    for instance in stored_instances(node, uid_of(probe[0])):
        assert Path(instance.path).is_file()


def assert_stored_unchanged(node: Node, sent: list[Path]) -> None:
    """Each stored file holds the sent data set, in the sent transfer syntax, pixel data as sent."""
    by_uid = {i.sop_uid: i for i in stored_instances(node, uid_of(sent[0]))}
    assert len(by_uid) == len(sent)
    for path in sent:
        original = dcmread(path)
        instance = by_uid[str(original.SOPInstanceUID)]
        syntax = str(original.file_meta.TransferSyntaxUID)
        assert instance.transfer_syntax_uid == syntax
        stored = dcmread(instance.path)
        assert str(stored.file_meta.TransferSyntaxUID) == syntax
        assert stored.PixelData == original.PixelData  # compressed bytes not re-encoded
        assert Dataset(stored) == Dataset(original)
    audited = {e.sop_uid for e in events(node, "instance.stored")}
    assert set(by_uid) <= audited


# -- compressed transfer syntaxes ---------------------------------------------------------------
GENERATED_SYNTAXES = {
    "jpeg-baseline": "1.2.840.10008.1.2.4.50",
    "jpeg-extended-12bit": "1.2.840.10008.1.2.4.51",
    "jpeg-lossless-p14": "1.2.840.10008.1.2.4.57",
    "jpeg-lossless-sv1": "1.2.840.10008.1.2.4.70",
    "jpeg-ls-lossless": "1.2.840.10008.1.2.4.80",
    "jpeg-ls-near-lossless": "1.2.840.10008.1.2.4.81",
    "j2k-lossless": "1.2.840.10008.1.2.4.90",
    "j2k-lossy": "1.2.840.10008.1.2.4.91",
    "rle": "1.2.840.10008.1.2.5",
}
LOSSY = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
         "1.2.840.10008.1.2.4.91"}


@pytest.mark.parametrize("name", list(GENERATED_SYNTAXES))
def test_compressed_series_stored_as_sent_and_decodable(
        name: str, tmp_path: Path, quiet_node: Node) -> None:
    syntax = GENERATED_SYNTAXES[name]
    source = uncompressed_series(tmp_path / "plain", 4, seed=100)
    if syntax == "1.2.840.10008.1.2.4.50":
        source = to_8bit(source, tmp_path / "plain8")
    files = compress_series(source, syntax, tmp_path / name)
    assert send(files, quiet_node.receiver.port) == [dimse_status.SUCCESS] * len(files)
    assert_stored_unchanged(quiet_node, files)

    paths = [Path(i.path) for i in stored_instances(quiet_node, uid_of(files[0]))]
    selection = select_series(paths, SelectionConfig(min_slices=4))
    assert selection.accepted, selection.reason
    volume = load_volume(selection.slices)
    expected = np.stack([dcmread(p).pixel_array for p in source]).astype(np.float32)
    assert volume.pixels.shape == expected.shape
    if syntax in LOSSY:
        assert float(np.mean(np.abs(volume.pixels - expected))) < 0.05 * float(expected.max())
    else:
        np.testing.assert_array_equal(volume.pixels, expected)
    assert_keeps_serving(quiet_node, tmp_path)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "MR_small_implicit.dcm"])
def test_vendor_compressed_series_stored_as_sent_and_decodable(
        name: str, tmp_path: Path, quiet_node: Node) -> None:
    files = vendor_series(name, tmp_path / "vendor", 4, seed=101)
    assert send(files, quiet_node.receiver.port) == [dimse_status.SUCCESS] * len(files)
    assert_stored_unchanged(quiet_node, files)
    paths = [Path(i.path) for i in stored_instances(quiet_node, uid_of(files[0]))]
    selection = select_series(paths, SelectionConfig(min_slices=4))
    assert selection.accepted, selection.reason
    volume = load_volume(selection.slices)
    reference = dcmread(vendor_file("MR_small.dcm"))
    expected = reference.pixel_array.astype(np.float32) * float(
        reference.get("RescaleSlope", 1) or 1) + float(reference.get("RescaleIntercept", 0) or 0)
    for plane in volume.pixels:
        np.testing.assert_array_equal(plane, expected)
    assert_keeps_serving(quiet_node, tmp_path)


def test_compressed_series_from_dcmtk_is_processed_end_to_end(
        tmp_path: Path, node: Node) -> None:
    """A foreign sender (storescu) with JPEG-LS files: stored as sent, series processed."""
    source = uncompressed_series(tmp_path / "plain", 5, seed=102)
    files = compress_series(source, "1.2.840.10008.1.2.4.80", tmp_path / "jls")
    binary = require_tool("storescu")
    result = subprocess.run(  # -xt: propose JPEG-LS lossless (storescu does not by default)
        [binary, "-xt", "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1",
         str(node.receiver.port), *map(str, files)], capture_output=True, text=True,
        env={**os.environ, "TCP_NODELAY": "1"}, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert_stored_unchanged(node, files)
    state, reason = finished_reason(node, uid_of(files[0]))
    assert state == "done", reason
    assert_keeps_serving(node, tmp_path)


# -- big endian, Enhanced MR ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm"])
def test_big_endian_series_accepted_decoded_and_processed(
        name: str, tmp_path: Path, node: Node) -> None:
    files = vendor_series(name, tmp_path / "be", 4, seed=103)
    assert str(dcmread(files[0]).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.2"
    assert send(files, node.receiver.port) == [dimse_status.SUCCESS] * len(files)
    assert_stored_unchanged(node, files)
    paths = [Path(i.path) for i in stored_instances(node, uid_of(files[0]))]
    volume = load_volume(select_series(paths, node.config.selection).slices)
    expected = dcmread(vendor_file("MR_small.dcm")).pixel_array.astype(np.float32)
    np.testing.assert_array_equal(volume.pixels[0], expected)  # byte order handled
    state, reason = finished_reason(node, uid_of(files[0]))
    assert state == "done", reason
    assert_keeps_serving(node, tmp_path)


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm"])
def test_enhanced_mr_multiframe_without_geometry_skipped_with_reason(
        name: str, tmp_path: Path, node: Node) -> None:
    """The vendor files as they are: no plane geometry anywhere, so nothing to place."""
    path = vendor_enhanced_mr(name, tmp_path / "emr", seed=104)
    assert send([path], node.receiver.port) == [dimse_status.SUCCESS]
    assert_stored_unchanged(node, [path])
    state, reason = finished_reason(node, uid_of(path))
    assert state == "skipped", reason
    assert "geometry missing" in reason and "ImagePositionPatient" in reason
    assert_keeps_serving(node, tmp_path)


@pytest.mark.parametrize("name", ["emri_small_RLE.dcm", "emri_small_big_endian.dcm",
                                  "emri_small_jpeg_2k_lossless.dcm"])
def test_enhanced_mr_multiframe_with_geometry_processed(
        name: str, tmp_path: Path, node: Node) -> None:
    """Functional groups added: one slice per frame, processed like a single-frame series."""
    path = vendor_enhanced_mr(name, tmp_path / "emr", seed=117, with_geometry=True)
    assert send([path], node.receiver.port) == [dimse_status.SUCCESS]
    assert_stored_unchanged(node, [path])
    stored = Path(stored_instances(node, uid_of(path))[0].path)
    selection = select_series([stored], node.config.selection)
    assert selection.accepted and len(selection.slices) == 10, selection.reason
    volume = load_volume(selection.slices)
    np.testing.assert_array_equal(volume.pixels, dcmread(path).pixel_array.astype(np.float32))
    state, reason = finished_reason(node, uid_of(path))
    assert state == "done", reason
    assert detail(events(node, "job.finish", series_uid=uid_of(path))[-1])["result"] == "done"
    assert_keeps_serving(node, tmp_path)


# -- broken pixel data ---------------------------------------------------------------------
def _broken_series(kind: str, tmp_path: Path) -> tuple[list[Path], bool]:
    """(files, send raw): a 5-slice series with one bad slice, or a vendor broken file."""
    files = uncompressed_series(tmp_path / "series", 5, seed=105)
    if kind == "missing":
        files[2] = rewrite(files[2], tmp_path / "bad" / files[2].name, PixelData=None)
        return files, False
    if kind == "truncated-value":  # a well-formed element that holds half the pixels
        half = dcmread(files[2]).PixelData[:64 * 64]
        files[2] = rewrite(files[2], tmp_path / "bad" / files[2].name, PixelData=half)
        return files, False
    if kind == "truncated-file":  # the stream ends inside the Pixel Data value
        data = files[2].read_bytes()
        target = tmp_path / "bad" / files[2].name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[: len(data) - 3000])
        files[2] = target
        return files, True
    if kind == "vendor-truncated":  # pydicom-data MR_truncated.dcm: short pixel data
        return vendor_series("MR_truncated.dcm", tmp_path / "vendor", 5, seed=106), False
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing", "truncated-value", "truncated-file",
                                  "vendor-truncated"])
def test_missing_or_truncated_pixel_data_fails_the_series_with_reason(
        kind: str, tmp_path: Path, node: Node) -> None:
    files, raw = _broken_series(kind, tmp_path)
    statuses = send(files, node.receiver.port, raw=raw)
    series_uid = uid_of(files[0])
    stored = {i.sop_uid for i in stored_instances(node, series_uid)}
    refused = events(node, "instance.refused")
    for path, status in zip(files, statuses, strict=True):
        sop_uid = uid_of(path, "SOPInstanceUID")
        if status == dimse_status.SUCCESS:
            assert sop_uid in stored
        else:  # refusing a broken instance is allowed, but as a failure, and audited
            assert (status & 0xF000) in (0xA000, 0xC000), hex(status)
            assert sop_uid not in stored
            assert refused, "refused instance not audited"
    if stored:
        state, reason = finished_reason(node, series_uid)
        assert state in ("failed", "skipped"), f"{state}: {reason}"
        assert "pixel" in reason.lower() or "truncat" in reason.lower(), reason
        if state == "failed":
            assert events(node, "job.fail", series_uid=series_uid)
    assert_keeps_serving(node, tmp_path)


# -- series that selection must skip -------------------------------------------------------------
def test_inconsistent_matrix_sizes_skipped(tmp_path: Path, node: Node) -> None:
    big = uncompressed_series(tmp_path / "64", 6, seed=107)
    small = uncompressed_series(tmp_path / "32", 8, seed=108, rows=32, columns=32)
    head = dcmread(big[0], stop_before_pixels=True)
    mixed = list(big)
    for path in small[6:]:  # slices 7 and 8 continue the series at the next positions
        mixed.append(rewrite(path, tmp_path / "mixed" / path.name,
                             StudyInstanceUID=head.StudyInstanceUID,
                             SeriesInstanceUID=head.SeriesInstanceUID,
                             FrameOfReferenceUID=head.FrameOfReferenceUID))
    assert send(mixed, node.receiver.port) == [dimse_status.SUCCESS] * len(mixed)
    assert len(stored_instances(node, str(head.SeriesInstanceUID))) == len(mixed)
    state, reason = finished_reason(node, str(head.SeriesInstanceUID))
    assert state == "skipped"
    assert "inconsistent matrix sizes" in reason
    assert_keeps_serving(node, tmp_path)


def test_one_slice_series_skipped_for_min_slices(tmp_path: Path, node: Node) -> None:
    files = uncompressed_series(tmp_path / "one", 1, seed=109)
    assert send(files, node.receiver.port) == [dimse_status.SUCCESS]
    state, reason = finished_reason(node, uid_of(files[0]))
    assert state == "skipped"
    assert "min_slices" in reason
    assert_keeps_serving(node, tmp_path)


# -- duplicate SOP Instance UIDs -----------------------------------------------------------
def test_duplicate_sop_instance_uid_replaces_and_is_audited(
        tmp_path: Path, quiet_node: Node) -> None:
    files = uncompressed_series(tmp_path / "first", 4, seed=110)
    assert send(files, quiet_node.receiver.port) == [dimse_status.SUCCESS] * 4
    original = dcmread(files[1])
    changed = np.asarray(original.pixel_array, dtype=np.uint16) // 2
    again = rewrite(files[1], tmp_path / "again" / files[1].name, PixelData=changed.tobytes(),
                    SeriesDescription=T1C_DESCRIPTION + " resent")
    status = send([again], quiet_node.receiver.port)[0]
    sop_uid = str(original.SOPInstanceUID)
    series_uid = str(original.SeriesInstanceUID)
    instances = stored_instances(quiet_node, series_uid)
    audited = events(quiet_node, "instance.stored", sop_uid=sop_uid)
    if status == dimse_status.SUCCESS:  # the later one replaces the earlier
        assert len(instances) == 4
        assert series_row(quiet_node, series_uid).instance_count == 4  # type: ignore[union-attr]
        kept = dcmread(next(i.path for i in instances if i.sop_uid == sop_uid))
        assert kept.PixelData == changed.tobytes()
        assert [detail(e)["replaced"] for e in audited] == [False, True]
    else:  # or it is refused as a duplicate, and the refusal is audited
        assert status == dimse_status.DUPLICATE_SOP_INSTANCE, hex(status)
        assert events(quiet_node, "instance.refused")
    assert_keeps_serving(quiet_node, tmp_path)




def test_duplicate_sop_instance_uid_in_another_series_moves_or_is_refused(
        tmp_path: Path, quiet_node: Node) -> None:
    """The same SOP Instance UID re-sent under another series UID (a re-labelled series).

    The node moves the instance: its row, file and count now belong to the new series.
    """
    files = uncompressed_series(tmp_path / "first", 4, seed=111)
    assert send(files, quiet_node.receiver.port) == [dimse_status.SUCCESS] * 4
    old_series = uid_of(files[0])
    sop_uid = uid_of(files[0], "SOPInstanceUID")
    old_path = Path(next(i.path for i in stored_instances(quiet_node, old_series)
                         if i.sop_uid == sop_uid))
    assert old_path.is_file()
    new_series = generate_uid(entropy_srcs=["relabelled", "111"])
    moved = rewrite(files[0], tmp_path / "moved" / files[0].name, SeriesInstanceUID=new_series)
    assert send([moved], quiet_node.receiver.port) == [dimse_status.SUCCESS]

    # the instance row belongs to the new series only, and the counts follow
    in_new = stored_instances(quiet_node, new_series)
    assert [i.sop_uid for i in in_new] == [sop_uid]
    assert sop_uid not in {i.sop_uid for i in stored_instances(quiet_node, old_series)}
    assert len(stored_instances(quiet_node, old_series)) == 3
    assert series_row(quiet_node, new_series).instance_count == 1  # type: ignore[union-attr]
    assert series_row(quiet_node, old_series).instance_count == 3  # type: ignore[union-attr]
    with quiet_node.sessions() as session:
        assert len(session.scalars(select(Instance).where(Instance.sop_uid == sop_uid)).all()) == 1
    # only the new file exists: the old one was deleted from the store
    new_path = Path(in_new[0].path)
    assert new_path != old_path and new_path.is_file() and not old_path.exists()
    assert new_path.parent.name == new_series
    assert list(quiet_node.config.store_dir.rglob(f"{sop_uid}.dcm")) == [new_path]
    assert uid_of(new_path) == new_series
    assert dcmread(new_path).PixelData == dcmread(moved).PixelData
    for instance in stored_instances(quiet_node, old_series):
        assert uid_of(Path(instance.path)) == old_series
    # audited: first stored, then stored again as a replacement moved from the old series
    audited = [detail(e) for e in events(quiet_node, "instance.stored", sop_uid=sop_uid)]
    assert [d["replaced"] for d in audited] == [False, True]
    assert "moved_from_series" not in audited[0]
    assert audited[-1]["moved_from_series"] == old_series
    moved_event = events(quiet_node, "instance.stored", sop_uid=sop_uid)[-1]
    assert moved_event.series_uid == new_series
    assert not events(quiet_node, "instance.refused")
    assert_keeps_serving(quiet_node, tmp_path)


# -- UIDs that are not UIDs ----------------------------------------------------------------
# An over-long SOP Instance UID is left out: pynetdicom refuses to send it (the command
# set's Affected SOP Instance UID is validated), so no sender in the test can deliver it.
BAD_UIDS: dict[str, dict[str, str]] = {
    "sop-path-traversal": {"SOPInstanceUID": "../../etc/passwd"},
    "study-path-traversal": {"StudyInstanceUID": "1.2.3/../../x"},
    "series-path-traversal": {"SeriesInstanceUID": "1.2.3/../../../../tmp/y"},
    "sop-dotdot": {"SOPInstanceUID": ".."},
    "series-letters": {"SeriesInstanceUID": "1.2.abc"},
    "study-too-long": {"StudyInstanceUID": "1." + "2" * 70},
    "study-backslash": {"StudyInstanceUID": "1.2\\..\\..\\z"},
}


def _files_outside(root: Path, store: Path) -> set[Path]:
    """Every file under root that is not under store, except the node's own database."""
    return {p for p in root.rglob("*") if p.is_file() and store not in p.parents
            and ".db" not in p.name and ".sqlite" not in p.name}


@pytest.mark.parametrize("case", list(BAD_UIDS))
def test_invalid_uid_refused_nothing_written_and_audited(
        case: str, tmp_path: Path, quiet_node: Node) -> None:
    assert len(BAD_UIDS["study-too-long"]["StudyInstanceUID"]) == 72
    store = quiet_node.config.store_dir
    passwd = Path("/etc/passwd")
    passwd_before = (passwd.stat().st_mtime_ns, passwd.read_bytes())
    good = uncompressed_series(tmp_path / "good", 1, seed=112)[0]
    with lax_uid_validation():
        bad = rewrite(good, tmp_path / "bad" / "bad.dcm", **BAD_UIDS[case])
        (value,) = BAD_UIDS[case].values()
        assert value.encode() in bad.read_bytes()  # sent as written (a backslash splits values)
        before = _files_outside(tmp_path, store)
        store_before = {p for p in store.rglob("*") if p.is_file()} if store.exists() else set()
        status = send([bad], quiet_node.receiver.port)[0]
    assert status == dimse_status.CANNOT_UNDERSTAND, hex(status)
    # nothing written: not in the store, not beside it, not where the path points
    store_after = {p for p in store.rglob("*") if p.is_file()} if store.exists() else set()
    assert store_after == store_before
    assert _files_outside(tmp_path, store) == before
    assert (passwd.stat().st_mtime_ns, passwd.read_bytes()) == passwd_before
    assert not Path("/tmp/y").exists() or not list(Path("/tmp/y").rglob("*.dcm"))
    with quiet_node.sessions() as session:
        assert session.scalars(select(Instance)).all() == []
        assert session.scalars(select(Series)).all() == []
    refused = events(quiet_node, "instance.refused")
    assert len(refused) == 1 and refused[0].outcome == "error"
    assert "not a valid DICOM UID" in refused[0].detail
    assert not events(quiet_node, "instance.stored")
    assert_keeps_serving(quiet_node, tmp_path)


# -- non-ASCII patient names ---------------------------------------------------------------
NAMES: dict[str, tuple[str | list[str], str]] = {
    "utf8": ("ISO_IR 192", "Müller^Jürgen"),
    "latin1": ("ISO_IR 100", "Müller^Jürgen"),
    "japanese-jis": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
}
SC_CLASSES = ("1.2.840.10008.5.1.4.1.1.7",)  # Secondary Capture and its multi-frame kinds
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASSES = "1.2.840.10008.5.1.4.1.1.88."
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


@pytest.mark.parametrize("case", list(NAMES))
def test_non_ascii_patient_name_kept_in_outputs(
        case: str, tmp_path: Path, make_config: Callable[..., NodeConfig],
        start_node: Callable[[NodeConfig], Node], pynetdicom_pacs: PynetdicomPacs) -> None:
    """The name arrives in its own character set; outputs (ISO_IR 192) carry it decoded."""
    charset, name = NAMES[case]
    node = start_node(make_config(
        selection={"min_slices": 4},
        destinations=[{"name": "pacs", "ae_title": pynetdicom_pacs.ae_title,
                       "host": "127.0.0.1", "port": pynetdicom_pacs.port}]))
    plain = uncompressed_series(tmp_path / "plain", 4, seed=113)
    files = [rewrite(p, tmp_path / case / p.name, SpecificCharacterSet=charset, PatientName=name)
             for p in plain]
    sent = dcmread(files[0])
    assert str(sent.PatientName) == name
    if case != "utf8":  # really encoded in the named character set, not in UTF-8
        assert name.encode("utf-8") not in files[0].read_bytes()
    assert send(files, node.receiver.port) == [dimse_status.SUCCESS] * len(files)
    assert_stored_unchanged(node, files)
    state, reason = finished_reason(node, uid_of(files[0]), 120)
    assert state == "done", reason
    assert wait_for(lambda: len(pynetdicom_pacs.received.files()) >= len(files) + 3, 120)
    outputs = [dcmread(p) for p in pynetdicom_pacs.received.files()]
    classes = [str(ds.SOPClassUID) for ds in outputs]
    assert sum(c.startswith(SC_CLASSES) for c in classes) == len(files), classes
    assert classes.count(SEG_CLASS) == 1, classes
    assert classes.count(KOS_CLASS) == 1, classes
    assert sum(c.startswith(SR_CLASSES) and c != KOS_CLASS for c in classes) == 1, classes
    for ds in outputs:
        assert str(ds.PatientName) == name, (ds.SOPClassUID.name, ds.get("SpecificCharacterSet"))
        assert ds.get("SpecificCharacterSet") == "ISO_IR 192", ds.SOPClassUID.name
    result = validate_dicom(pynetdicom_pacs.received.folder)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_keeps_serving(node, tmp_path)


# -- a large instance ------------------------------------------------------------------------
LARGE_ROWS = LARGE_COLUMNS = 5000  # 16-bit: 50 MB of pixel data


@pytest.fixture
def large_instance(tmp_path: Path) -> Path:
    source = uncompressed_series(tmp_path / "seed", 1, seed=114)[0]
    return big_instance(source, tmp_path / "large" / "large.dcm", LARGE_ROWS, LARGE_COLUMNS, 114)


def test_large_instance_stored_intact(tmp_path: Path, quiet_node: Node,
                                      large_instance: Path) -> None:
    """A 50 MB instance from DCMTK storescu is stored byte for byte, its size audited."""
    result = storescu([large_instance], quiet_node.receiver.port)
    assert result.returncode == 0, result.stderr
    sop_uid = uid_of(large_instance, "SOPInstanceUID")
    with quiet_node.sessions() as session:
        instance = session.scalars(select(Instance).where(Instance.sop_uid == sop_uid)).one()
    sent, stored = dcmread(large_instance), dcmread(instance.path)
    assert len(stored.PixelData) == LARGE_ROWS * LARGE_COLUMNS * 2
    assert hashlib.sha256(stored.PixelData).digest() == hashlib.sha256(sent.PixelData).digest()
    assert Dataset(stored) == Dataset(sent)
    assert instance.size_bytes == Path(instance.path).stat().st_size
    audited = events(quiet_node, "instance.stored", sop_uid=sop_uid)
    assert len(audited) == 1 and detail(audited[0])["bytes"] == instance.size_bytes
    assert not list(quiet_node.config.store_dir.rglob(".tmp-*"))
    assert_keeps_serving(quiet_node, tmp_path)


def test_large_instance_is_streamed_to_disk_not_buffered(
        tmp_path: Path, quiet_node: Node, large_instance: Path) -> None:
    """The node receives C-STORE data sets in chunks to a file, not in memory.

    The Python heap peak of this process (the node; the sender is DCMTK storescu,
    another process) while it receives a 50 MB instance stays well below its size.
    """
    assert _config.STORE_RECV_CHUNKED_DATASET is True
    seen: list[tuple[Path | None, int]] = []  # (streamed file, its size) per C-STORE
    handle_store = quiet_node.receiver.handle_store

    def spy(event: evt.Event) -> int:
        path = getattr(event.request, "_dataset_path", None)
        seen.append((Path(path), Path(path).stat().st_size) if path is not None else (None, 0))
        return handle_store(event)

    server = quiet_node.receiver._server
    assert server is not None
    server.bind(evt.EVT_C_STORE, spy)
    size = large_instance.stat().st_size
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = storescu([large_instance], quiet_node.receiver.port)  # a separate process
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.returncode == 0, result.stderr
    assert len(seen) == 1, seen
    streamed, streamed_size = seen[0]
    assert streamed is not None, "data set not streamed to a file"
    assert streamed_size >= LARGE_ROWS * LARGE_COLUMNS * 2  # all of it, on disk
    assert not streamed.exists()  # renamed into the store, not left behind
    stored = stored_instances(quiet_node, uid_of(large_instance))
    assert len(stored) == 1 and Path(stored[0].path).stat().st_size >= size - 1024
    assert peak < 20 * 1024 * 1024, \
        f"heap peak {peak / 1e6:.1f} MB while receiving {size / 1e6:.0f} MB"
    assert_keeps_serving(quiet_node, tmp_path)


# -- a sender that aborts ------------------------------------------------------------------
def test_sender_abort_mid_association_keeps_what_arrived(
        tmp_path: Path, quiet_node: Node) -> None:
    files = uncompressed_series(tmp_path / "series", 6, seed=115)
    statuses = send(files, quiet_node.receiver.port, abort_after=3)
    assert statuses == [dimse_status.SUCCESS] * 3
    assert wait_for(lambda: bool(events(quiet_node, "association.abort")), 10)
    series_uid = uid_of(files[0])
    stored = stored_instances(quiet_node, series_uid)
    assert sorted(i.sop_uid for i in stored) == sorted(
        uid_of(p, "SOPInstanceUID") for p in files[:3])
    by_uid = {uid_of(p, "SOPInstanceUID"): p for p in files}
    for instance in stored:  # intact: the whole data set as sent
        original = dcmread(by_uid[instance.sop_uid])
        kept = dcmread(instance.path)
        assert kept.PixelData == original.PixelData
        assert Dataset(kept) == Dataset(original)
    store = quiet_node.config.store_dir
    assert not list(store.rglob(".tmp-*")) and not list(store.rglob("*.part"))
    assert len([p for p in store.rglob("*.dcm")]) == 3
    assert series_row(quiet_node, series_uid).instance_count == 3  # type: ignore[union-attr]
    abort = events(quiet_node, "association.abort")
    assert len(abort) == 1
    assert abort[0].outcome == "warning" and "TESTSCU" in (abort[0].peer or "")
    association_id = stored[0].association_id
    assert association_id is not None
    assert {i.association_id for i in stored} == {association_id}
    with quiet_node.sessions() as session:
        row = session.get(AssociationRow, association_id)
        assert row is not None and row.state == "aborted" and row.closed_at is not None
    assert_keeps_serving(quiet_node, tmp_path)


def _pdu(kind: int, body: bytes) -> bytes:
    return bytes([kind, 0]) + len(body).to_bytes(4, "big") + body


def _item(kind: int, body: bytes) -> bytes:
    return bytes([kind, 0]) + len(body).to_bytes(2, "big") + body


def _associate_rq(calling: str, called: str, sop_class: str, syntax: str,
                  max_pdu: int) -> bytes:
    """A-ASSOCIATE-RQ with one presentation context (id 1), PS3.8 9.3.2, by hand."""
    context = bytes([1, 0, 0, 0]) + _item(0x30, sop_class.encode()) + _item(
        0x40, syntax.encode())
    user = _item(0x51, max_pdu.to_bytes(4, "big")) + _item(0x52, b"1.2.826.0.1.3680043.9.9")
    body = (b"\x00\x01\x00\x00" + called.ljust(16).encode() + calling.ljust(16).encode()
            + b"\x00" * 32 + _item(0x10, b"1.2.840.10008.3.1.1.1") + _item(0x20, context)
            + _item(0x50, user))
    return _pdu(0x01, body)


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("peer closed the connection")
            data += chunk
        return data

    header = exactly(6)
    return header[0], exactly(int.from_bytes(header[2:6], "big"))


def _abort_mid_instance(node: Node, tmp_path: Path, seed: int, sent_pdus: int = 20) -> str:
    """Send ``sent_pdus`` of the ~125 P-DATA PDUs of one 8 MB instance, then A-ABORT.

    A raw socket sender (association request and PDUs encoded here and by pynetdicom's
    DIMSE message encoder), so the abort falls exactly between two PDUs of the data set.
    Returns the instance's SOP Instance UID, once the node has audited the abort.
    """
    source = uncompressed_series(tmp_path / f"seed-{seed}", 1, seed=seed)[0]
    big = big_instance(source, tmp_path / f"big-{seed}" / "big.dcm", 2000, 2000, seed)  # 8 MB
    sop_uid = uid_of(big, "SOPInstanceUID")
    sop_class = uid_of(big, "SOPClassUID")
    syntax = "1.2.840.10008.1.2.1"
    assert str(dcmread(big, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    # the C-STORE-RQ as P-DATA-TF PDUs of at most the node's maximum PDU length
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_uid
    request.Priority = 2
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset_without_meta(big))
    request.DataSet = BytesIO(buffer.getvalue())
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    max_pdu = node.config.receiver.max_pdu_bytes
    pdus = []
    for primitive in message.encode_msg(1, max_pdu):
        body = b""
        for context_id, data in primitive.presentation_data_value_list:  # PDV items
            body += (len(data) + 1).to_bytes(4, "big") + bytes([context_id]) + data
        pdus.append(_pdu(0x04, body))
    assert 100 <= len(pdus) <= 160, len(pdus)
    aborts = len(events(node, "association.abort"))
    with socket.create_connection(("127.0.0.1", node.receiver.port), timeout=10) as sock:
        sock.sendall(_associate_rq("TESTSCU", "DICOMNODE", sop_class, syntax, max_pdu))
        kind, _ = _read_pdu(sock)
        assert kind == 0x02, f"association not accepted (PDU type {kind:#x})"
        for pdu in pdus[:sent_pdus]:
            sock.sendall(pdu)
        sock.sendall(_pdu(0x07, b"\x00\x00\x00\x00"))  # A-ABORT, source: service user
        assert wait_for(lambda: len(events(node, "association.abort")) > aborts, 10)
    return sop_uid


def test_sender_abort_between_pdus_of_one_instance(tmp_path: Path, quiet_node: Node) -> None:
    """A-ABORT after 20 of the ~125 P-DATA PDUs of one 8 MB instance: nothing of it is kept."""
    sop_uid = _abort_mid_instance(quiet_node, tmp_path, seed=116)
    abort = events(quiet_node, "association.abort")
    assert len(abort) == 1 and abort[0].outcome == "warning"
    with quiet_node.sessions() as session:
        assert session.scalars(select(Instance).where(Instance.sop_uid == sop_uid)).all() == []
        assert session.scalars(select(Series)).all() == []
        rows = session.scalars(select(AssociationRow)).all()
        assert [r.state for r in rows] == ["aborted"]
    assert not events(quiet_node, "instance.stored", sop_uid=sop_uid)
    assert not events(quiet_node, "instance.refused")
    store = quiet_node.config.store_dir
    assert not list(store.rglob(".tmp-*")) and not list(store.rglob("*.part"))
    assert not list(store.rglob(f"{sop_uid}.dcm"))
    assert_keeps_serving(quiet_node, tmp_path)


def test_sender_abort_mid_instance_leaves_no_temporary_file(
        tmp_path: Path, quiet_node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing of an aborted instance is left anywhere, the system temp directory included."""
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    sop_uid = _abort_mid_instance(quiet_node, tmp_path, seed=118)
    assert not list(quiet_node.config.store_dir.rglob(f"{sop_uid}.dcm"))
    assert_keeps_serving(quiet_node, tmp_path)  # a whole instance: its temp file is renamed
    assert wait_for(lambda: not any(system_tmp.iterdir()), 5), \
        [f"{p.name}: {p.stat().st_size} bytes" for p in system_tmp.iterdir()]
