"""PNG plots (matplotlib, Agg backend: no display needed): per-layer curves, cls attention grids, PCA images,
reconstructions, probe/kNN bars. Every function writes one PNG and returns its path."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

TITLES = {"probe": "linear probe top-1 (%)", "knn": "kNN top-1 (%)",
          "coding_rate_subspace": "compression term $R^c(Z^\\ell; U^\\ell)$",
          "coding_rate": "coding rate $R(Z^\\ell)$", "zero_fraction": "ISTA output: fraction of zeros",
          "l0": "ISTA output: nonzeros per token", "l1": "ISTA output: $\\ell_1$ per token",
          "l0_over_l1": "ISTA output: $\\ell_0/\\ell_1$ per token"}


def _save(fig, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _full_axis(ax, name: str) -> None:
    """Whole axes: percentages from 0 to 100, fractions from 0 to 1, other non-negative quantities from 0, so a
    small change is not drawn as a large one; an axis that cannot start at 0 (negative values) says so."""
    low, high = ax.get_ylim()
    if name in ("probe", "knn"):
        ax.set_ylim(0, 100)
    elif name == "zero_fraction":
        ax.set_ylim(0, 1)
    elif low >= 0 or ax.dataLim.y0 >= 0:
        ax.set_ylim(0, high)
    else:
        ax.set_ylabel("axis not from 0", fontsize=7, color="C3")


def _titled(fig, title: str) -> None:
    if title:
        fig.suptitle(title, fontsize=9)


def plot_layer_curves(curves: Mapping[str, Sequence[float]], path: Path | str,
                      stds: Mapping[str, Sequence[float]] | None = None, title: str = "") -> Path:
    """One panel per metric, x = encoder layer (1-based), error bars = std over images."""
    return plot_layer_comparison({"": curves}, path, stds={"": stds or {}}, title=title)


def plot_layer_comparison(runs: Mapping[str, Mapping[str, Sequence[float]]], path: Path | str, *,
                          stds: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                          refs: Mapping[str, Mapping[str, float]] | None = None, title: str = "") -> Path:
    """One panel per metric (the union over runs, first run's order), one line per run (e.g. pretrained and
    init on the same axes), x = encoder layer (1-based); `refs` = {metric: {label: y}} draws dashed
    horizontal lines (e.g. the raw-pixel probe)."""
    names = list(dict.fromkeys(n for curves in runs.values() for n in curves))
    if not names:
        raise ValueError("plot_layer_curves: no curves given")
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for i, (label, curves) in enumerate(runs.items()):
            if name not in curves:
                continue
            y = np.asarray(curves[name], dtype=float)
            x = np.arange(1, len(y) + 1)
            err = (stds or {}).get(label, {}).get(name)
            ax.errorbar(x, y, yerr=None if err is None else np.asarray(err, float), marker="o", capsize=3,
                        color=f"C{i}", label=label or None)
            ax.set_xticks(x)
        for j, (label, y) in enumerate((refs or {}).get(name, {}).items()):
            ax.axhline(y, color=f"C{len(runs) + j}", linestyle="--", label=label)
        ax.set_title(TITLES.get(name, name), fontsize=9)
        ax.set_xlabel("layer")
        _full_axis(ax, name)
        ax.grid(alpha=0.3)
        if any(runs) or (refs or {}).get(name):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    _titled(fig, title)
    fig.tight_layout()
    return _save(fig, path)


def plot_attention_grid(images: np.ndarray, maps: np.ndarray, path: Path | str, title: str = "") -> Path:
    """Rows = images; columns = the image, then the cls attention of every head (last layer), one colour scale
    for the whole grid (a colour means the same weight everywhere) with its bar."""
    b, heads = maps.shape[:2]
    fig, axes = plt.subplots(b, heads + 1, figsize=(1.6 * (heads + 1) + 0.8, 1.6 * b + 0.5), squeeze=False)
    low, high = float(np.min(maps)), float(np.max(maps))
    shown = None
    for i in range(b):
        axes[i, 0].imshow(images[i])
        for h in range(heads):
            shown = axes[i, h + 1].imshow(maps[i, h], cmap="inferno", vmin=low, vmax=high)
            if i == 0:
                axes[i, h + 1].set_title(f"head {h}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if shown is not None:
        fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight of the cls query")
    _titled(fig, title)
    return _save(fig, path)


def plot_pca(images: np.ndarray, rgb: np.ndarray, path: Path | str, title: str = "") -> Path:
    """Pairs of (image, top-3 PCA components of its patch features as RGB)."""
    b = len(images)
    fig, axes = plt.subplots(2, b, figsize=(1.8 * b, 3.9), squeeze=False)
    for i in range(b):
        axes[0, i].imshow(images[i])
        axes[1, i].imshow(rgb[i], interpolation="nearest")
    for ax in axes.flat:
        ax.axis("off")
    _titled(fig, title or "Patch features: top 3 principal components as RGB")
    return _save(fig, path)


def plot_reconstructions(model, images, path: Path | str, *, seed: int = 0) -> Path:
    """Run the masked autoencoder on `images` (normalized (B, 3, H, W)) with masks drawn from `seed` and plot
    original | masked | output."""
    from cratescale.evaluation.diagnostics import reconstructions

    r = reconstructions(model, images, seed=seed)
    return plot_reconstruction_grid(r["original"], r["masked"], r["reconstruction"], path)


def plot_reconstruction_grid(original: np.ndarray, masked: np.ndarray, recon: np.ndarray,
                             path: Path | str, title: str = "Reconstructions") -> Path:
    """Rows = images; columns = original | masked | reconstruction ((B, H, W, 3) arrays in [0, 1])."""
    b = len(original)
    fig, axes = plt.subplots(b, 3, figsize=(5.4, 1.8 * b), squeeze=False)
    for i in range(b):
        for j, (img, name) in enumerate(((original, "original"), (masked, "masked"), (recon, "output"))):
            axes[i, j].imshow(img[i])
            if i == 0:
                axes[i, j].set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    _titled(fig, title)
    return _save(fig, path)


def plot_comparison(table: Mapping[str, Mapping[str, float | None]], path: Path | str,
                    models: Sequence[str] = ("pretrained", "init", "pixels"),
                    cis: Mapping[str, Mapping[str, Sequence[float] | None]] | None = None, title: str = "") -> Path:
    """Grouped bars: top-1 (%) of each model per evaluation (rows of `protocol.compare`), with the 95% interval
    of each as an error bar where `cis` ({model: {row: [low, high] fractions}}) has it."""
    names = list(table)
    if not names:
        raise ValueError("plot_comparison: no results given")
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(4.0, 2.0 * len(names)), 3.6))
    for j, model in enumerate(models):
        label = model  # once per model, on its first bar
        for i, name in enumerate(names):
            v = table[name].get(model)
            if v is None:
                continue
            x = i + (j - (len(models) - 1) / 2) * width
            ci = (cis or {}).get(model, {}).get(name)
            err = None if not ci else [[v - 100 * ci[0]], [100 * ci[1] - v]]
            ax.bar(x, v, width, color=f"C{j}", label=label, yerr=err, capsize=3)
            ax.text(x, (100 * ci[1] if ci else v) + 1, f"{v:.1f}", ha="center", fontsize=7)
            label = None
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("top-1 (%), bars: 95% interval")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(f"Linear probe and kNN top-1\n{title}" if title else "Linear probe and kNN top-1", fontsize=9)
    return _save(fig, path)


def plot_finetune_curves(curves: Mapping[str, Sequence[Mapping]], path: Path | str, title: str = "") -> Path:
    """Held-out top-1 (%) vs fine-tune step, one line per arm (pretrained, scratch), y from 0 to 100."""
    if not curves:
        raise ValueError("plot_finetune_curves: no curves given")
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for j, (arm, rows) in enumerate(curves.items()):
        ax.plot([r["step"] for r in rows], [100 * r["top1"] for r in rows], marker="o", ms=3, color=f"C{j}",
                label=arm)
    ax.set_xlabel("fine-tune step")
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(f"Fine-tuning, pretrained vs scratch\n{title}" if title else "Fine-tuning, pretrained vs scratch",
                 fontsize=9)
    return _save(fig, path)


def plot_heldout_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: Path | str) -> Path:
    """The held-out reconstruction loss vs pretraining step, one line per run, y from 0."""
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for j, (label, points) in enumerate(curves.items()):
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", ms=3, color=f"C{j}", label=label)
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("held-out reconstruction loss")
    ax.set_ylim(0, None)
    ax.legend(fontsize=8)
    ax.set_title("Held-out reconstruction loss (the same images and masks)", fontsize=9)
    return _save(fig, path)
