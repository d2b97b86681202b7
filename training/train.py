"""``dicom-node-train train``: Pix2Pix training on a paired slice dataset, resumable.

Writes into ``--out`` (RUNDIR):

- ``config.json``: the resolved configuration (architecture, device, dataset summary);
- ``checkpoint.pt``: G, D, optimisers, schedulers, AMP scaler, epoch, position in the
  epoch, global step and RNG states; written at every epoch end, every
  ``--checkpoint-every`` steps and when ``--max-steps`` stops the run;
- ``history.json``: losses (averaged every ``--log-every`` steps) and validation metrics
  (L1 in network units, PSNR and SSIM on images scaled to [0, 1]) per epoch;
- ``losses.png``, ``val_metrics.png``;
- ``generator.pt`` (+ ``.json``): the exported inference weights, at the end.

``--resume`` continues from ``checkpoint.pt`` exactly where it stopped: the sampling
order of an epoch depends only on (seed, epoch), so the batches already trained on
are skipped, and the torch / numpy / Python RNG states are restored.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from dicom_node.inference.model_weights import load_weights
from dicom_node.inference.slice_context import input_channels
from training import data as ds
from training import hard_negatives
from training.augment import AffineAugment, warp
from training.checkpoint import CHECKPOINT_FORMAT, atomic_torch_save, load_checkpoint
from training.export import export_checkpoint
from training.hard_negatives import HardNegatives
from training.metrics import mean_sd, psnr, ssim
from training.pix2pix import RECON_LOSSES, Pix2Pix, Pix2PixConfig
from training.soft_fusion import soft_fuse

log = logging.getLogger(__name__)

ARCHITECTURE_FOR_SIZE = {256: "unet_256", 128: "unet_128"}
# Settings that must not change when a run is resumed.
FIXED_ON_RESUME = ("dataset", "target", "ngf", "ndf", "batch_size", "seed", "uptake_scale",
                   "tumour_oversample", "tumour_l1_weight", "tumour_margin_px", "ema_decay", "hflip",
                   "epochs", "decay_epochs", "lambda_l1", "lr", "beta1", "context_slices",
                   "fusion_l1_weight", "fusion_gate_width_uptake", "augment_rotation_deg",
                   "augment_scale", "augment_shift_px", "small_lesion_area_px",
                   "small_lesion_max_gain", "recon_loss", "tumour_quantile",
                   "hard_negative_weight", "hard_negative_ratio", "hard_negative_smooth_px",
                   "non_enhancing_gain", "enhancing_t1c")


@dataclass(frozen=True)
class TrainConfig:
    dataset: str
    out: str
    epochs: int = 100
    decay_epochs: int = 100
    ngf: int = 64
    ndf: int = 64
    batch_size: int = 1
    target: str = "fusion"
    uptake_scale: float = 4.0
    tumour_oversample: float = 4.0
    tumour_l1_weight: float = 1.0  # 1 = the published loss
    tumour_margin_px: int = 2
    ema_decay: float = 0.0  # 0 = no generator weight average (as published)
    hflip: bool = False
    context_slices: int = 0  # neighbouring T1C slices each side as input (0 = as published)
    fusion_l1_weight: float = 0.0  # uptake models: L1 of the rendered fusion (0 = off)
    fusion_gate_width_uptake: float = 0.05  # logistic display gate of that rendering
    seed: int = 0
    device: str = "auto"
    lr: float = 2e-4
    beta1: float = 0.5
    lambda_l1: float = 100.0
    recon_loss: str = "l1"  # "l1" (published) or "l2" (the conditional mean), training/pix2pix.py
    tumour_quantile: float = 0.5  # pinball loss of this quantile in the tumour masks (0.5: L1)
    hard_negative_weight: float = 1.0  # L1 weight of mined false-focus pixels (1 = off)
    hard_negative_ratio: float = 1.6  # x slice background: what counts as hot
    hard_negative_smooth_px: int = 5  # real uptake averaged over this width before comparing
    max_steps: int | None = None
    threads: int | None = None
    val_max_slices: int | None = 512
    checkpoint_every: int = 500
    log_every: int = 10
    export: bool = True
    name: str | None = None
    version: str = "1"
    init_generator: str | None = None  # start from these weights (fine-tuning)
    bf16: bool = False  # bfloat16 autocast on the CPU
    augment_rotation_deg: float = 0.0  # random in-plane affine per slice (0 = off)
    augment_scale: float = 0.0
    augment_shift_px: float = 0.0
    small_lesion_area_px: int = 0  # raise small lesions' L1 weight and sampling (0 = off)
    small_lesion_max_gain: float = 8.0
    non_enhancing_gain: float = 1.0  # raise non-enhancing tumours' L1 weight and sampling
    enhancing_t1c: float = ds.ENHANCING_T1C  # a section below this T1C does not enhance


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    step: int
    epoch: int
    finished: bool
    last_validation: dict[str, float]
    weights: Path | None
    sha256: str | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig(dataset="", out="")
    parser.add_argument("--dataset", required=True, type=Path, help="dataset folder (pairs.npz)")
    parser.add_argument("--out", required=True, type=Path, help="run folder (RUNDIR)")
    parser.add_argument("--epochs", type=int, default=d.epochs,
                        help="epochs at the constant learning rate (default %(default)s)")
    parser.add_argument("--decay-epochs", type=int, default=d.decay_epochs,
                        help="epochs of linear decay to 0 after that (default %(default)s)")
    parser.add_argument("--ngf", type=int, default=d.ngf, help="generator width (%(default)s)")
    parser.add_argument("--ndf", type=int, default=d.ndf,
                        help="discriminator width (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--target", choices=ds.TARGETS, default=d.target,
                        help="fusion: RGB fusion (as published); uptake: 1-channel uptake")
    parser.add_argument("--uptake-scale", type=float, default=d.uptake_scale,
                        help="uptake target y = uptake / scale * 2 - 1 (%(default)s)")
    parser.add_argument("--tumour-oversample", type=float, default=d.tumour_oversample,
                        help="sampling weight of tumour slices relative to others "
                             "(1 = uniform permutation; default %(default)s)")
    parser.add_argument("--tumour-l1-weight", type=float, default=d.tumour_l1_weight,
                        help="L1 weight of pixels on the dataset's tumour masks grown by "
                             "--tumour-margin-px, relative to 1 elsewhere (needs "
                             "tumour_labels; 1 = the published loss; default %(default)s)")
    parser.add_argument("--tumour-margin-px", type=int, default=d.tumour_margin_px,
                        help="grow the tumour masks by this many pixels for "
                             "--tumour-l1-weight (the blurred uptake reaches past the "
                             "lesion; default %(default)s)")
    parser.add_argument("--small-lesion-area-px", type=int, default=d.small_lesion_area_px,
                        help="a lesion covering a pixels of a slice gets its tumour L1 weight "
                             "times clip(this / a, 1, --small-lesion-max-gain), and its slice "
                             "is drawn sqrt(that gain) times as often, so small lesions are "
                             "not drowned by large ones (0 = off; default %(default)s)")
    parser.add_argument("--small-lesion-max-gain", type=float, default=d.small_lesion_max_gain,
                        help="largest gain of --small-lesion-area-px (%(default)s)")
    parser.add_argument("--non-enhancing-gain", type=float, default=d.non_enhancing_gain,
                        help="a tumour cross-section whose T1C input stays below "
                             "--enhancing-t1c (no enhancement) gets its tumour L1 weight times "
                             "this, combined with the small-lesion gain and capped at the "
                             "larger maximum, and its slice is drawn sqrt of that more often "
                             "(1 = off; default %(default)s)")
    parser.add_argument("--enhancing-t1c", type=float, default=d.enhancing_t1c,
                        help="the network-input T1C (white matter about 1) a cross-section "
                             "must reach to count as enhancing (%(default)s)")
    parser.add_argument("--ema-decay", type=float, default=d.ema_decay,
                        help="keep an exponential moving average of the generator weights "
                             "with this decay per step (e.g. 0.999) and validate / export "
                             "it (0 = off, as published; default %(default)s)")
    parser.add_argument("--hflip", action="store_true", help="random left-right flips")
    parser.add_argument("--augment-rotation-deg", type=float, default=d.augment_rotation_deg,
                        help="random in-plane rotation of each pair, +- degrees (default "
                             "%(default)s = off)")
    parser.add_argument("--augment-scale", type=float, default=d.augment_scale,
                        help="random scaling of each pair, +- this fraction (default "
                             "%(default)s)")
    parser.add_argument("--augment-shift-px", type=float, default=d.augment_shift_px,
                        help="random shift of each pair, +- pixels (default %(default)s)")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast on the CPU (about twice the speed on CPUs "
                             "with AVX-512 BF16; the weights stay float32)")
    parser.add_argument("--context-slices", type=int, default=d.context_slices,
                        help="also feed this many neighbouring T1C slices on each side as "
                             "input channels (0 = one slice, as published; default "
                             "%(default)s)")
    parser.add_argument("--fusion-l1-weight", type=float, default=d.fusion_l1_weight,
                        help="uptake target: also add this weight x the L1 error of the "
                             "fusion rendered from the output (with a soft display "
                             "threshold) against the real fusion, in [0, 1] image units; "
                             "it teaches where the overlay's edge lies (0 = off; default "
                             "%(default)s)")
    parser.add_argument("--fusion-gate-width-uptake", type=float,
                        default=d.fusion_gate_width_uptake,
                        help="scale of the logistic display threshold of that rendering, "
                             "in uptake units (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--beta1", type=float, default=d.beta1)
    parser.add_argument("--lambda-l1", type=float, default=d.lambda_l1)
    parser.add_argument("--recon-loss", choices=RECON_LOSSES, default=d.recon_loss,
                        help="reconstruction term weighted by --lambda-l1: l1 (as published; "
                             "the generator learns the conditional median) or l2 (squared "
                             "error / 0.1: the conditional mean, what the oracle is)")
    parser.add_argument("--tumour-quantile", type=float, default=d.tumour_quantile,
                        help="in the tumour masks (where --tumour-l1-weight applies), the L1 "
                             "becomes the doubled pinball loss of this quantile: above 0.5 "
                             "under-drawing a tumour costs more than over-drawing it "
                             "(default %(default)s: plain L1)")
    parser.add_argument("--hard-negative-weight", type=float, default=d.hard_negative_weight,
                        help="L1 weight of the hard negatives mined on each batch: brain "
                             "pixels outside the grown tumour masks where the generator draws "
                             ">= --hard-negative-ratio x its slice background and the real "
                             "uptake (smoothed) is below that ratio of its own, striatum "
                             "excluded; needs tumour_labels, brain_mask and striatum_mask "
                             "(1 = off; default %(default)s)")
    parser.add_argument("--hard-negative-ratio", type=float, default=d.hard_negative_ratio,
                        help="what counts as hot, x slice background (the node's tumour "
                             "threshold; default %(default)s)")
    parser.add_argument("--hard-negative-smooth-px", type=int,
                        default=d.hard_negative_smooth_px,
                        help="the real uptake is averaged over this odd width before it is "
                             "compared (default %(default)s)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many steps in total (resumable)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: all cores)")
    parser.add_argument("--val-max-slices", type=int, default=d.val_max_slices,
                        help="validate on at most this many evenly spaced val slices "
                             "(0 = all; default %(default)s)")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                        help="also checkpoint every N steps (%(default)s)")
    parser.add_argument("--log-every", type=int, default=d.log_every)
    parser.add_argument("--no-export", action="store_true",
                        help="do not write RUNDIR/generator.pt at the end")
    parser.add_argument("--name", default=None, help="model name in the exported card")
    parser.add_argument("--version", default=d.version, help="model version in the card")
    parser.add_argument("--resume", action="store_true", help="continue RUNDIR/checkpoint.pt")
    parser.add_argument("--init-generator", type=Path, default=None,
                        help="start the generator from this weights file (fine-tuning)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = TrainConfig(
        dataset=str(args.dataset), out=str(args.out), epochs=args.epochs,
        decay_epochs=args.decay_epochs, ngf=args.ngf, ndf=args.ndf, batch_size=args.batch_size,
        target=args.target, uptake_scale=args.uptake_scale,
        tumour_oversample=args.tumour_oversample, tumour_l1_weight=args.tumour_l1_weight,
        tumour_margin_px=args.tumour_margin_px,
        small_lesion_area_px=args.small_lesion_area_px,
        small_lesion_max_gain=args.small_lesion_max_gain,
        non_enhancing_gain=args.non_enhancing_gain, enhancing_t1c=args.enhancing_t1c,
        ema_decay=args.ema_decay, hflip=args.hflip,
        context_slices=args.context_slices, fusion_l1_weight=args.fusion_l1_weight,
        fusion_gate_width_uptake=args.fusion_gate_width_uptake, seed=args.seed,
        device=args.device, lr=args.lr, beta1=args.beta1, lambda_l1=args.lambda_l1,
        recon_loss=args.recon_loss, tumour_quantile=args.tumour_quantile,
        hard_negative_weight=args.hard_negative_weight,
        hard_negative_ratio=args.hard_negative_ratio,
        hard_negative_smooth_px=args.hard_negative_smooth_px,
        max_steps=args.max_steps, threads=args.threads,
        val_max_slices=args.val_max_slices or None, checkpoint_every=args.checkpoint_every,
        log_every=args.log_every, export=not args.no_export, name=args.name,
        version=args.version,
        init_generator=str(args.init_generator) if args.init_generator else None,
        bf16=args.bf16, augment_rotation_deg=args.augment_rotation_deg,
        augment_scale=args.augment_scale, augment_shift_px=args.augment_shift_px,
    )
    try:
        result = train(config, resume=args.resume)
    except (ds.DatasetError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 2
    print(f"step {result.step}, epoch {result.epoch}, "
          f"{'finished' if result.finished else 'stopped (resumable with --resume)'}")
    if result.last_validation:
        print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                          result.last_validation.items()))
    if result.weights is not None:
        print(f"weights: {result.weights}\nsha256: {result.sha256}")
    return 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available")
    return device


def architecture_for(size: int) -> str:
    if size not in ARCHITECTURE_FOR_SIZE:
        raise ValueError(f"dataset slice size {size} has no generator; use 128 or 256")
    return ARCHITECTURE_FOR_SIZE[size]


def rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), np_state[2],
                         np_state[3], np_state[4]))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))


def write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def dataset_info(data: ds.PairedDataset) -> dict[str, Any]:
    return {
        "path": str(data.path),
        "size": data.size,
        "fusion_style": data.fusion_style.as_dict(),
        "split_method": data.split_method,
        "split_seed": data.splits.get("seed"),
        "leaks_patients": bool(data.splits.get("leaks_patients", False)),
        "source": data.info.get("source_dir") or data.info.get("source"),
        "pet_layout": (data.info.get("phantom_cohort") or {}).get("pet_layout", "same-grid"),
        "t1c_ceiling": data.t1c_ceiling,
        "uptake_array": ds.uptake_array(data) if (data.has("pet_suv") or data.has("uptake"))
        else None,
        "splits": {split: data.summary(split) for split in ds.SPLITS},
    }


def subset(idx: NDArray[np.int64], limit: int | None) -> NDArray[np.int64]:
    """At most ``limit`` evenly spaced entries of ``idx``."""
    if limit is None or len(idx) <= limit:
        return idx
    picks = np.linspace(0, len(idx) - 1, limit).round().astype(np.int64)
    return idx[picks]


def to_unit(y: torch.Tensor) -> NDArray[np.float32]:
    """Network output (B, C, H, W) in [-1, 1] -> (B, H, W[, 3]) in [0, 1]."""
    unit = ((y.float().clamp(-1, 1) + 1.0) / 2.0).cpu().numpy()
    return np.asarray(unit[:, 0] if unit.shape[1] == 1 else unit.transpose(0, 2, 3, 1),
                      dtype=np.float32)


def validate(model: Pix2Pix, data: ds.PairedDataset, idx: NDArray[np.int64], config: TrainConfig,
             batch_size: int = 16) -> dict[str, float]:
    """L1 (network units), PSNR and SSIM (images in [0, 1]) of the generator in eval mode."""
    if len(idx) == 0:
        return {}
    generator = model.inference_generator
    was_training = generator.training
    generator.eval()
    l1_sum, count = 0.0, 0
    psnrs: list[float] = []
    ssims: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            x, y = ds.batch(data, part, config.target, config.uptake_scale,
                            config.context_slices)
            with model.autocast():
                out = generator(x.to(model.device)).float()
            y = y.to(model.device)
            l1_sum += float((out - y).abs().mean(dim=(1, 2, 3)).sum())
            count += len(part)
            fake, real = to_unit(out), to_unit(y)
            for a, b in zip(fake, real, strict=True):
                psnrs.append(psnr(a, b))
                ssims.append(ssim(a, b))
    generator.train(was_training)
    return {"val_l1": l1_sum / count, "val_psnr": mean_sd(psnrs)[0], "val_ssim": mean_sd(ssims)[0]}


def fusion_target(data: ds.PairedDataset, idx: NDArray[np.int64]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grey backdrop (B, 1, S, S), real fusion (B, 3, S, S)), both in [0, 1]."""
    grey = torch.from_numpy(data.backdrop(idx)).unsqueeze(1)
    real = torch.from_numpy(data.fusion[idx].astype(np.float32) / 255.0)
    return grey, real.permute(0, 3, 1, 2).contiguous()


