"""Pictures: signed heatmaps (seismic, normalised by max |value|) and image grids saved as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def signed_heatmap(m: torch.Tensor | np.ndarray) -> np.ndarray:
    """(H, W) signed map → (H, W, 3) float RGB, seismic colours, normalised by max |m| (SRD convention)."""
    import matplotlib

    a = m.detach().cpu().double().numpy() if isinstance(m, torch.Tensor) else np.asarray(m, dtype=np.float64)
    scale = np.abs(a).max() or 1.0
    return matplotlib.colormaps["seismic"]((a / scale + 1) / 2)[..., :3]


def save_map_grid(path: str | Path, images: torch.Tensor, maps: Sequence[torch.Tensor], row_titles: Sequence[str],
                  col_titles: Sequence[str] | None = None) -> Path:
    """A grid: one column per image (first row the image), one row per map kind. ``images`` (N,3,H,W) in [0,1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, rows = images.shape[0], 1 + len(maps)
    fig, axes = plt.subplots(rows, n, figsize=(2.2 * n, 2.2 * rows), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(images[j].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
        if col_titles:
            axes[0, j].set_title(col_titles[j], fontsize=8)
        for i, m in enumerate(maps):
            axes[i + 1, j].imshow(signed_heatmap(m[j]))
    for i, title in enumerate(["image", *row_titles]):
        axes[i, 0].set_ylabel(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
