"""IHE AI Results (AIR) for what the node writes: the algorithm in every output's
Contributing Equipment, the Procedure Reported, tracking UIDs that stay with a lesion
across model versions, and the KOS that lists the result set."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread

from dicom_node.analysis.tbr import TbrResult, measure_tbr
from dicom_node.inference.fusion import window_t1c
from dicom_node.series.volume import Volume, load_volume, read_header, slices_of
from dicom_node.writers.kos import SOP_CLASS_UID as KOS_CLASS
from dicom_node.writers.kos import listed_instances, make_kos
from dicom_node.writers.provenance import PROCESSING_ALGORITHM, Provenance
from dicom_node.writers.sc import ScSeries, encode
from dicom_node.writers.seg import make_seg
from dicom_node.writers.sr import MRI_PROCEDURE, make_image_sr, make_sr
from tests.conftest import validate_dicom
from training.phantom import PhantomGeometry, generate_patient
from training.phantom_dicom import write_patient

GEOMETRY = PhantomGeometry(rows=128, cols=128, pixel_spacing_mm=2.0, slice_spacing_mm=4.0)
V1 = Provenance(manufacturer="dicom-node", model_name="phantom-truth", model_version="1.0",
                weights_sha256="1" * 64, institution_name="Test Hospital")
V2 = replace(V1, model_version="2.0", weights_sha256="2" * 64)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Volume, TbrResult]:
    patient = generate_patient(4, seed=0, geometry=GEOMETRY)  # has a tumour (test_tbr.py)
    paths = write_patient(patient, tmp_path_factory.mktemp("phantom"))
    volume = load_volume([s for p in paths.t1c for s in slices_of(read_header(p), p)])
    result = measure_tbr(patient.uptake, volume.voxel_volume_ml, 1.6, 0.1, 0.3,
                         spacing_mm=volume.spacing_mm, t1c_grey=window_t1c(volume.pixels))
    assert len(result.lesions) >= 1, "phantom 4 should have a lesion above threshold"
    return volume, result


def _result_set(volume: Volume, result: TbrResult, provenance: Provenance,
                root: str) -> list[Dataset]:
    """What a job writes for one version (two SC slices stand for the whole series), each
    with its own UIDs under ``root``: [SC, SC, SEG, SR, image SR]."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in volume.datasets}
    fusion = np.zeros((len(volume.slices), *volume.pixels.shape[1:], 3), np.uint8)
    sc = ScSeries(fusion, [by_uid[info.sop_uid] for info in volume.slices], volume.slices,
                  f"{root}.1", [f"{root}.1.{i + 1}" for i in range(len(volume.slices))],
                  9901, provenance)
    seg = make_seg(volume.datasets, result, f"{root}.3", f"{root}.3.1", 9903, provenance)
    sr = make_sr(volume.datasets, seg, result, f"{root}.2", f"{root}.2.1", 9902, provenance)
    image_sr = make_image_sr(volume.datasets, result, f"{root}.4", f"{root}.4.1", 9904,
                             provenance)
    assert image_sr is not None
    return [sc.instance(0), sc.instance(1), seg, sr, image_sr]


def _algorithm_items(ds: Dataset) -> list[Dataset]:
    return [item for item in ds.ContributingEquipmentSequence
            if item.PurposeOfReferenceCodeSequence[0].CodeValue == PROCESSING_ALGORITHM.value]


def _observer(ds: Dataset) -> list[Dataset]:
    """The observation context items at the root of an SR or a KOS."""
    return [item for item in ds.ContentSequence if item.RelationshipType == "HAS OBS CONTEXT"]


def _tracking_uids(ds: Dataset) -> dict[str, str]:
    """Tracking identifier -> tracking UID, from a SEG's segments or an SR's groups."""
    if "SegmentSequence" in ds:
        return {str(s.TrackingID): str(s.TrackingUID) for s in ds.SegmentSequence}
    out: dict[str, str] = {}

    def walk(node: Dataset) -> None:
        for item in node.get("ContentSequence", []):
            if item.ValueType == "CONTAINER" and \
                    item.ConceptNameCodeSequence[0].CodeValue == "125007":
                children = list(item.ContentSequence)
                label = next(str(c.TextValue) for c in children if c.ValueType == "TEXT"
                             and c.ConceptNameCodeSequence[0].CodeValue == "112039")
                out[label] = next(str(c.UID) for c in children if c.ValueType == "UIDREF"
                                  and c.ConceptNameCodeSequence[0].CodeValue == "112040")
            else:
                walk(item)

    walk(ds)
    return out


