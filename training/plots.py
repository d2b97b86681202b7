"""PNG plots for training and evaluation (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from numpy.typing import NDArray

from training.metrics import bland_altman, pearson


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves(history: dict[str, Any], out_dir: Path) -> list[Path]:
    """``losses.png`` (D, G GAN, G L1 and any extra G term against the step) and
    ``val_metrics.png`` (per epoch)."""
    written = []
    steps = history.get("steps", [])
    if steps:
        keys = ["loss_D", "loss_G_GAN", "loss_G_L1"]
        if any("loss_G_extra" in s for s in steps):
            keys.append("loss_G_extra")  # e.g. the weighted fusion L1 (--fusion-l1-weight)
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
        x = [s["step"] for s in steps]
        for ax, key in zip(axes, keys, strict=True):
            ax.plot(x, [s.get(key, np.nan) for s in steps], lw=1)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        written.append(_save(fig, out_dir / "losses.png"))
    epochs = history.get("epochs", [])
    if epochs:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        x = [e["epoch"] for e in epochs]
        for ax, key in zip(axes, ("val_l1", "val_psnr", "val_ssim"), strict=True):
            ax.plot(x, [e.get(key, np.nan) for e in epochs], marker="o", ms=3, color="C1")
            ax.set_title(key.replace("_", " "))
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        written.append(_save(fig, out_dir / "val_metrics.png"))
    return written


def tbr_scatter(real: dict[str, NDArray[Any]], synthetic: dict[str, NDArray[Any]],
                path: Path, title: str) -> Path:
    """Synthetic vs real TBRmax and TBRmean, identity line, Pearson r in the title."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, key in zip(axes, ("TBRmax", "TBRmean"), strict=True):
        x, y = np.asarray(real[key], float), np.asarray(synthetic[key], float)
        ax.scatter(x, y, s=14, alpha=0.7)
        finite = np.isfinite(x) & np.isfinite(y)
        if finite.any():
            lo = float(min(x[finite].min(), y[finite].min()))
            hi = float(max(x[finite].max(), y[finite].max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        corr = pearson(x, y)
        ax.set_title(f"{key}: r = {corr.r:.3f} (n={corr.n})")
        ax.set_xlabel(f"real {key}")
        ax.set_ylabel(f"synthetic {key}")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def tbr_bland_altman(real: dict[str, NDArray[Any]], synthetic: dict[str, NDArray[Any]],
                     path: Path, title: str) -> Path:
    """Bland-Altman: difference (synthetic - real) against the mean, bias and 95 % limits."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, key in zip(axes, ("TBRmax", "TBRmean"), strict=True):
        x, y = np.asarray(real[key], float), np.asarray(synthetic[key], float)
        ax.scatter((x + y) / 2, y - x, s=14, alpha=0.7)
        ba = bland_altman(x, y)
        if ba.n:
            ax.axhline(ba.bias, color="k", lw=1)
            if np.isfinite(ba.sd):
                for limit in ba.limits:
                    ax.axhline(limit, color="k", ls="--", lw=0.8)
        ax.set_title(f"{key}: bias {ba.bias:.3f}, SD {ba.sd:.3f}")
        ax.set_xlabel(f"mean of real and synthetic {key}")
        ax.set_ylabel("synthetic - real")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def example_grid(t1c: NDArray[Any], real: NDArray[Any], synthetic: NDArray[Any],
                 labels: Sequence[str], path: Path) -> Path:
    """Rows of T1C | real fusion | synthetic fusion | |difference| (RGB in [0, 1])."""
    rows = len(t1c)
    fig, axes = plt.subplots(rows, 4, figsize=(10, 2.6 * rows), squeeze=False)
    titles = ("T1C", "real fusion", "synthetic fusion", "|difference|")
    for i in range(rows):
        diff = np.abs(np.asarray(real[i], float) - np.asarray(synthetic[i], float)).mean(-1)
        panels = (t1c[i], real[i], synthetic[i], diff)
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            if j == 0:
                ax.imshow(panel, cmap="gray", vmin=0, vmax=1)
            elif j == 3:
                ax.imshow(panel, cmap="magma", vmin=0, vmax=0.5)
            else:
                ax.imshow(np.clip(panel, 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
        axes[i, 0].set_ylabel(labels[i], fontsize=7)
    return _save(fig, path)


def method_bars(summary: dict[str, dict[str, float]], keys: Sequence[str], path: Path) -> Path:
    """One bar group per metric, one bar per method."""
    methods = list(summary)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = [summary[m].get(key, np.nan) for m in methods]
        ax.bar(range(len(methods)), values, color=[f"C{i}" for i in range(len(methods))])
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=45, ha="right", fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
