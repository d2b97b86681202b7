"""The dataset reader on real vendor files: every PET and MR instance that the installed
packages ship as test data (pydicom, pydicom-data, nibabel, pynetdicom), read as the
dataset builder reads them, with what it accepts or refuses and why.

    python -m training.reader_survey            # a Markdown table (docs/datasets.md)

Per file: the header read (:func:`training.scanning.read_header`), the node's selection
on the file as a one-instance series (the node's default rules, and its geometry rules
alone: no description or contrast rule, ``min_slices = 1``, since these test files carry
no T1C descriptions and a lone file can never reach the default 16 slices), the pixel
decoding with the builder's reader, and for PET the SUV decision tree and the stack
geometry. Nothing is downloaded: only what is installed is read.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicom_node.config import SelectionConfig
from training.pair_arrays import PixelError, _read_pixels
from training.pet_volume import GeometryError, stack_geometry
from training.scanning import read_header, t1c_reason
from training.study_plan import plane_of
from training.suv import SuvRefused, suv_scale

#: Packages whose installed files are searched, and the folder inside each.
PACKAGES = (("pydicom", "data"), ("data_store", "data"), ("nibabel", ""), ("pynetdicom", "tests"))
MODALITIES = ("PT", "MR")


@dataclass(frozen=True)
class SurveyRow:
    file: str
    modality: str
    sop_class: str
    transfer_syntax: str
    frames: int
    header: str
    selection_default: str
    selection_one_slice: str
    pixels: str
    suv: str

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def installed_test_files() -> list[Path]:
    """Every file under the packages' data folders whose header says PT or MR."""
    found: list[Path] = []
    for package, sub in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            folder = Path(location) / sub
            for path in sorted(folder.rglob("*")):
                if not path.is_file() or path.suffix in (".py", ".pyc", ".json", ".txt"):
                    continue
                try:
                    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
                    modality = str(ds.get("Modality", ""))
                except Exception:  # any unreadable file is simply not a candidate
                    continue
                if modality in MODALITIES:
                    found.append(path)
    return found


def _short(path: Path) -> str:
    parts = path.parts
    for i, part in enumerate(parts):
        if part == "site-packages":
            return "/".join(parts[i + 1:])
    return str(path)


def survey_file(path: Path, rules: SelectionConfig | None = None) -> SurveyRow:
    """How the dataset builder treats one file."""
    rules = rules or SelectionConfig()
    raw = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    meta = getattr(raw, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    sop = raw.get("SOPClassUID")
    base = dict(file=_short(path), modality=str(raw.get("Modality", "")),
                sop_class=getattr(sop, "name", str(sop or "(none)")),
                transfer_syntax=getattr(syntax, "name", "(no file meta)"),
                frames=int(raw.get("NumberOfFrames", 1) or 1))
    found = read_header(path)
    if found is None:
        return SurveyRow(**base, header="refused: not read as an instance (no file meta, "  # type: ignore[arg-type]
                         "StudyInstanceUID or SeriesInstanceUID)", selection_default="-",
                         selection_one_slice="-", pixels="-", suv="-")
    _, _, _, series, header = found
    series.slices.append(header)
    one = dataclasses.replace(rules, min_slices=1, description_include=(),
                              description_exclude=(), require_contrast=False)
    if series.modality in rules.modalities:
        default = t1c_reason(series, rules) or "accepted"
        single = t1c_reason(series, one) or "accepted"
    else:
        default = single = "-"
    try:
        values, _ = _read_pixels(path)
        pixels = f"ok {'x'.join(str(v) for v in values.shape)}"
    except PixelError as exc:
        pixels = f"refused: {exc}"
    suv = "-"
    if series.modality == "PT":
        try:
            suv = f"ok: {suv_scale([header.header]).method}"
        except SuvRefused as exc:
            suv = f"refused: {exc}"
        plane = plane_of(header)
        if plane is None:
            suv += "; geometry incomplete"
        else:
            try:
                stack_geometry([plane])
            except GeometryError as exc:
                suv += f"; geometry: {exc}"
    return SurveyRow(**base, header="read", selection_default=default,  # type: ignore[arg-type]
                     selection_one_slice=single, pixels=pixels, suv=suv)


def survey(paths: Iterable[Path], rules: SelectionConfig | None = None) -> list[SurveyRow]:
    return [survey_file(Path(p), rules) for p in paths]


def markdown(rows: list[SurveyRow]) -> str:
    pet = sum(1 for r in rows if r.modality == "PT")
    lines = [f"{len(rows)} files ({pet} PET, {len(rows) - pet} MR).", "",
             "| file | SOP class | transfer syntax | frames | node rules (default) | "
             "node geometry rules alone | pixels | SUV |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r.file, r.sop_class, r.transfer_syntax, str(r.frames),
                 r.selection_default if r.header == "read" else r.header,
                 r.selection_one_slice, r.pixels, r.suv]
        lines.append("| " + " | ".join(c.replace("|", "/")[:160] for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(survey(installed_test_files())))