def as_uptake(t: torch.Tensor, uptake_scale: float) -> torch.Tensor:
    """The network's -1..1 uptake channel in uptake units (0..``uptake_scale``)."""
    return (t + 1.0) / 2.0 * uptake_scale


def fusion_l1_term(pair: tuple[torch.Tensor, torch.Tensor], data: ds.PairedDataset,
                   config: TrainConfig, device: torch.device
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The generator loss term ``fusion_l1_weight * L1(soft fusion of output, real fusion)``."""
    grey, real = (t.to(device, non_blocking=True) for t in pair)
    style = data.fusion_style

    def term(output: torch.Tensor) -> torch.Tensor:
        uptake = as_uptake(output, config.uptake_scale)
        rendered = soft_fuse(uptake, grey, style, config.fusion_gate_width_uptake)
        return config.fusion_l1_weight * (rendered - real).abs().mean()

    return term


def hard_negative_masks(data: ds.PairedDataset, idx: NDArray[np.int64]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(brain, tumours and striatum) of slices ``idx`` as float (B, 1, S, S), to be
    flipped and warped with the batch. The striatum is FDOPA's physiological uptake,
    whose ratio differs per patient and which the node excludes anyway: where a
    generator draws it wider than a patient's PET is no false focus."""
    brain = torch.from_numpy(data.get("brain_mask")[idx].astype(np.float32)).unsqueeze(1)
    hot = (data.get("tumour_labels")[idx] > 0) | data.get("striatum_mask")[idx].astype(bool)
    return brain, torch.from_numpy(hot.astype(np.float32)).unsqueeze(1)


def hard_negative_weighting(y: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor],
                            hard: HardNegatives, config: TrainConfig, device: torch.device
                            ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Maps the generator output to the hard negatives' L1 weights (1 elsewhere)."""
    real = as_uptake(y.to(device).float(), config.uptake_scale)
    brain = masks[0].to(device) > 0.5
    zone = hard_negatives.excluded_zone(masks[1].to(device) > 0.5,
                                        config.tumour_margin_px + hard.smooth_px // 2)

    def weigh(output: torch.Tensor) -> torch.Tensor:
        fake = as_uptake(output.clamp(-1.0, 1.0), config.uptake_scale)
        mask = hard_negatives.hard_negative_mask(fake, real, brain, zone, hard.ratio,
                                                 hard.smooth_px)
        return hard_negatives.weights(mask, hard.weight)

    return weigh


def widened_state(initial: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """``initial`` generator weights fitted to ``target``'s shapes: a one-slice model's
    first convolution becomes the middle channel of a wider input (the neighbours start
    at zero, so the widened model begins with exactly the one-slice model's output)."""
    state = dict(initial)
    for key, value in initial.items():
        want = target.get(key)
        if want is None or want.shape == value.shape:
            continue
        if value.ndim != 4 or value.shape[1] != 1 or want.shape[0] != value.shape[0] \
                or want.shape[2:] != value.shape[2:]:
            raise ValueError(f"--init-generator weight {key} {tuple(value.shape)} does not fit "
                             f"this run's {tuple(want.shape)}")
        widened = torch.zeros_like(want)
        widened[:, want.shape[1] // 2] = value[:, 0]
        state[key] = widened
    return state


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Train (or resume) a run; returns where it stopped and the exported weights."""
    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / "checkpoint.pt"
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    data = ds.load_dataset(Path(config.dataset))
    if config.target == "uptake" and not (data.has("pet_suv") or data.has("uptake")):
        raise ValueError("--target uptake needs a dataset with a 'pet_suv' (measured PET) "
                         "or an 'uptake' array")
    # the loss weighs pixels by the tumour masks (and the sampling by lesion gains)
    weighs_lesions = (config.tumour_l1_weight != 1.0 or config.small_lesion_area_px > 0
                      or config.non_enhancing_gain != 1.0)
    if weighs_lesions and not data.has("tumour_labels"):
        raise ValueError("--tumour-l1-weight, --small-lesion-area-px and --non-enhancing-gain "
                         "need a dataset with tumour masks ('tumour_labels')")
    if config.non_enhancing_gain < 1.0:
        raise ValueError("--non-enhancing-gain must be >= 1")
    if config.non_enhancing_gain != 1.0 and config.tumour_l1_weight <= 1.0:
        raise ValueError("--non-enhancing-gain raises the tumour L1 weight: it needs "
                         "--tumour-l1-weight above 1")
    if config.recon_loss not in RECON_LOSSES:
        raise ValueError(f"--recon-loss must be one of {RECON_LOSSES}, got {config.recon_loss!r}")
    if not 0.0 < config.tumour_quantile < 1.0:
        raise ValueError("--tumour-quantile must lie between 0 and 1")
    if config.tumour_quantile != 0.5 and (config.tumour_l1_weight <= 1.0
                                          or config.recon_loss != "l1"):
        raise ValueError("--tumour-quantile needs the tumour masks (--tumour-l1-weight above "
                         "1) and --recon-loss l1")
    hard = HardNegatives(config.hard_negative_weight, config.hard_negative_ratio,
                         config.hard_negative_smooth_px)
    if hard.active and (config.target != "uptake" or not data.has("tumour_labels")
                        or not data.has("brain_mask") or not data.has("striatum_mask")):
        raise ValueError("--hard-negative-weight needs --target uptake and a dataset with "
                         "tumour, brain and striatum masks ('tumour_labels', 'brain_mask', "
                         "'striatum_mask')")
    if config.small_lesion_area_px < 0 or config.small_lesion_max_gain < 1.0:
        raise ValueError("--small-lesion-area-px must be >= 0 and --small-lesion-max-gain "
                         ">= 1")
    if config.fusion_l1_weight < 0 or config.fusion_gate_width_uptake <= 0:
        raise ValueError("--fusion-l1-weight must be >= 0 and --fusion-gate-width-uptake > 0")
    if config.fusion_l1_weight > 0 and config.target != "uptake":
        raise ValueError("--fusion-l1-weight needs --target uptake (a fusion model's L1 is "
                         "already on the fusion)")
    architecture = architecture_for(data.size)
    train_idx, val_idx = data.indices("train"), data.indices("val")
    if len(train_idx) == 0:
        raise ValueError(f"dataset {data.path} has no training pairs")

    state: dict[str, Any] | None = None
    if resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path)
        old = state["config"]
        defaults = TrainConfig(dataset="", out="")  # settings older checkpoints lack
        changed = [k for k in FIXED_ON_RESUME
                   if old.get(k, getattr(defaults, k)) != getattr(config, k)]
        if changed:
            raise ValueError(f"cannot resume with changed settings: {', '.join(changed)} "
                             f"(checkpoint has {', '.join(f'{k}={old.get(k)}' for k in changed)})")
        trained_on = float(state["resolved"]["dataset_info"].get("t1c_ceiling", 1.0))
        if trained_on != data.t1c_ceiling:
            raise ValueError(f"cannot resume: the run began on a dataset whose T1C grey is "
                             f"clipped at {trained_on:g}, {data.path} clips it at "
                             f"{data.t1c_ceiling:g}")
        # The starting weights are those the run began from, whatever the resuming
        # command line says (the checkpoint already holds the trained generator).
        config = replace(config, init_generator=old.get("init_generator"))
    elif resume:
        log.warning("no checkpoint at %s: starting a new run", checkpoint_path)

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    p2p_config = Pix2PixConfig(
        architecture=architecture, ngf=config.ngf, ndf=config.ndf,
        input_nc=input_channels(config.context_slices),
        output_nc=ds.output_channels(config.target), lr=config.lr, beta1=config.beta1,
        lambda_l1=config.lambda_l1, recon_loss=config.recon_loss,
        tumour_quantile=config.tumour_quantile, epochs=config.epochs,
        decay_epochs=config.decay_epochs,
        ema_decay=config.ema_decay, cpu_bf16=config.bf16,
    )
    model = Pix2Pix(p2p_config, device)
    augment = AffineAugment(config.augment_rotation_deg, config.augment_scale,
                            config.augment_shift_px)
    history: dict[str, Any] = {"epochs": [], "steps": [], "last_validation": {}}
    epoch, batch_in_epoch, step = 0, 0, 0
    sums: dict[str, float] = {}
    window: dict[str, float] = {}
    init_sha256: str | None = None
    init_ceiling: float | None = None
    if state is None and config.init_generator:
        initial = load_weights(Path(config.init_generator))
        if (initial.card.architecture, initial.card.ngf) != (architecture, config.ngf):
            raise ValueError(f"--init-generator is {initial.card.architecture} ngf "
                             f"{initial.card.ngf}, this run is {architecture} ngf {config.ngf}")
        model.generator.load_state_dict(widened_state(
            initial.generator.state_dict(), model.generator.state_dict()))
        model.reset_average()
        init_sha256 = initial.sha256
        init_ceiling = initial.card.t1c_input_ceiling
        print(f"generator initialised from {config.init_generator} (sha256 {initial.sha256[:16]})")
        if init_ceiling != data.t1c_ceiling:
            log.warning("--init-generator read the T1C clipped at %g; this dataset clips it "
                        "at %g: the run adapts it to the new input", init_ceiling,
                        data.t1c_ceiling)
    if state is not None:
        model.load_state_dict(state["model"])
        epoch, batch_in_epoch, step = state["epoch"], state["batch_in_epoch"], state["step"]
        sums, window = dict(state["epoch_sums"]), dict(state["log_window"])
        history = json.loads(state["history"])
        set_rng_state(state["rng"])
        print(f"resuming {checkpoint_path} at step {step} (epoch {epoch}, batch {batch_in_epoch})")

    info = dataset_info(data)
    resolved = {**asdict(config), "architecture": architecture, "device_resolved": str(device),
                "mixed_precision": model.use_amp, "torch": str(torch.__version__),
                "torch_threads": torch.get_num_threads(), "dataset_info": info,
                "input_channels": p2p_config.input_nc, "output_channels": p2p_config.output_nc,
                "slice_spacing_mm": data.slice_spacing_mm()}
    if state is not None:  # a resumed run keeps what its start recorded
        init_sha256 = state["resolved"].get("init_generator_sha256")
        init_ceiling = state["resolved"].get("init_generator_t1c_ceiling")
    if init_sha256 is not None:
        resolved["init_generator_sha256"] = init_sha256
    if init_ceiling is not None:
        resolved["init_generator_t1c_ceiling"] = init_ceiling
    write_json(run_dir / "config.json", resolved)

    weights = None
    slice_gain = None
    if config.small_lesion_area_px > 0 or config.non_enhancing_gain != 1.0:
        slice_gain = np.sqrt(ds.lesion_slice_gain(
            data, train_idx, config.small_lesion_area_px, config.small_lesion_max_gain,
            non_enhancing_gain=config.non_enhancing_gain, enhancing_t1c=config.enhancing_t1c))
    if config.tumour_oversample != 1.0 or slice_gain is not None:
        weights = ds.sampling_weights(data.has_tumour[train_idx], config.tumour_oversample,
                                      slice_gain)
    val_subset = subset(val_idx, config.val_max_slices)
    n_train = len(train_idx)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total_epochs = config.epochs + config.decay_epochs
    total_steps = total_epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    def save(epoch_: int, batch_: int) -> None:
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "config": asdict(config), "resolved": resolved,
            "model": model.state_dict(), "epoch": epoch_, "batch_in_epoch": batch_,
            "step": step, "epoch_sums": sums, "log_window": window,
            "history": json.dumps(history), "rng": rng_state(),
        }, checkpoint_path)

    def finish_plots() -> None:
        write_json(run_dir / "history.json", history)
        from training.plots import training_curves

        training_curves(history, run_dir)

    stopped = False
    bar = tqdm(total=total_steps, initial=min(step, total_steps), desc="train", unit="step",
               dynamic_ncols=True)
    started = time.monotonic()
    while epoch < total_epochs and not stopped:
        order = ds.epoch_order(n_train, weights, config.seed, epoch)
        flips = torch.rand(n_train, generator=torch.Generator().manual_seed(
            config.seed * 7_919 + epoch)) < 0.5
        for b in range(batch_in_epoch, steps_per_epoch):
            if config.max_steps is not None and step >= config.max_steps:
                stopped = True
                break
            positions = order[b * config.batch_size : (b + 1) * config.batch_size]
            idx = train_idx[positions.numpy()]
            x, y = ds.batch(data, idx, config.target, config.uptake_scale, config.context_slices)
            l1_weight = None
            if weighs_lesions:
                l1_weight = ds.l1_weights(data, idx, config.tumour_l1_weight,
                                          config.tumour_margin_px,
                                          config.small_lesion_area_px,
                                          config.small_lesion_max_gain,
                                          config.non_enhancing_gain, config.enhancing_t1c)
            fusion_pair = fusion_target(data, idx) if config.fusion_l1_weight > 0 else None
            masks = hard_negative_masks(data, idx) if hard.active else None
            if config.hflip:
                flip = flips[positions]
                for tensor in (x, y, l1_weight, *(fusion_pair or ()), *(masks or ())):
                    if tensor is not None:
                        tensor[flip] = tensor[flip].flip(-1)
            if augment.active:
                theta = augment.matrices(len(idx), data.size, torch.Generator().manual_seed(
                    (config.seed * 1_000_003 + epoch) * 100_003 + b))
                x = warp(x, theta, -1.0)
                y = warp(y, theta, -1.0)
                if l1_weight is not None:
                    l1_weight = warp(l1_weight, theta, 1.0)
                if fusion_pair is not None:
                    fusion_pair = (warp(fusion_pair[0], theta, 0.0),
                                   warp(fusion_pair[1], theta, 0.0))
                if masks is not None:
                    masks = (warp(masks[0], theta, 0.0), warp(masks[1], theta, 0.0))
            extra = None
            if fusion_pair is not None:
                extra = fusion_l1_term(fusion_pair, data, config, model.device)
            mining = None
            if masks is not None:
                mining = hard_negative_weighting(y, masks, hard, config, model.device)
            losses = model.train_step(x, y, l1_weight, extra, mining)
            step += 1
            batch_in_epoch = b + 1
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value
                window[key] = window.get(key, 0.0) + value
            sums["n"] = sums.get("n", 0.0) + 1
            window["n"] = window.get("n", 0.0) + 1
            if window["n"] >= config.log_every:
                n = window.pop("n")
                history["steps"].append({"step": step, "epoch": epoch,
                                         **{k: v / n for k, v in window.items()}})
                window = {}
            bar.update(1)
            bar.set_postfix(epoch=epoch, D=f"{losses['loss_D']:.3f}",
                            G=f"{losses['loss_G_GAN']:.3f}", L1=f"{losses['loss_G_L1']:.4f}")
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save(epoch, batch_in_epoch)
        if stopped:
            break
        # End of epoch: validation, LR schedule, history, checkpoint, plots.
        n = sums.pop("n", 1.0)
        entry = {"epoch": epoch, "step": step, "lr": model.lr,
                 **{k: v / n for k, v in sums.items()}}
        metrics = validate(model, data, val_subset, config)
        entry.update(metrics)
        entry["elapsed_s"] = round(time.monotonic() - started, 1)
        history["epochs"].append(entry)
        history["last_validation"] = metrics
        model.step_schedulers()
        epoch, batch_in_epoch, sums = epoch + 1, 0, {}
        save(epoch, batch_in_epoch)
        finish_plots()
        if metrics:
            tqdm.write(f"epoch {entry['epoch']}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in metrics.items()))
    bar.close()
    if stopped or epoch >= total_epochs:
        if stopped:
            history["last_validation"] = validate(model, data, val_subset, config)
            history["last_validation"]["step"] = step
        save(epoch, batch_in_epoch)
        finish_plots()
    finished = epoch >= total_epochs
    weights_path: Path | None = None
    sha: str | None = None
    if config.export:
        weights_path = run_dir / "generator.pt"
        sha, _ = export_checkpoint(checkpoint_path, weights_path, name=config.name,
                                   version=config.version)
    last = {k: float(v) for k, v in history.get("last_validation", {}).items()}
    return TrainResult(run_dir=run_dir, step=step, epoch=epoch, finished=finished,
                       last_validation=last, weights=weights_path, sha256=sha)

