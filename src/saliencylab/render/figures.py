"""Figure grids in the article's style (its Figure 2): one row per image, one column per method."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from saliencylab.render.maps import overlay, to_uint8


@dataclass
class GridRow:
    """One row: the image, its caption, and one normalised map per column (same H, W as the image)."""

    image: np.ndarray
    title: str
    maps: Sequence[np.ndarray]


def save_figure(fig: Any, path: str | os.PathLike, *, tight: bool = True) -> None:
    """Save a matplotlib figure as PNG atomically (temp file, then rename) and close it."""
    import matplotlib.pyplot as plt

    from saliencylab.fsutil import atomic_path

    if tight:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def saliency_grid(rows: Sequence[GridRow], columns: Sequence[str], path: str | os.PathLike, *,
                  alpha: float = 0.5, cmap: str | None = None, cell_inches: float = 2.4) -> None:
    """Draw the original plus one overlay per method for each row, with a shared colour bar; save as PNG.

    Args:
        rows: the images with their maps, in column order.
        columns: the method names (the column titles).
        path: where the PNG goes (written atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), len(columns) + 1
    aspect = float(np.mean([r.image.shape[0] / r.image.shape[1] for r in rows])) if rows else 1.0
    row_inches = cell_inches * aspect + 0.45  # room for the titles
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell_inches * n_cols + 0.8, row_inches * n_rows + 0.2),
                             squeeze=False)
    signed = any(float(np.min(m)) < 0 for row in rows for m in row.maps)
    cmap = cmap or ("bwr" if signed else "jet")
    for r, row in enumerate(rows):
        axes[r, 0].imshow(to_uint8(row.image))
        axes[r, 0].set_title(row.title, fontsize=9)
        for c, m in enumerate(row.maps, start=1):
            axes[r, c].imshow(overlay(row.image, m, alpha=alpha, cmap=cmap))
            if r == 0:
                axes[r, c].set_title(columns[c - 1], fontsize=10, fontweight="bold")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout(rect=(0, 0, 0.94, 1))
    cax = fig.add_axes((0.95, 0.15, 0.012, 0.7))
    norm = matplotlib.colors.Normalize(-1 if signed else 0, 1)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, label="normalised saliency")
    save_figure(fig, path, tight=False)
