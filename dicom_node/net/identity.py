"""Who the node says it is on the wire and in the objects it writes."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from pynetdicom import AE

# Our own Implementation Class UID (a 2.25 UUID-derived root), not pynetdicom's.
IMPLEMENTATION_CLASS_UID = "2.25.248402882204672163414251674993756626785"
IMPLEMENTATION_VERSION_NAME = "DICOMNODE_01"
MANUFACTURER_MODEL_NAME = "dicom-node synthetic FDOPA PET"


def software_version() -> str:
    try:
        return version("dicom-node")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def apply_identity(ae: AE) -> None:
    """Set the node's implementation identity on an AE (SCP or SCU)."""
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
