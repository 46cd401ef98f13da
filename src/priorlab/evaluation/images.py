"""Sample grids as PNG, and logging them to every logger that takes images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def grid_image(x: Tensor, rows: int) -> Image.Image:
    """Tile (N, C, H, W) samples in [-1, 1] into `rows` rows with a 1-pixel border."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    cols = -(-n // rows)
    canvas = torch.full((c, rows * (h + 1) + 1, cols * (w + 1) + 1), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = x[i]
    arr = canvas.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")


def scatter_image(x: Tensor, rows: int) -> Image.Image:
    """2-D samples as a scatter plot, coloured by class (samples are ordered class by class, `rows` classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = x.detach().float().cpu()
    labels = torch.arange(len(x)) // max(1, len(x) // rows)
    fig, ax = plt.subplots(figsize=(3.2, 3.2))
    ax.scatter(x[:, 0], x[:, 1], c=labels, cmap="tab10", s=6)
    ax.set_aspect("equal")
    ax.set_xlim(-3.5, 3.5)
    ax.set_ylim(-3.5, 3.5)
    fig.canvas.draw()
    img = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy())
    plt.close(fig)
    return img


def save_grid(x: Tensor, rows: int, path: str | Path) -> Path:
    """Write the grid (images) or scatter plot (2-D samples) atomically: temporary file, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    (grid_image(x, rows) if x.ndim == 4 else scatter_image(x, rows)).save(tmp)
    tmp.rename(path)
    return path


def log_image(loggers, key: str, path: Path, step: int) -> None:
    """Send an image to each logger that can take one (W&B's log_image, TensorBoard's add_image)."""
    for logger in loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[str(path)], step=step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):
            logger.experiment.add_image(key, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
