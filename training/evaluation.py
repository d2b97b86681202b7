"""Evaluating weights on a dataset split: the methods compared and their metrics.

Methods compared on the same slices:

- ``model``: the weights file, run as the node runs it (``load_weights``, eval mode,
  ``torch.inference_mode``, input ``2 * t1c - 1``); an RGB model's output is quantised
  to uint8 like the node's Secondary Capture; an uptake model's output is smoothed along
  the slice normal within each study's run of contiguous slices as its model card says
  (``slice_smoothing_mm``, :mod:`dicom_node.inference.slice_smoothing`; ``--slice-smoothing-mm``
  overrides it, to choose it on the validation split) and fused with the dataset's
  fusion style over the dataset's ``t1c_backdrop`` (the T1C exactly as the real fusion
  shows it where no uptake is drawn), as the node draws it over the native T1C.
- ``oracle`` (phantoms): the uptake expected from what the T1C shows, drawn the way the
  model's fusion is drawn: the ceiling a model is measured against. For an uptake model
  that is the dataset's ``oracle_uptake`` (resampled to the network size like the real
  uptake) fused over the same backdrop at the network size, as the model's output is
  (the oracle is not smoothed along the slice normal: its uptake is blurred in 3D); the
  report then also shows ``oracle_native``, the dataset's ``oracle_fusion``: drawn at
  the native matrix and then resampled like the reference, so its overlay edges are
  anti-aliased as the reference's are, which no fusion drawn at the network size can
  be. An RGB model draws its own edges, so for it (and for datasets without
  ``oracle_uptake``) ``oracle`` is ``oracle_fusion``. The checks compare with ``oracle``.
- ``t1c_grey``: the T1C alone in grey (the backdrop), no PET overlay.
- ``population_mean``: the mean uptake of the training split per slice-position bin,
  tumour and oedema pixels replaced by the slice's background mean, fused on the backdrop.

Metrics:

- as the published study: PSNR, MSE, SSIM, FSIM of the RGB fusion in [0, 1], mean +- SD;
  Pearson r (95 % CI, p) of real vs synthetic TBRmax / TBRmean over tumour-bearing
  slices (one ROI per lesion and slice) and over patients' 3D volumes (one per lesion);
- PET-specific: PSNR and SSIM of the uptake / 4 inside the brain mask and inside the
  tumour regions. Uptake is de-fused from each fusion (``dicom_node.inference.fusion.defuse``)
  for every method and for the reference alike (real fusion -> real uptake).

The report: :mod:`training.evaluation_report`; the command: :mod:`training.evaluate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from dicom_node.inference.fusion import defuse, display_grey, fuse, to_uint8
from dicom_node.inference.fusion_style import FusionStyle
from dicom_node.inference.model_weights import LoadedModel
from dicom_node.inference.resampling import from_network, to_network
from dicom_node.inference.slice_context import contiguous_runs, restrict_runs
from dicom_node.inference.slice_smoothing import smooth_runs
from dicom_node.inference.uptake_contrast import stretch_above_median
from training import data as ds
from training.metrics import (
    fsim,
    masked_psnr,
    masked_ssim,
    mean_sd,
    mse,
    pearson,
    psnr_from_mse,
    ssim,
    tbr,
)

MIN_TUMOUR_PIXELS = 4
MIN_BACKGROUND_PIXELS = 200
IMAGE_METRICS = ("psnr", "mse", "ssim", "fsim")
UPTAKE_METRICS = ("uptake_psnr_brain", "uptake_ssim_brain", "uptake_psnr_tumour",
                  "uptake_ssim_tumour")
PET_METRICS = (*UPTAKE_METRICS, "r_tbrmax_slices", "r_tbrmean_slices")

@dataclass
class Method:
    name: str
    fusion: NDArray[np.uint8]  # (n, S, S, 3)
    uptake: NDArray[np.float32] | None = None  # de-fused, (n, S, S)
    rows: list[dict[str, Any]] = field(default_factory=list)
    tbr_slices: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    tbr_patients: dict[str, NDArray[np.float64]] = field(default_factory=dict)


# ---------------------------------------------------------------------------- inference


def predict(model: LoadedModel, t1c: NDArray[np.floating], style: FusionStyle,
            batch_size: int = 16, backdrop: NDArray[np.floating] | None = None,
            runs: list[NDArray[np.int64]] | None = None,
            positions_mm: NDArray[np.floating] | None = None,
            slice_smoothing_mm: float | None = None
            ) -> tuple[NDArray[np.uint8], NDArray[np.float32] | None]:
    """Synthetic fusion (uint8 RGB) and, for an uptake model, its uptake, of (n, S, S) T1C,
    or (n, C, S, S) T1C with neighbouring slices for a model that takes them (the middle
    channel is the slice itself; :meth:`PairedDataset.input_grey`).

    An uptake model's output is smoothed along the slice normal within ``runs`` (indices
    into the n slices of each run of contiguous slices, in order; ``positions_mm`` of the
    n slices give each run's spacing) by ``slice_smoothing_mm`` (default the model
    card's; a ValueError when it is above 0 and the runs are not given), its contrast
    calibrated per run by the card's ``uptake_contrast_gain``, then drawn over
    ``backdrop`` (the T1C as the real fusion shows it; default the slice's own T1C), as
    the node draws it over the series' own T1C.
    """
    generator, card = model.generator, model.card
    device = next(generator.parameters()).device
    generator.eval()
    if t1c.ndim == 3:
        t1c = t1c[:, None]
    n, channels, height, width = t1c.shape
    if channels != card.input_channels:
        raise ValueError(f"the model takes {card.input_channels} input slice(s), got {channels}")
    sigma = card.slice_smoothing_mm if slice_smoothing_mm is None else slice_smoothing_mm
    if card.output_kind == "uptake" and sigma > 0 and (runs is None or positions_mm is None):
        raise ValueError(f"the model's output is smoothed along the slice normal ({sigma:g} mm): "
                         "give the runs of contiguous slices and their positions")
    # the display grey: a dataset's t1c may keep headroom above 1 (t1c_ceiling)
    under = (display_grey(t1c[:, channels // 2]) if backdrop is None
             else np.asarray(backdrop, dtype=np.float32))
    fusion = np.empty((n, height, width, 3), dtype=np.uint8)
    uptake = np.empty((n, height, width), dtype=np.float32) if card.output_kind == "uptake" \
        else None
    with torch.inference_mode():
        for start in tqdm(range(0, n, batch_size), desc="inference", unit="batch", leave=False):
            grey = np.asarray(t1c[start : start + batch_size], dtype=np.float32)
            x, pad = to_network(grey.reshape(-1, height, width), card.input_size)
            x = x.reshape(len(grey), channels, card.input_size, card.input_size)
            y = from_network(generator(x.to(device) * 2.0 - 1.0).float().cpu(), pad)
            unit = ((y.clamp(-1, 1) + 1.0) / 2.0).numpy()
            if uptake is None:
                fusion[start : start + len(grey)] = to_uint8(unit.transpose(0, 2, 3, 1))
            else:
                uptake[start : start + len(grey)] = unit[:, 0] * card.uptake_scale
    if uptake is not None:
        if sigma > 0 and runs is not None and positions_mm is not None:
            uptake = smooth_runs(uptake, runs, sigma, positions_mm)
        uptake = calibrate_contrast(uptake, runs, card.uptake_contrast_gain,
                                    card.fusion_style.display_threshold)
        fusion = draw_fusion(under, uptake, style)
    return fusion, uptake


def calibrate_contrast(uptake: NDArray[np.float32], runs: list[NDArray[np.int64]] | None,
                       gain: float, display_threshold: float) -> NDArray[np.float32]:
    """The model card's contrast calibration (:mod:`dicom_node.inference.uptake_contrast`)
    of each run of contiguous slices on its own, as the node calibrates each series; rows
    in no run (or all rows, without runs) as one more group."""
    if gain == 1.0:
        return uptake
    out = np.array(uptake, dtype=np.float32, copy=True)
    groups = [np.asarray(run, dtype=np.int64) for run in (runs or []) if len(run)]
    covered = np.zeros(len(out), dtype=bool)
    for run in groups:
        covered[run] = True
    rest = np.flatnonzero(~covered)
    if rest.size:
        groups.append(rest)
    for rows in groups:
        out[rows] = stretch_above_median(out[rows], gain, display_threshold)
    return out


def draw_fusion(backdrop: NDArray[np.floating], uptake: NDArray[np.floating],
                style: FusionStyle, chunk: int = 256) -> NDArray[np.uint8]:
    """uint8 fusion of (n, S, S) uptake over its backdrop, drawn ``chunk`` slices at a time."""
    fusion = np.empty((*np.shape(uptake), 3), dtype=np.uint8)
    for start in range(0, len(fusion), chunk):
        fusion[start : start + chunk] = to_uint8(fuse(
            backdrop[start : start + chunk],
            np.asarray(uptake[start : start + chunk], dtype=np.float32), style))
    return fusion


def oracle_methods(data: ds.PairedDataset, idx: NDArray[np.int64], output_kind: str,
                   style: FusionStyle, backdrop: NDArray[np.float32]) -> list[Method]:
    """The oracle drawn like the model's fusion (``oracle``), and for an uptake model
    also the dataset's native-matrix rendering (``oracle_native``); see the module doc."""
    native = data.get("oracle_fusion")[idx] if data.has("oracle_fusion") else None
    if output_kind == "uptake" and data.has("oracle_uptake"):
        drawn = draw_fusion(backdrop, data.get("oracle_uptake")[idx], style)
        return [Method("oracle", drawn),
                *([Method("oracle_native", native)] if native is not None else [])]
    return [Method("oracle", native)] if native is not None else []


def evaluation_runs(data: ds.PairedDataset, idx: NDArray[np.int64]
                    ) -> list[NDArray[np.int64]]:
    """Runs of contiguous slices among rows ``idx`` (positions into ``idx``): each
    study's runs over the whole dataset, cut wherever a slice is not in ``idx``, so a
    slice-level split never makes distant slices neighbours."""
    return restrict_runs(contiguous_runs(data.study_uid, data.slice_position_mm), idx)


def defuse_uptake(fusion: NDArray[np.uint8], grey: NDArray[np.floating], style: FusionStyle,
                  chunk: int = 16384) -> NDArray[np.float32]:
    """Uptake de-fused from uint8 fusion images; only pixels that differ from grey are looked up.

    Equivalent to ``defuse(fusion / 255, grey, style).uptake`` (a pixel within the blend
    tolerance of its grey is "not shown", uptake 0) at a fraction of the cost.
    """
    f = fusion.astype(np.float32) / 255.0
    g = np.asarray(grey, dtype=np.float32)
    out = np.zeros(g.shape, dtype=np.float32)
    selected = np.abs(f - g[..., None]).max(axis=-1) > 2.0 / 255.0
    fs, gs = f[selected], g[selected]
    values = np.zeros(len(gs), dtype=np.float32)
    for start in range(0, len(gs), chunk):
        values[start : start + chunk] = defuse(fs[start : start + chunk],
                                               gs[start : start + chunk], style).uptake
    out[selected] = values
    return out


# ----------------------------------------------------------------------------- baselines


def background_mask(data: ds.PairedDataset, idx: NDArray[np.int64]) -> NDArray[np.bool_]:
    """brain & ~tumour & ~oedema & ~striatum of slices ``idx``."""
    mask = data.get("brain_mask")[idx].astype(bool)
    if data.has("tumour_labels"):
        mask &= data.get("tumour_labels")[idx] == 0
    for name in ("oedema", "striatum_mask"):
        if data.has(name):
            mask &= ~data.get(name)[idx].astype(bool)
    return mask


def population_mean_uptake(data: ds.PairedDataset, bin_mm: float
                           ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(bin centres, mean uptake per bin) of the training split without tumours."""
    train = data.indices("train")
    style = data.fusion_style
    positions = data.slice_position_mm[train].astype(np.float64)
    bins = np.floor(positions / bin_mm).astype(np.int64)
    unique = np.unique(bins)
    size = data.size
    sums = np.zeros((len(unique), size, size), dtype=np.float64)
    counts = np.zeros(len(unique), dtype=np.int64)
    lookup = {int(b): i for i, b in enumerate(unique)}
    for start in tqdm(range(0, len(train), 64), desc="population mean", unit="chunk",
                      leave=False):
        part = train[start : start + 64]
        if data.has("pet_suv") or data.has("uptake"):  # what an uptake model learns
            up = data.get(ds.uptake_array(data))[part].astype(np.float32)
        else:
            up = defuse_uptake(data.fusion[part], data.backdrop(part), style)
        if data.has("brain_mask"):
            bg = background_mask(data, part)
            lesion = np.zeros_like(bg)
            if data.has("tumour_labels"):
                lesion |= data.get("tumour_labels")[part] > 0
            if data.has("oedema"):
                lesion |= data.get("oedema")[part].astype(bool)
            for k in range(len(part)):
                if lesion[k].any() and bg[k].any():
                    up[k][lesion[k]] = up[k][bg[k]].mean()
        for k, b in enumerate(bins[start : start + 64]):
            sums[lookup[int(b)]] += up[k]
            counts[lookup[int(b)]] += 1
    centres = (unique.astype(np.float64) + 0.5) * bin_mm
    return centres, sums / counts[:, None, None]


def population_mean_fusion(data: ds.PairedDataset, idx: NDArray[np.int64], bin_mm: float
                           ) -> NDArray[np.uint8]:
    centres, means = population_mean_uptake(data, bin_mm)
    style = data.fusion_style
    out = np.empty((len(idx), data.size, data.size, 3), dtype=np.uint8)
    under = data.backdrop(idx)
    for k, i in enumerate(idx):
        nearest = int(np.argmin(np.abs(centres - float(data.slice_position_mm[i]))))
        out[k] = to_uint8(fuse(under[k], means[nearest], style))
    return out


def grey_fusion(grey: NDArray[np.floating]) -> NDArray[np.uint8]:
    """The T1C alone as a fusion image would show it, no uptake drawn."""
    return to_uint8(np.repeat(np.asarray(grey, dtype=np.float32)[..., None], 3, axis=-1))


# ------------------------------------------------------------------------------- metrics


def image_rows(method: Method, real: NDArray[np.uint8], real_uptake: NDArray[np.float32] | None,
               data: ds.PairedDataset, idx: NDArray[np.int64], uptake_scale: float) -> None:
    """Per-slice metrics of one method against the real fusion (and real uptake)."""
    real_f = real.astype(np.float32) / 255.0
    fake_f = method.fusion.astype(np.float32) / 255.0
    fsims = np.concatenate([fsim(fake_f[s : s + 32], real_f[s : s + 32])
                            for s in range(0, len(idx), 32)])
    brain = data.get("brain_mask")[idx].astype(bool) if data.has("brain_mask") else None
    tumour = data.get("tumour_labels")[idx] > 0 if data.has("tumour_labels") else None
    for k, i in enumerate(tqdm(idx, desc=f"metrics {method.name}", unit="slice", leave=False)):
        value = mse(fake_f[k], real_f[k])
        row: dict[str, Any] = {
            "method": method.name, "index": int(i), "patient_id": str(data.patient_id[i]),
            "slice_position_mm": float(data.slice_position_mm[i]),
            "has_tumour": bool(data.has_tumour[i]), "psnr": psnr_from_mse(value), "mse": value,
            "ssim": ssim(fake_f[k], real_f[k]), "fsim": float(fsims[k]),
        }
        if real_uptake is not None and method.uptake is not None:
            a = np.clip(method.uptake[k] / uptake_scale, 0, 1)
            b = np.clip(real_uptake[k] / uptake_scale, 0, 1)
            if brain is not None:
                row["uptake_psnr_brain"] = masked_psnr(a, b, brain[k])
                row["uptake_ssim_brain"] = masked_ssim(a, b, brain[k])
            if tumour is not None and tumour[k].any():
                row["uptake_psnr_tumour"] = masked_psnr(a, b, tumour[k])
                row["uptake_ssim_tumour"] = masked_ssim(a, b, tumour[k])
        method.rows.append(row)


@dataclass(frozen=True)
class Roi:
    """One TBR measurement: slice positions (into idx), tumour and background masks."""

    level: str  # slice | patient
    patient_id: str
    label: int
    slices: NDArray[np.int64]
    tumour: NDArray[np.bool_]
    background: NDArray[np.bool_]


def tbr_rois(data: ds.PairedDataset, idx: NDArray[np.int64]) -> list[Roi]:
    """Per lesion per tumour-bearing slice, and per lesion over each patient's slices."""
    if not (data.has("tumour_labels") and data.has("brain_mask")):
        return []
    labels = data.get("tumour_labels")[idx]
    bg = background_mask(data, idx)
    patients = data.patient_id[idx]
    rois: list[Roi] = []
    for patient in sorted(set(patients.tolist())):
        pos = np.flatnonzero(patients == patient)
        volume_bg = bg[pos]
        for label in sorted(int(v) for v in np.unique(labels[pos]) if v):
            lesion = labels[pos] == label
            if lesion.sum() >= MIN_TUMOUR_PIXELS:
                rois.append(Roi("patient", patient, label, pos, lesion, volume_bg))
            for k, p in enumerate(pos):
                if lesion[k].sum() < MIN_TUMOUR_PIXELS:
                    continue
                if bg[p].sum() >= MIN_BACKGROUND_PIXELS:
                    rois.append(Roi("slice", patient, label, np.array([p]), lesion[k][None],
                                    bg[p][None]))
                else:  # too little background on the slice: the patient's volume
                    only_k = np.zeros_like(lesion)
                    only_k[k] = lesion[k]
                    rois.append(Roi("slice", patient, label, pos, only_k, volume_bg))
    return rois


def measure_tbr(uptake: NDArray[np.float32], rois: list[Roi], level: str
                ) -> dict[str, NDArray[np.float64]]:
    values = [tbr(uptake[roi.slices], roi.tumour, roi.background)
              for roi in rois if roi.level == level]
    arr = np.asarray(values, dtype=np.float64).reshape(-1, 2)
    return {"TBRmax": arr[:, 0], "TBRmean": arr[:, 1]}


def summarise(method: Method, real_tbr: dict[str, dict[str, NDArray[np.float64]]]
              ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in (*IMAGE_METRICS, *UPTAKE_METRICS):
        mean, sd, n = mean_sd([row.get(key, np.nan) for row in method.rows])
        out[key] = mean
        out[f"{key}_sd"] = sd
        out[f"{key}_n"] = n
    for level, tbrs in (("slices", method.tbr_slices), ("patients", method.tbr_patients)):
        real = real_tbr.get(level)
        for key in ("TBRmax", "TBRmean"):
            if real is None or key not in tbrs:
                continue
            corr = pearson(real[key], tbrs[key])
            out[f"r_{key.lower()}_{level}"] = corr.r
            out[f"corr_{key.lower()}_{level}"] = corr.as_dict()
    return out


def checks(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Issue 3 section 5: model vs baselines and vs oracle, each PASS/FAIL."""
    model = summary.get("model", {})
    result: dict[str, dict[str, Any]] = {}

    def finite(v: Any) -> bool:
        return isinstance(v, int | float) and math.isfinite(v)

    beaten = []
    for baseline in ("t1c_grey", "population_mean"):
        base = summary.get(baseline, {})
        for key in PET_METRICS:
            m, b = model.get(key, np.nan), base.get(key, np.nan)
            # An undefined baseline figure (e.g. r of a constant TBR, PSNR over no uptake)
            # counts as beaten by a defined model figure.
            ok = finite(m) and (not finite(b) or m > b)
            beaten.append((baseline, key, m, b, ok))
    result["beats_baselines_pet"] = {
        "text": "beats both baselines on every PET-specific metric",
        "pass": bool(beaten) and all(ok for *_, ok in beaten),
        "detail": [f"{k} vs {b}: {m:.4g} vs {v:.4g}" for b, k, m, v, _ in beaten],
    }
    oracle = summary.get("oracle")
    if oracle is None:
        return result
    d_psnr = model.get("psnr", np.nan) - oracle.get("psnr", np.nan)
    result["psnr_vs_oracle"] = {"text": "whole-image PSNR within 2 dB of the oracle",
                                "pass": finite(d_psnr) and d_psnr >= -2.0,
                                "detail": [f"model - oracle = {d_psnr:+.3f} dB"]}
    for key in ("ssim", "fsim"):
        diff = model.get(key, np.nan) - oracle.get(key, np.nan)
        result[f"{key}_vs_oracle"] = {"text": f"{key.upper()} within 0.03 of the oracle",
                                      "pass": finite(diff) and diff >= -0.03,
                                      "detail": [f"model - oracle = {diff:+.4f}"]}
    for key in ("r_tbrmean_slices", "r_tbrmax_slices"):
        m, o = model.get(key, np.nan), oracle.get(key, np.nan)
        ok = finite(m) and finite(o) and m >= 0.8 * o
        result[f"{key}_vs_oracle"] = {
            "text": f"r({'TBRmean' if 'mean' in key else 'TBRmax'}) >= 0.8 x oracle",
            "pass": ok, "detail": [f"model {m:.3f}, 0.8 x oracle {0.8 * o:.3f}"]}
    return result



def example_slices(data: ds.PairedDataset, idx: NDArray[np.int64], count: int) -> list[int]:
    """Positions into ``idx``: each patient's largest-tumour slice (largest first), then
    the slices with the most brain of other patients spread over the split: one slice
    per patient while there are patients, never an empty slice where a brain slice
    exists."""
    count = min(count, len(idx))
    patients = data.patient_id[idx]
    if data.has("tumour_labels"):
        tumour_area = (data.get("tumour_labels")[idx] > 0).sum(axis=(1, 2))
    else:
        tumour_area = data.has_tumour[idx].astype(np.int64)
    # T1C pixels above a low level: how much of the slice the head fills.
    content = (np.asarray(data.t1c[idx], dtype=np.float32) > 0.1).sum(axis=(1, 2))
    picks: list[int] = []
    used: set[str] = set()
    for p in np.argsort(-tumour_area, kind="stable"):
        if len(picks) >= (count + 1) // 2 or tumour_area[p] == 0:
            break
        if str(patients[p]) not in used:
            picks.append(int(p))
            used.add(str(patients[p]))
    others = [str(pid) for pid in dict.fromkeys(patients.tolist()) if str(pid) not in used]
    wanted = count - len(picks)
    if others and wanted > 0:
        spread = np.linspace(0, len(others) - 1, min(wanted, len(others))).round().astype(int)
        for k in dict.fromkeys(spread.tolist()):
            rows = np.flatnonzero((patients == others[k]) & (tumour_area == 0))
            if rows.size:
                picks.append(int(rows[np.argmax(content[rows])]))
    rest = [int(p) for p in np.argsort(-content, kind="stable") if int(p) not in picks]
    picks += rest[: count - len(picks)]
    return sorted(picks)
