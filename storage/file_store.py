"""The file store: received instances and outputs on disk, written atomically.

Layout under ``store_dir``::

    incoming/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm   received, raw bytes as sent
    outputs/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm    written by the node

Every UID is checked against ``^[0-9.]{1,64}$`` before it becomes a path component,
so a UID that looks like a path cannot escape the store.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class InvalidUID(ValueError):
    """A UID that is not a valid DICOM UID (and must not become a path)."""


def check_uid(uid: str, what: str = "UID") -> str:
    if not isinstance(uid, str) or len(uid) > 64 or not UID_RE.match(uid):
        raise InvalidUID(f"{what} {uid!r} is not a valid DICOM UID")
    return uid


@contextmanager
def atomic_writer(path: Path, sync: bool = True,
                  mode: int | None = None) -> Iterator[BinaryIO]:
    """A binary handle on a temporary file beside ``path``; on success it is fsynced
    (unless ``sync`` is false) and renamed over ``path``, on an exception removed.
    Readers never see a partial file. The file is private (0600, as ``mkstemp`` makes
    it) unless ``mode`` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes | bytearray | memoryview, sync: bool = True) -> None:
    """Write bytes to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, sync) as handle:
        handle.write(data)


def atomic_move(source: Path, path: Path, sync: bool = True) -> None:
    """Rename ``source`` to ``path`` (made durable first unless ``sync`` is false: then the
    caller fsyncs later, see :func:`fsync_file`); copy in chunks across filesystems."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if sync:
        fsync_file(source)
    try:
        os.replace(source, path)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    with atomic_writer(path, sync) as out, source.open("rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)


def fsync_file(path: Path) -> bool:
    """Flush a file's data to disk; False if it is gone (replaced or deleted meanwhile)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def unchanged_for(path: Path, seconds: float) -> bool:
    """Was ``path`` last changed at least ``seconds`` ago? (False if it is gone.)"""
    try:
        return path.stat().st_mtime <= time.time() - seconds
    except FileNotFoundError:  # renamed or removed by its writer meanwhile
        return False


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.outputs = root / "outputs"

    def incoming_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.incoming / check_uid(study_uid, "StudyInstanceUID") / check_uid(
            series_uid, "SeriesInstanceUID") / f"{check_uid(sop_uid, 'SOPInstanceUID')}.dcm"

    def output_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.outputs / check_uid(study_uid, "StudyInstanceUID") / check_uid(
            series_uid, "SeriesInstanceUID") / f"{check_uid(sop_uid, 'SOPInstanceUID')}.dcm"

    def remove_partials(self, older_than_s: float = 0.0, under: Path | None = None) -> int:
        """Delete temporary files left by a crash mid-write (under ``under``, default the
        whole store); return how many. With ``older_than_s``, only those unchanged for
        that long (on a shared store, a newer one may be another node's, being written)."""
        count = 0
        for part in (under or self.root).rglob(".tmp-*.part"):
            if older_than_s > 0 and not unchanged_for(part, older_than_s):
                continue
            part.unlink(missing_ok=True)
            count += 1
        return count
