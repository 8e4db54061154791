"""Pictures a person would rather look at than read: curves, sample grids, reconstructions,
ROC curves. matplotlib with the Agg backend, so no screen is needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

from vae_core.files import replacing  # noqa: E402


def image_grid(images: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    """[N, 784] or [N, 28, 28] in [0, 1] -> one [H, W] array of tiles, white gutters."""
    imgs = np.asarray(images, dtype=np.float32).reshape(-1, 28, 28)
    rows = int(np.ceil(len(imgs) / cols))
    grid = np.ones((rows * (28 + pad) + pad, cols * (28 + pad) + pad), dtype=np.float32)
    for i, img in enumerate(imgs):
        r, c = divmod(i, cols)
        y, x = pad + r * (28 + pad), pad + c * (28 + pad)
        grid[y : y + 28, x : x + 28] = img
    return grid


def picture_formats() -> set[str]:
    """The file suffixes a picture may have (without the dot): what matplotlib writes."""
    return set(FigureCanvasBase.get_supported_filetypes())


def _save(fig: Any, path: Path, **kwargs: Any) -> None:
    """`fig` in the format its suffix names, written whole or not at all, as every output."""
    with replacing(path) as f:
        fig.savefig(f, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=100, **kwargs)


def save_grid(path: Path, images: np.ndarray, cols: int = 8, title: str | None = None) -> None:
    grid = image_grid(images, cols)
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 40, grid.shape[0] / 40 + (0.3 if title else 0)))
    ax.imshow(grid, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    _save(fig, path, bbox_inches="tight")
    plt.close(fig)


def save_recon(path: Path, inputs: np.ndarray, recons: np.ndarray, cols: int = 8) -> None:
    """Rows in pairs: inputs, then their reconstructions underneath."""
    inputs = inputs.reshape(-1, 784)
    recons = recons.reshape(-1, 784)
    rows = []
    for start in range(0, len(inputs), cols):
        rows += [inputs[start : start + cols], recons[start : start + cols]]
    save_grid(path, np.concatenate(rows), cols, title="inputs (odd rows) and reconstructions")


def save_curves(path: Path, history: list[dict[str, float]]) -> None:
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [-h["train_loss"] for h in history], label="train ELBO (nats)")
    ax.plot(epochs, [h["val_elbo"] for h in history], label="validation ELBO (nats)")
    best = max(history, key=lambda h: h["val_elbo"])
    ax.axvline(best["epoch"], color="gray", ls=":", label=f"best epoch {best['epoch']}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO per image (nats)")
    lo = min(min(-h["train_loss"], h["val_elbo"]) for h in history[len(history) // 10 :])
    hi = max(max(-h["train_loss"], h["val_elbo"]) for h in history)
    ax.set_ylim(lo - 0.05 * abs(hi - lo) - 1, hi + 0.05 * abs(hi - lo) + 1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def save_roc(path: Path, fpr: np.ndarray, tpr: np.ndarray, auroc: float, label: str) -> None:
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"{label} (AUROC {auroc:.4f})")
    ax.plot([0, 1], [0, 1], color="gray", ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
