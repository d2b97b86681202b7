"""Finding a series or study from the tail of its UID, as the CLI's listings print it.

The admin copies the end of a UID from ``dicom-node audit``, ``outbox`` or the log
(``...1.2.826.0.1.3680043.8.498.123``): a unique suffix names the UID; a suffix that
several UIDs end in is refused with the candidates, never guessed. A full UID that is
known is taken as it is, even if it is also the tail of longer ones.
"""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import InstrumentedAttribute, Session

from dicom_node.errors import RequestRefused
from storage.models import AuditEvent, OutputInstance, Series

_TAIL = re.compile(r"^[0-9.]{1,64}$")

#: Candidates named in a refusal of an ambiguous tail.
SHOWN_CANDIDATES = 10


def _clean(tail: str, what: str) -> str:
    tail = tail.strip()
    tail = tail.removeprefix("...")  # the log writes tails as ...<digits>
    if not _TAIL.match(tail):
        raise RequestRefused(f"{what} {tail!r} is not a UID or the tail of one "
                             "(digits and dots)")
    return tail


def _ending(session: Session, column: InstrumentedAttribute[str], tail: str) -> set[str]:
    return set(session.scalars(select(column).where(
        column.endswith(tail, autoescape=True)).distinct()).all())


def _one(tail: str, found: set[str], what: str, where: str) -> str:
    if tail in found:
        return tail
    if len(found) == 1:
        return found.pop()
    if not found:
        raise RequestRefused(f"no {what} UID {where} ends in {tail!r}")
    shown = sorted(found)[:SHOWN_CANDIDATES]
    more = f" and {len(found) - len(shown)} more" if len(found) > len(shown) else ""
    raise RequestRefused(f"{what} UID tail {tail!r} is ambiguous: {len(found)} UIDs end in it "
                         f"({', '.join(shown)}{more}); give more of the UID")


def resolve_series_uid(session: Session, tail: str, *, outputs: bool = False,
                       audited: bool = False) -> str:
    """The one Series Instance UID ending in ``tail``: among the series the node received,
    with ``outputs`` also the series it wrote, and with ``audited`` (only if neither has
    it) any series the audit log names (say one whose instances were all refused)."""
    tail = _clean(tail, "series")
    found = _ending(session, Series.series_uid, tail)
    if outputs:
        found |= _ending(session, OutputInstance.series_uid, tail)
    if not found and audited:
        found = _ending(session, AuditEvent.series_uid, tail) - {""}
    return _one(tail, found, "series", "received or written by the node" if outputs
                else "received by the node")


def resolve_study_uid(session: Session, tail: str, *, audited: bool = False) -> str:
    """The one Study Instance UID ending in ``tail`` among the received series (and with
    ``audited``, only if none has it, among the studies the audit log names)."""
    tail = _clean(tail, "study")
    found = _ending(session, Series.study_uid, tail)
    if not found and audited:
        found = _ending(session, AuditEvent.study_uid, tail) - {""}
    return _one(tail, found, "study", "received by the node")


def find_series(session: Session, tail: str) -> Series:
    """The received series whose UID ends in ``tail`` (for reprocess and discard)."""
    uid = resolve_series_uid(session, tail)
    series = session.scalars(select(Series).where(Series.series_uid == uid)).one()
    return series


def with_outputs(session: Session, series_uid: str) -> set[str]:
    """The series and the output series the node wrote from it (every version)."""
    return {series_uid, *session.scalars(
        select(OutputInstance.series_uid).join(Series, Series.id == OutputInstance.source_series_id)
        .where(Series.series_uid == series_uid).distinct()).all()}


def accession_numbers(session: Session, series_uids: set[str]) -> dict[str, str]:
    """Accession number per series UID, for received series and the outputs written
    from them; UIDs without one (or unknown) are absent."""
    if not series_uids:
        return {}
    found = {uid: acc for uid, acc in session.execute(
        select(Series.series_uid, Series.accession_number)
        .where(Series.series_uid.in_(series_uids), Series.accession_number != "")).all()}
    found.update({uid: acc for uid, acc in session.execute(
        select(OutputInstance.series_uid, Series.accession_number)
        .join(Series, Series.id == OutputInstance.source_series_id)
        .where(OutputInstance.series_uid.in_(series_uids), Series.accession_number != "")
        .distinct()).all()})
    return found
