"""STOW-RS (DICOM PS3.18 10.5): the node's outputs to a DICOMweb server.

One request stores a share of the outbox's due entries: ``POST {url}/studies`` with a
``multipart/related; type="application/dicom"`` body whose parts are the output files'
bytes as written (streamed from disk, never decoded or re-encoded), with a
Content-Length computed up front so that servers that refuse chunked uploads take it.

The answer is read per instance, as the standard defines it (PS3.18 Table 10.5.3-1):
the Store Instances Response Module (DICOM JSON) lists stored instances in the
Referenced SOP Sequence (0008,1199), each with a Warning Reason (0008,1196) where the
server changed or doubted something, and refused ones in the Failed SOP Sequence
(0008,1198) with their Failure Reason (0008,1197), a DIMSE-style status. An instance
the answer does not mention is not known to be stored. The caller maps these to the
outbox exactly like C-STORE statuses (:mod:`dicom_node.outbox.sender`); what fails the
whole request (no connection, TLS, a timeout, HTTP 401/403/5xx, a body that is not a
STOW response) is a :class:`StowUnavailable`, retried like a failed association.
"""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from dicom_node.config import Destination, NotificationEndpoint

FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
#: What a server that stored an instance without comment is taken to have answered.
SUCCESS = 0x0000
#: "Processing failure": an instance the answer does not list (PS3.18 allows no such gap).
NOT_IN_RESPONSE = 0x0110


class StowUnavailable(RuntimeError):
    """The request as a whole failed: nothing is known to be stored (retry later)."""


@dataclass(frozen=True)
class StowOutcome:
    """One instance's outcome: ``status`` is 0 (stored), the Warning Reason (stored,
    with a warning) or the Failure Reason (not stored); ``stored`` says which."""

    sop_uid: str
    stored: bool
    status: int
    reason: str


class MultipartFiles(io.RawIOBase):
    """A ``multipart/related`` body of files read as it is sent; ``len()`` is its size."""

    def __init__(self, paths: Sequence[Path], boundary: str) -> None:
        super().__init__()
        head = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode()
        self._pieces: list[bytes | Path] = []
        for path in paths:
            self._pieces += [head, path, b"\r\n"]
        self._pieces.append(f"--{boundary}--\r\n".encode())
        self._size = sum(len(p) if isinstance(p, bytes) else p.stat().st_size
                         for p in self._pieces)
        self._index = 0
        self._position = 0
        self._current: io.BufferedReader | io.BytesIO | None = None

    def __len__(self) -> int:
        return self._size

    def tell(self) -> int:
        """Bytes read so far (requests sizes a body by ``len()`` minus ``tell()``: without
        it, it would send chunked, which some servers refuse)."""
        return self._position

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while self._index < len(self._pieces):
            if self._current is None:
                piece = self._pieces[self._index]
                self._current = io.BytesIO(piece) if isinstance(piece, bytes) else piece.open("rb")
            count = self._current.readinto(view)
            if count:
                self._position += count
                return count
            self._current.close()
            self._current = None
            self._index += 1
        return 0

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        super().close()


def authorization(dest: Destination) -> dict[str, str]:
    """The Authorization header from the destination's credential file (read now, so a
    rotated token is used without a restart); none without a file."""
    if dest.bearer_token_file is not None:
        token = dest.bearer_token_file.read_text().strip()
        return {"Authorization": f"Bearer {token}"}
    if dest.basic_auth_file is not None:
        user, _, password = dest.basic_auth_file.read_text().strip().partition(":")
        header = requests.auth._basic_auth_str(user, password)  # RFC 7617 encoding
        return {"Authorization": header}
    return {}


def tls_verify(peer: Destination | NotificationEndpoint) -> bool | str:
    """requests' ``verify`` for an https peer (a DICOMweb destination or a notification
    endpoint): its ``ca_file`` when given, else the system's trusted CAs (True); False
    when the admin turned verification off (``verify_tls = false``)."""
    if not peer.verify_tls:
        return False
    return str(peer.ca_file) if peer.ca_file is not None else True


