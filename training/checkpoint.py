"""The training checkpoint on disk: its format tag, and writing and reading it. Shared by
``train`` (which writes and resumes it) and ``export`` (which reads it), so neither
imports the other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from storage.file_store import atomic_writer

CHECKPOINT_FORMAT = "dicom-node-pix2pix-checkpoint/1"


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_writer(path) as handle:
        torch.save(obj, handle)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a dicom-node training checkpoint")
    return state