def test_every_output_names_the_algorithm_as_air_asks(analysed) -> None:
    """SC, SEG, both SRs and the KOS: one Contributing Equipment item with purpose
    (Newcode1, 99IHE, "Processing Algorithm"), the manufacturer, the institution, the
    model's name, the node's and the model's versions and a Device UID that is the same
    on every output of a model version and differs for another."""
    volume, result = analysed
    outputs = _result_set(volume, result, V1, "2.25.401")
    outputs.append(make_kos([outputs[3], *outputs[:3], outputs[4]], "2.25.401.5",
                            "2.25.401.5.1", 9905, V1))
    device_uids = set()
    for ds in outputs:
        (item,) = _algorithm_items(ds)
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
            "99IHE", "Processing Algorithm"), ds.SOPClassUID.name
        assert item.Manufacturer == "dicom-node"
        assert item.InstitutionName == "Test Hospital"
        assert item.ManufacturerModelName == "phantom-truth"
        node_version, model_version = item.SoftwareVersions
        assert node_version.startswith("dicom-node ") and model_version == "phantom-truth 1.0"
        device_uids.add(str(item.DeviceUID))
        # the scheme is declared where it is used
        assert "99IHE" in {str(s.CodingSchemeDesignator)
                           for s in ds.CodingSchemeIdentificationSequence}
    assert device_uids == {V1.device_uid} and V1.device_uid != V2.device_uid
    # the reports' and the KOS's observer device is that algorithm
    for ds in outputs[3:]:
        observer = {str(i.ConceptNameCodeSequence[0].CodeValue): i for i in _observer(ds)}
        assert V1.device_uid == observer["121012"].UID  # Device Observer UID


def test_procedure_reported_names_the_mr_procedure(analysed) -> None:
    """Procedure Reported is the imaging procedure of the source: its own Procedure Code
    Sequence when it has one, else the MR (the PET is synthetic)."""
    volume, result = analysed

    def reported(sr: Dataset) -> tuple[str, str]:
        item = next(i for i in sr.ContentSequence
                    if i.ConceptNameCodeSequence[0].CodeValue == "121058")
        code = item.ConceptCodeSequence[0]
        return str(code.CodeValue), str(code.CodingSchemeDesignator)

    sr = _result_set(volume, result, V1, "2.25.402")[3]
    assert reported(sr) == (MRI_PROCEDURE.value, MRI_PROCEDURE.scheme_designator)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "24590-2", "LN"
    code.CodeMeaning = "MR Brain WO and W contrast IV"
    sources = [Dataset(ds) for ds in volume.datasets]
    sources[0].ProcedureCodeSequence = [code]
    seg = make_seg(sources, result, "2.25.403", "2.25.403.1", 9903, V1)
    sr = make_sr(sources, seg, result, "2.25.404", "2.25.404.1", 9902, V1)
    assert reported(sr) == ("24590-2", "LN")


def test_tracking_uids_stay_with_a_lesion_across_model_versions(analysed) -> None:
    """Two runs with different model versions (and so different SOP Instance UIDs) on
    the same source give each lesion the same tracking UID, and within a run the SEG
    segment and both SRs agree on it."""
    volume, result = analysed
    first = _result_set(volume, result, V1, "2.25.405")
    second = _result_set(volume, result, V2, "2.25.406")
    assert first[2].SOPInstanceUID != second[2].SOPInstanceUID
    for outputs in (first, second):
        seg, sr, image_sr = (_tracking_uids(ds) for ds in outputs[2:])
        assert set(seg) == set(sr) == {"TBR background",
                                       *(f"Lesion {lesion.number}" for lesion in result.lesions)}
        assert seg == sr  # the background group too
        assert image_sr == {k: v for k, v in sr.items() if k.startswith("Lesion ")}
    assert _tracking_uids(first[2]) == _tracking_uids(second[2])
    assert _tracking_uids(first[3]) == _tracking_uids(second[3])
    assert len(set(_tracking_uids(first[2]).values())) == len(result.lesions) + 1


def test_kos_lists_exactly_the_result_set_and_validates(analysed, tmp_path: Path) -> None:
    volume, result = analysed
    outputs = _result_set(volume, result, V1, "2.25.407")
    sr = outputs[3]
    kos = make_kos([sr, *(ds for ds in outputs if ds is not sr)], "2.25.407.5",
                   "2.25.407.5.1", 9905, V1)
    members = {str(ds.SOPInstanceUID) for ds in outputs}
    assert kos.SOPClassUID == KOS_CLASS and kos.Modality == "KO" and kos.SeriesNumber == 9905
    assert listed_instances(kos) == members
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"  # "Of Interest"
    (study,) = kos.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == kos.StudyInstanceUID == volume.datasets[0].StudyInstanceUID
    evidence = {str(ref.ReferencedSOPInstanceUID): (str(series.SeriesInstanceUID),
                                                    str(ref.ReferencedSOPClassUID))
                for series in study.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence}
    assert evidence == {str(ds.SOPInstanceUID): (str(ds.SeriesInstanceUID),
                                                 str(ds.SOPClassUID)) for ds in outputs}
    assert kos.PatientID == volume.datasets[0].PatientID
    (tmp_path / "kos.dcm").write_bytes(encode(kos))
    assert dcmread(tmp_path / "kos.dcm").SOPInstanceUID == "2.25.407.5.1"
    checked = validate_dicom(tmp_path / "kos.dcm")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_kos_refuses_a_set_from_two_studies(analysed) -> None:
    volume, result = analysed
    outputs = _result_set(volume, result, V1, "2.25.408")
    stranger = Dataset(outputs[0])
    stranger.StudyInstanceUID = "2.25.409"
    with pytest.raises(ValueError, match="2 studies"):
        make_kos([outputs[3], stranger], "2.25.408.5", "2.25.408.5.1", 9905, V1)
