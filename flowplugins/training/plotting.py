"""Pictures: image grids (PNG, via PIL) and the bits/dim curve (matplotlib, Agg backend)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["save_grid", "save_rows", "plot_bpd_curve"]


def _to_uint8_tiles(images: Tensor) -> np.ndarray:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"save_grid: images must be (N, 1 or 3, H, W); got {tuple(images.shape)}"
        )
    arr = images.detach().float().clamp(0, 1).cpu().numpy()
    return np.round(arr * 255).astype(np.uint8)


def save_grid(images: Tensor, path: str | os.PathLike, nrow: Optional[int] = None,
              scale: Optional[int] = None, padding: int = 1) -> Path:
    """Write images ``(N, C, H, W)`` with values in ``[0, 1]`` as one PNG grid.

    Small images are magnified by nearest-neighbour ``scale`` (default: up to ~32 px per tile)
    so that 8x8 digits are visible.
    """
    from PIL import Image

    tiles = _to_uint8_tiles(images)
    n, c, h, w = tiles.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol_rows = int(math.ceil(n / nrow))
    scale = scale or max(1, 32 // max(h, w))
    canvas = np.full((ncol_rows * (h + padding) + padding, nrow * (w + padding) + padding, c),
                     128, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        canvas[y:y + h, x:x + w] = tiles[i].transpose(1, 2, 0)
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode="L" if c == 1 else "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_rows(rows: Sequence[Tensor], path: str | os.PathLike, scale: Optional[int] = None) -> Path:
    """Write a grid whose rows are the given equally long image sequences ``(K, C, H, W)``."""
    k = rows[0].shape[0]
    if any(r.shape != rows[0].shape for r in rows):
        raise ValueError("save_rows: every row must have the same shape")
    return save_grid(torch.cat(list(rows)), path, nrow=k, scale=scale)


def plot_bpd_curve(history: Sequence[Mapping[str, float]], path: str | os.PathLike,
                   best_epoch: Optional[int] = None, test_bpd: Optional[float] = None,
                   uniform_bpd: Optional[float] = None, title: str = "") -> Path:
    """Training and validation bits/dim per epoch, with the selected epoch marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(epochs, [h["train_bpd"] for h in history], label="train (running mean)")
    ax.plot(epochs, [h["val_bpd"] for h in history], label="validation")
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"selected (epoch {best_epoch})")
    if test_bpd is not None:
        ax.axhline(test_bpd, color="black", linestyle="--", linewidth=0.8,
                   label=f"test of selected: {test_bpd:.3f}")
    values = [h["val_bpd"] for h in history] + [h["train_bpd"] for h in history]
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        lo = min(finite)
        hi = min(max(finite), (uniform_bpd or max(finite)) + 0.1)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    ax.set_xlabel("epoch")
    ax.set_ylabel("bits / dim")
    ax.set_title(title or "bits per dimension")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