def store_instances(http: requests.Session, dest: Destination,
                    files: Sequence[tuple[str, Path]]) -> list[StowOutcome]:
    """STOW-RS of ``files`` ((SOP Instance UID, path) each) in one request; an outcome
    for every one of them, in order. :class:`StowUnavailable` when the request fails."""
    boundary = f"dicom-node-{secrets.token_hex(16)}"
    body = MultipartFiles([path for _sop, path in files], boundary)
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
        **authorization(dest),
    }
    try:
        with body:
            response = http.post(f"{dest.url}/studies", data=body, headers=headers,
                                 timeout=dest.http_timeout_s, verify=tls_verify(dest))
    except requests.exceptions.SSLError as exc:
        raise StowUnavailable(f"TLS failed ({dest.url}): {_short(exc)}") from exc
    except requests.exceptions.ConnectionError as exc:
        raise StowUnavailable(f"cannot connect to {dest.url}: {_short(exc)}") from exc
    except requests.exceptions.Timeout as exc:
        raise StowUnavailable(f"no answer from {dest.url} within "
                              f"{dest.http_timeout_s:g} s") from exc
    except requests.exceptions.RequestException as exc:
        raise StowUnavailable(f"request to {dest.url} failed: {_short(exc)}") from exc
    return outcomes_of(response.status_code, response.reason, response.text,
                       [sop for sop, _path in files])


def check_service(dest: Destination) -> str | None:
    """Can the node reach and authenticate to the DICOMweb service? A QIDO-RS search
    for one study (``GET {url}/studies?limit=1``) with the destination's credentials and
    TLS settings; None when it answers 200 or 204, else the reason in a few words."""
    try:
        response = requests.get(f"{dest.url}/studies", params={"limit": "1"},
                                headers={"Accept": "application/dicom+json",
                                         **authorization(dest)},
                                timeout=min(dest.http_timeout_s, 30.0),
                                verify=tls_verify(dest))
    except OSError as exc:  # requests' errors, and an unreadable credential file
        return _short(exc)
    if response.status_code in (200, 204):
        return None
    return f"HTTP {response.status_code} {response.reason}".strip()


def outcomes_of(http_status: int, http_reason: str, text: str,
                sop_uids: Sequence[str]) -> list[StowOutcome]:
    """The per-instance outcomes of a STOW-RS answer (see the module's docstring)."""
    said = f"HTTP {http_status} {http_reason}".strip()
    if http_status not in (200, 202, 409):
        raise StowUnavailable(f"{said}: {text.strip()[:200]}" if text.strip() else said)
    try:
        document = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise StowUnavailable(f"{said}: the answer is not DICOM JSON") from exc
    if isinstance(document, list):  # some servers wrap the data set in an array
        document = document[0] if document else {}
    if not isinstance(document, dict):
        raise StowUnavailable(f"{said}: the answer is not a STOW-RS response")
    stored = {uid: status for uid, status in _items(document, REFERENCED_SOP_SEQUENCE,
                                                    WARNING_REASON)}
    failed = {uid: status for uid, status in _items(document, FAILED_SOP_SEQUENCE,
                                                    FAILURE_REASON)}
    if http_status == 200 and not stored and not failed:
        # 200 says every instance was stored; an empty body is tolerated as that
        stored = {uid: None for uid in sop_uids}
    out = []
    for uid in sop_uids:
        if uid in failed:
            code = failed[uid]
            status = NOT_IN_RESPONSE if code is None else code
            out.append(StowOutcome(uid, False, status, f"{said}: failure reason 0x{status:04X}"))
        elif uid in stored:
            warning = stored[uid]
            if warning:
                out.append(StowOutcome(uid, True, warning, f"{said}: warning 0x{warning:04X}"))
            else:
                out.append(StowOutcome(uid, True, SUCCESS, ""))
        else:
            out.append(StowOutcome(uid, False, NOT_IN_RESPONSE,
                                   f"{said}: instance not in the response"))
    return out


def _items(document: dict[str, Any], sequence: str, reason_tag: str
           ) -> list[tuple[str, int | None]]:
    """(SOP Instance UID, reason code or None) of each item of a response sequence."""
    element = document.get(sequence) or {}
    out = []
    for item in element.get("Value", []) if isinstance(element, dict) else []:
        if not isinstance(item, dict):
            continue
        uid = _first(item.get(REFERENCED_SOP_INSTANCE_UID))
        if uid is None:
            continue
        reason = _first(item.get(reason_tag))
        out.append((str(uid), int(reason) if reason is not None else None))
    return out


def _first(element: Any) -> Any:
    if isinstance(element, dict) and element.get("Value"):
        return element["Value"][0]
    return None


def _short(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error, e.g. 'Connection refused'."""
    text = str(exc)
    for marker in ("] ", "Error("):
        if marker in text:
            text = text.rsplit(marker, 1)[-1]
    return text.strip(" ')\"")[:200]
