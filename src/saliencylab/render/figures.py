"""Figure grids in the article's style (its Figure 2): one row per image, one column per method."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from saliencylab.render.maps import DEFAULT_ALPHA, overlay, to_uint8


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


WRAP = 4
"""Most method columns per row of a figure grid; more methods wrap onto further rows of the same image."""


def _caption(text: str, width: int = 26) -> str:
    """Wrap each line of a caption so it stays inside its cell."""
    import textwrap

    return "\n".join(textwrap.fill(line, width) or line for line in text.split("\n"))


def grid_figure(rows: Sequence[GridRow], columns: Sequence[str], *, alpha: float = DEFAULT_ALPHA,
                cmap: str | None = None, cell_inches: float = 2.2, wrap: int = WRAP) -> Any:
    """The original plus one overlay per method for each image, methods wrapped at `wrap` per row, and a
    shared colour bar inside the figure (constrained layout keeps every label on the canvas) that shows each
    value as the overlays draw it over a neutral gray (`render.maps.overlay_colours`: the opacity ramp included).

    Args:
        rows: the images with their normalised maps, in column order.
        columns: the method names (the panel titles).
        alpha, cmap: see `render.overlay` (None: inferno, or bwr when any map is signed).
        wrap: most method panels per row; image i takes ceil(len(columns) / wrap) rows.

    Returns:
        a matplotlib Figure (dpi 100), not saved.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saliencylab.render.maps import DEFAULT_CMAP, SIGNED_CMAP, overlay_colours

    per_row = max(1, min(wrap, len(columns)))
    lines = max(1, -(-len(columns) // per_row))  # grid rows per image
    n_cols = per_row + 1
    aspect = float(np.mean([r.image.shape[0] / r.image.shape[1] for r in rows])) if rows else 1.0
    aspect = min(max(aspect, 0.25), 4.0)
    row_inches = cell_inches * aspect + 0.55  # room for a two-line title
    fig, axes = plt.subplots(max(1, len(rows)) * lines, n_cols, squeeze=False, dpi=100, layout="constrained",
                             figsize=(cell_inches * n_cols + 1.0, row_inches * max(1, len(rows)) * lines))
    signed = any(float(np.min(m)) < 0 for row in rows for m in row.maps)
    cmap = cmap or (SIGNED_CMAP if signed else DEFAULT_CMAP)
    used = np.zeros(axes.shape, bool)
    for r, row in enumerate(rows):
        ax = axes[r * lines, 0]
        used[r * lines, 0] = True
        ax.imshow(to_uint8(row.image))
        ax.set_title(_caption(row.title), fontsize=9)
        for c, m in enumerate(row.maps):
            ax = axes[r * lines + c // per_row, 1 + c % per_row]
            used[r * lines + c // per_row, 1 + c % per_row] = True
            ax.imshow(overlay(row.image, m, alpha=alpha, cmap=cmap))
            if r == 0 or lines > 1:  # wrapped rows need their own titles
                ax.set_title(_caption(columns[c], 22), fontsize=10, fontweight="bold")
    for ax, keep in zip(axes.ravel(), used.ravel(), strict=True):
        if keep:
            ax.set_axis_off()
        else:
            fig.delaxes(ax)  # empty cells of a wrapped row: fewer axes for the layout to place
    norm = matplotlib.colors.Normalize(-1 if signed else 0, 1)
    # the bar shows the overlays' colours over a neutral gray: low saliency fades out on the bar as on the image
    ramp = matplotlib.colors.ListedColormap(overlay_colours(np.linspace(norm.vmin, 1, 256), alpha=alpha,
                                                            cmap=cmap) / 255.0)
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=ramp), ax=axes[used].tolist(),
                       shrink=min(0.9, 4.5 / fig.get_figheight()), aspect=20, pad=0.02, anchor=(0.0, 1.0),
                       ticks=[-1, 0, 1] if signed else [0, 0.5, 1])
    bar.set_label("normalised saliency", fontsize=9)
    bar.ax.tick_params(labelsize=8)
    return fig


def saliency_grid(rows: Sequence[GridRow], columns: Sequence[str], path: str | os.PathLike, *,
                  alpha: float = DEFAULT_ALPHA, cmap: str | None = None, wrap: int = WRAP) -> None:
    """Draw `grid_figure` and save it as PNG (atomically).

    Args:
        rows: the images with their maps, in column order.
        columns: the method names (the panel titles).
        path: where the PNG goes.
    """
    save_figure(grid_figure(rows, columns, alpha=alpha, cmap=cmap, wrap=wrap), path, tight=False)


def phantoms_vs_real(path: str | os.PathLike, *, size: int = 256, colours: int | None = None) -> None:
    """Phantoms (with their lung and finding outlines) beside the real lung outlines and the real opacity-box
    density they are drawn from; needs the [anatomy] extra (`data.anatomy.available()`).

    Args:
        size: side of the phantoms drawn for the figure.
        colours: quantise the PNG to this many colours (smaller files), or None.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    from saliencylab.data import anatomy
    from saliencylab.data.phantoms import draw, image_seed

    real = anatomy.load()
    if real is None:
        from saliencylab.errors import UserError

        raise UserError("the phantoms-vs-real figure needs the real lung outlines: pip install -e '.[anatomy]'")
    fig, axes = plt.subplots(2, 4, figsize=(10, 5.3), dpi=80)
    for k, ax in enumerate(axes[:, :2].ravel()):
        covid = k % 2 == 0
        ph = draw(image_seed(7, "COVID" if covid else "Normal", k + 1), covid, size=size, anatomy="real",
                  marker=k == 1, text=k == 2, devices=k == 3, position="AP" if k == 2 else "PA", site=k % 2)
        ax.imshow(ph.image, cmap="gray", vmin=0, vmax=1)
        ax.contour(ph.lungs, levels=[0.5], colors="#4fc3f7", linewidths=0.6)
        if ph.lesions.any():
            ax.contour(ph.lesions, levels=[0.5], colors="#ff7043", linewidths=0.6)
        ax.set_title(("COVID-like" if covid else "Normal") + " phantom", fontsize=9)
    ax = axes[0, 2]
    rng = np.random.default_rng(0)
    for i in rng.choice(len(real.polygons), 60, replace=False):
        for poly in real.polygons[i]:
            ax.plot(poly[:, 0] * size, poly[:, 1] * size, color="#1565c0", lw=0.4, alpha=0.5)
    ax.set_title("60 real lung outlines", fontsize=9)
    ax = axes[1, 2]
    for _ in range(60):
        ph = draw(int(rng.integers(2**31)), False, size=size, anatomy="real")
        ax.contour(ph.lungs, levels=[0.5], colors="#2e7d32", linewidths=0.4, alpha=0.5)
    ax.set_title("60 phantom lung outlines", fontsize=9)
    grid = np.zeros((64, 64))
    for x0, y0, x1, y1 in real.boxes:
        grid[int(y0 * 64):max(int(y0 * 64) + 1, int(y1 * 64)), int(x0 * 64):max(int(x0 * 64) + 1, int(x1 * 64))] += 1
    ours = np.zeros((64, 64))
    for i in range(1, 301):
        ph = draw(image_seed(11, "COVID", i), True, size=64, anatomy="real")
        for x0, y0, x1, y1 in ph.lesion_boxes:
            ours[y0:y1, x0:x1] += 1
    cmap = LinearSegmentedColormap.from_list("d", ["#ffffff", "#b71c1c"])
    for ax, g, title in ((axes[0, 3], grid, f"real opacity boxes (n={len(real.boxes)})"),
                         (axes[1, 3], ours, "phantom lesion boxes (n=300 films)")):
        ax.imshow(g / g.max(), cmap=cmap, extent=(0, size, size, 0))
        ax.set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.set_xlim(0, size)
        ax.set_ylim(size, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.suptitle("Phantoms (outlines: lungs blue, findings orange) and the real data they are drawn from "
                 "(image right = patient's left)", fontsize=9)
    save_figure(fig, path)
    if colours:  # 128 colours keep a committed PNG small (about 110 kB instead of 310 kB)
        from PIL import Image

        from saliencylab.fsutil import atomic_path

        img = Image.open(path).convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG", optimize=True)
