"""DIMSE status codes the node returns or interprets (PS3.4 Annex B, PS3.7 Annex C)."""

from __future__ import annotations

SUCCESS = 0x0000
# C-STORE warnings
COERCION_OF_DATA_ELEMENTS = 0xB000
ELEMENTS_DISCARDED = 0xB006
DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
# C-STORE failures
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
SOP_CLASS_NOT_SUPPORTED = 0x0122

WARNINGS = frozenset({COERCION_OF_DATA_ELEMENTS, ELEMENTS_DISCARDED,
                      DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING})


def is_success(status: int) -> bool:
    return status == SUCCESS


def is_warning(status: int) -> bool:
    return status in WARNINGS or (status & 0xF000) == 0xB000


def is_stored(status: int) -> bool:
    """Success or warning: the peer kept the instance."""
    return is_success(status) or is_warning(status)


def describe(status: int | None) -> str:
    if status is None:
        return "no response"
    names = {value: name for name, value in globals().items()
             if name.isupper() and isinstance(value, int)}
    return f"0x{status:04X} {names.get(status, '')}".strip()
