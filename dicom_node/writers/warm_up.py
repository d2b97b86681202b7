"""Pay the writers' one-time costs when the node starts, not on the first series.

The first SC, SEG and SR a process builds are slow: highdicom loads its tables of the
DICOM standard (JSON, about 0.6 s), the banner font is loaded, and the SEG and SR
builders fill their own caches (about 0.3 s more). Without a warm-up, the first series
after every start waits for all of that, half of it before its first fusion slice can
go out. :func:`warm_up_writers` builds (and encodes, but never writes or sends) one
of each from a tiny synthetic two-slice source when the node starts.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.uid import UID, MRImageStorage

from dicom_node.analysis.tbr import Lesion, TbrResult
from dicom_node.series.volume import SliceInfo
from dicom_node.writers.image_source import new_instance, set_grey_pixels, set_plane
from dicom_node.writers.kos import make_kos
from dicom_node.writers.provenance import Provenance
from dicom_node.writers.sc import ScSeries, encode
from dicom_node.writers.seg import make_seg
from dicom_node.writers.sr import make_image_sr, make_sr

_SIZE = 8
_ROOT = "2.25.1208152042011"  # a fixed UID root: nothing built here leaves the process


def _uid(n: int) -> UID:
    return UID(f"{_ROOT}.{n}")


def _source(index: int) -> Dataset:
    ds = new_instance(MRImageStorage, _uid(10 + index))
    ds.StudyInstanceUID = _uid(1)
    ds.SeriesInstanceUID = _uid(2)
    ds.PatientName = "WARM^UP"
    ds.PatientID = "WARMUP"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = "20260101"
    ds.StudyTime = "000000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = "MR"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    set_plane(ds, frame_of_reference_uid=_uid(3), position=[0.0, 0.0, float(index)],
              orientation=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], pixel_spacing_mm=1.0,
              slice_thickness_mm=1.0)
    set_grey_pixels(ds, np.zeros((_SIZE, _SIZE), dtype=np.uint16))
    return ds


def warm_up_outputs(provenance: Provenance) -> list[tuple[Dataset, bytes]]:
    """One SC (twice: from the series template and with a summary), a SEG and both SRs
    of the tiny synthetic source, each with its encoded bytes."""
    sources = [_source(0), _source(1)]
    slices = [SliceInfo(path=Path(f"warm-up-{k}"), frame_index=None,
                        sop_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                        rows=_SIZE, columns=_SIZE, position=(0.0, 0.0, float(k)),
                        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), pixel_spacing=(1.0, 1.0),
                        slice_thickness=1.0) for k, ds in enumerate(sources)]
    fusion = np.zeros((2, _SIZE, _SIZE, 3), dtype=np.uint8)
    sc = ScSeries(fusion, sources, slices, _uid(4), [_uid(5), _uid(6)], 1, provenance)
    second = sc.instance(1)
    first = sc.instance(0, ["warm-up"])
    lesion_mask = np.zeros((2, _SIZE, _SIZE), dtype=bool)
    lesion_mask[:, 2:4, 2:4] = True
    background = np.zeros_like(lesion_mask)
    background[:, 5:7, 5:7] = True
    result = TbrResult(background_mean=1.0, background_mask=background, lesions=[Lesion(
        number=1, tbr_max=2.0, tbr_mean=1.8, volume_ml=0.008, max_uptake=2.0,
        mean_uptake=1.8, mask=lesion_mask, peak_index=(0, 2, 2), side="left")],
        background_side="right", background_slices=(0, 1))
    seg = make_seg(sources, result, _uid(7), _uid(8), 2, provenance)
    sr = make_sr(sources, seg, result, _uid(9), _uid(20), 3, provenance)
    image_sr = make_image_sr(sources, result, _uid(21), _uid(22), 4, provenance)
    assert image_sr is not None  # the warm-up result has a lesion
    kos = make_kos([sr, image_sr, seg, first, second], _uid(23), _uid(24), 5, provenance)
    return [(first, encode(first)), (second, sc.encode(second)), (seg, encode(seg)),
            (sr, encode(sr)), (image_sr, encode(image_sr)), (kos, encode(kos))]


def warm_up_writers(provenance: Provenance) -> float:
    """Build and encode one of each output in memory (nothing is written or sent);
    returns the seconds it took. highdicom's INFO lines about copying the synthetic
    source's attributes are kept out of the node's log (it starts single-threaded)."""
    started = time.monotonic()
    highdicom_log = logging.getLogger("highdicom")
    level = highdicom_log.level
    highdicom_log.setLevel(max(logging.WARNING, highdicom_log.getEffectiveLevel()))
    try:
        warm_up_outputs(provenance)
    finally:
        highdicom_log.setLevel(level)
    return time.monotonic() - started
