"""What a notification says: the webhook's JSON body and the FHIR R4 DiagnosticReport.

Webhook body (``docs/notification.schema.json`` is its JSON Schema)::

    {"schema": "dicom-node.notification/1", "id": "<node>/<audit event id>",
     "event": "done" | "skipped" | "failed" | "dead_letter", "at": "<ISO 8601 UTC>",
     "node": {"ae_title": ..., "version": ...},
     "study_instance_uid": ..., "series_instance_uid": ..., "accession_number": ...,
     "reason": "...",                     # the node's own words (skipped, failed, dead)
     "findings": {...},                   # done: lesion count, TBRs, intervals, model
     "destination": ..., "instances": n,  # dead_letter: where, and how many
     "patient_id": ...,                   # only with include_patient_ids = true
     "statement": "Synthetic PET ... NOT FOR DIAGNOSTIC USE."}

``id`` is stable per event and endpoint-independent: a receiver that gets a message
twice (a retry after a lost answer) can tell. The FHIR resource is a DiagnosticReport
(status ``preliminary``) whose ``imagingStudy`` identifies the study by its
StudyInstanceUID (``urn:dicom:uid``), with one contained Observation per lesion
measurement (TBRmax and TBRmean as unitless ratios, the interval as a referenceRange-free
``component``), and the statement in ``conclusion``.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

SCHEMA = "dicom-node.notification/1"
STATEMENT = ("Synthetic PET derived results (tumour-to-background ratios of a synthetic "
             "18F-FDOPA uptake made from the T1C by a model). Research only. NOT FOR "
             "DIAGNOSTIC USE.")
DICOM_UID_SYSTEM = "urn:dicom:uid"


def webhook_body(*, node: dict[str, str], event: str, event_id: str, at: datetime,
                 study_uid: str, series_uid: str, accession: str, reason: str = "",
                 findings: dict[str, Any] | None = None, destination: str = "",
                 instances: int = 0, patient_id: str | None = None) -> bytes:
    """The webhook's JSON body, UTF-8, keys sorted (the bytes that are signed)."""
    body: dict[str, Any] = {
        "schema": SCHEMA, "id": event_id, "event": event, "at": at.isoformat(),
        "node": node, "study_instance_uid": study_uid, "series_instance_uid": series_uid,
        "accession_number": accession, "statement": STATEMENT}
    if reason:
        body["reason"] = reason
    if findings is not None:
        body["findings"] = findings
    if destination:
        body["destination"] = destination
        body["instances"] = instances
    if patient_id is not None:
        body["patient_id"] = patient_id
    return json.dumps(body, sort_keys=True).encode()


def _ratio(code: str, display: str, value: float,
           interval: list[float] | None) -> dict[str, Any]:
    observation: dict[str, Any] = {
        "code": {"text": display,
                 "coding": [{"system": "urn:dicom-node:measurement", "code": code,
                             "display": display}]},
        "valueQuantity": {"value": round(float(value), 3), "unit": "ratio",
                          "system": "http://unitsofmeasure.org", "code": "1"}}
    if interval is not None:
        observation["component"] = [
            {"code": {"text": f"{display}, 90 % interval lower limit"},
             "valueQuantity": {"value": round(float(interval[0]), 3), "unit": "ratio",
                               "system": "http://unitsofmeasure.org", "code": "1"}},
            {"code": {"text": f"{display}, 90 % interval upper limit"},
             "valueQuantity": {"value": round(float(interval[1]), 3), "unit": "ratio",
                               "system": "http://unitsofmeasure.org", "code": "1"}}]
    return observation


def fhir_report(*, event_id: str, at: datetime, study_uid: str, series_uid: str,
                accession: str, findings: dict[str, Any], model: str,
                patient_id: str | None = None) -> bytes:
    """A FHIR R4 DiagnosticReport (JSON, UTF-8) of a done series' findings."""
    contained: list[dict[str, Any]] = []
    results: list[dict[str, str]] = []
    for lesion in findings.get("lesions", []):
        number = lesion["lesion"]
        suffix = " (equivocal)" if lesion.get("equivocal") else ""
        for code, display, key in (("tbr-max", "TBRmax", "tbr_max"),
                                   ("tbr-mean", "TBRmean", "tbr_mean")):
            ident = f"lesion{number}-{code}"
            observation = {"resourceType": "Observation", "id": ident, "status": "preliminary",
                           **_ratio(code, f"Lesion {number}{suffix} {display}", lesion[key],
                                    lesion.get(f"{key}_interval")),
                           "effectiveDateTime": at.isoformat()}
            contained.append(observation)
            results.append({"reference": f"#{ident}"})
    count = len(findings.get("lesions", []))
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": "urn:dicom-node:report", "value": event_id}],
        "status": "preliminary",
        "category": [{"text": "Synthetic PET (research)"}],
        "code": {"text": "Synthetic 18F-FDOPA PET tumour-to-background ratios"},
        "effectiveDateTime": at.isoformat(),
        "issued": at.isoformat(),
        "imagingStudy": [{"identifier": {"system": DICOM_UID_SYSTEM,
                                         "value": f"urn:oid:{study_uid}"},
                          "display": f"Study {study_uid}"}],
        "contained": contained,
        "result": results,
        "conclusion": (f"{findings.get('finding', f'{count} lesion(s)')}; model {model}; "
                       f"source series {series_uid}"
                       + (f", accession {accession}" if accession else "")
                       + f". {STATEMENT}"),
    }
    if patient_id is not None:
        report["subject"] = {"identifier": {"value": patient_id}}
    return json.dumps(report, sort_keys=True).encode()
