"""Deterministic output UIDs.

An output's UID is derived from what it was made from: the source instances, the
model weights' sha256, the series version, the output kind and its index. Running
the same series through the same model again yields the same UIDs, so a re-run or a
re-send replaces, never duplicates; a new version (late arrival) or new weights
yield new UIDs. Tracking UIDs (:func:`tracking_uid`) are the exception: they name a
finding, not an object, and stay the same across versions and models.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from pydicom.uid import UID


def source_fingerprint(source_sop_uids: Iterable[str]) -> str:
    """One digest of the (sorted) source SOP Instance UIDs."""
    digest = hashlib.sha256()
    for uid in sorted(source_sop_uids):
        digest.update(uid.encode("ascii"))
        digest.update(b"\0")
    return digest.hexdigest()


def hashed_uid(*parts: str) -> UID:
    """A 2.25 UID (PS3.5 B.2) from the first 128 bits of sha256 over the parts."""
    digest = hashlib.sha256("\0".join(parts).encode("utf-8")).digest()
    return UID(f"2.25.{int.from_bytes(digest[:16], 'big')}")


def derive_uid(fingerprint: str, weights_sha256: str, version: int, kind: str,
               index: int = 0) -> UID:
    """The UID of one output, from what it was made from."""
    return hashed_uid(fingerprint, weights_sha256, str(version), kind, str(index))


def tracking_uid(study_uid: str, source_series_uid: str, region: str) -> UID:
    """The Tracking Unique Identifier of a region ("lesion-<n>" or "background") of a
    source series: from the study, the source series and the region's label only, not
    the model, its weights or the series version, so a re-run with another model or a
    later version of the series gives lesion n the same UID. The SEG segment and both
    SRs carry it. "Same lesion" means same number: lesions are numbered in the order the
    analysis ranks them (hottest first), so the UID follows the number, not the tissue."""
    return hashed_uid("tracking", study_uid, source_series_uid, region)
