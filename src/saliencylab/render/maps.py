"""Turn a raw map into something to look at. Functions take and return NumPy arrays."""

from __future__ import annotations

from typing import Literal

import numpy as np

from saliencylab.display import DEFAULT_ALPHA, DEFAULT_SMOOTH  # noqa: F401  (re-exported)

Mode = Literal["absmax", "minmax", "percentile"]
NORMALISE_MODES: tuple[str, ...] = ("absmax", "minmax", "percentile")
DEFAULT_CMAP = "inferno"
"""Perceptually uniform (matplotlib's viridis family), so equal steps of saliency look like equal steps."""
SIGNED_CMAP = "bwr"
"""Diverging, white at 0, for maps that keep their sign."""
OPACITY_FLOOR = 0.1
"""Below this |normalised saliency| an overlay is fully transparent: near-zero shows the image as it is."""
BAR_BACKGROUND = 0.5
"""The neutral gray that a figure's colour bar fades to, as an overlay fades to its image (see `overlay_colours`)."""


def normalise(m: np.ndarray, mode: Mode = "absmax", *, percentile: float = 99.0) -> np.ndarray:
    """Scale a raw map for display; never NaN, also on a constant or all-zero map.

    Modes:
        absmax: m / max|m|, into [-1, 1] (sign kept; [0, 1] for a non-negative map).
        minmax: (m - min) / (max - min), into [0, 1].
        percentile: m / (the `percentile`-th percentile of |m|), clipped to [-1, 1]; robust to a few
            extreme pixels, as PAIR's saliency library visualises.

    Returns:
        float32 array shaped like m. A constant map gives zeros.
    """
    m = np.nan_to_num(np.asarray(m, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if mode == "absmax":
        top = np.abs(m).max(initial=0.0)
        out = m / top if top > 0 else np.zeros_like(m)
    elif mode == "minmax":
        lo, hi = (m.min(), m.max()) if m.size else (0.0, 0.0)
        out = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    elif mode == "percentile":
        top = np.percentile(np.abs(m), percentile) if m.size else 0.0
        if top <= 0:
            top = np.abs(m).max(initial=0.0)
        out = np.clip(m / top, -1.0, 1.0) if top > 0 else np.zeros_like(m)
    else:
        raise ValueError(f"unknown normalisation {mode!r}; use one of {', '.join(NORMALISE_MODES)}")
    return out.astype(np.float32)


def smooth(m: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing with `sigma` in pixels (0: unchanged), reflect-padded, any number of axes."""
    if sigma <= 0:
        return np.asarray(m, dtype=np.float32)
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.asarray(m, dtype=np.float32), sigma=sigma, mode="reflect")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] (H, W) or (H, W, 3), or uint8, -> uint8 RGB (H, W, 3)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an image (H, W) or (H, W, 3); got shape {image.shape}")
    return image


def colorize(m: np.ndarray, cmap: str | None = None) -> np.ndarray:
    """A normalised map -> uint8 RGB. Signed maps ([-1, 1]) use a diverging colormap centred on 0.

    Args:
        m: (H, W), in [0, 1] or [-1, 1] (see `normalise`).
        cmap: a matplotlib colormap name (default: inferno for [0, 1], bwr for signed maps).
    """
    import matplotlib

    m = np.asarray(m, dtype=np.float32)
    signed = bool((m < 0).any())
    cmap = cmap or (SIGNED_CMAP if signed else DEFAULT_CMAP)
    values = (m + 1.0) / 2.0 if signed else m
    rgba = matplotlib.colormaps[cmap](np.clip(values, 0.0, 1.0))
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def opacity(m: np.ndarray, alpha: float = 1.0, *, floor: float = OPACITY_FLOOR) -> np.ndarray:
    """Per-pixel overlay opacity that follows the saliency: 0 up to |m| = floor, then a linear ramp to alpha at 1.

    Args:
        m: normalised map in [0, 1] or [-1, 1] (any shape).
        alpha: the opacity of the largest value (|m| = 1).

    Returns:
        float32 array shaped like m, in [0, alpha].
    """
    a = np.clip(np.abs(np.asarray(m, dtype=np.float32)), 0.0, 1.0)
    return (alpha * np.clip((a - floor) / (1.0 - floor), 0.0, 1.0)).astype(np.float32)


def overlay(image: np.ndarray, m: np.ndarray, *, alpha: float = DEFAULT_ALPHA,
            cmap: str | None = None) -> np.ndarray:
    """Blend a normalised map over an image, with an opacity that follows the saliency (see `opacity`).

    Args:
        image: (H, W) grayscale or (H, W, 3) RGB, float in [0, 1] or uint8.
        m: (H, W) normalised map (see `normalise`), same H and W as the image.
        alpha: opacity at the map's largest value (|m| = 1); pixels with |m| below `OPACITY_FLOOR` (0.1)
            show the image unchanged, and opacity grows linearly in between.
        cmap: see `colorize` (default inferno; bwr for a signed map).

    Returns:
        uint8 RGB (H, W, 3).
    """
    base = to_uint8(image).astype(np.float32)
    m = np.asarray(m, dtype=np.float32)
    if m.shape != base.shape[:2]:
        raise ValueError(f"map shape {m.shape} does not match image shape {base.shape[:2]}; resize the map first")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    heat = colorize(m, cmap).astype(np.float32)
    weight = opacity(m, alpha)[..., None]
    return (base * (1.0 - weight) + heat * weight + 0.5).astype(np.uint8)


def overlay_colours(values: np.ndarray, *, alpha: float = DEFAULT_ALPHA, cmap: str | None = None,
                    background: float = BAR_BACKGROUND) -> np.ndarray:
    """The colours `overlay` draws for normalised values over a uniform gray image: a colour bar's colours.

    Low values fade to the background exactly as they fade to the image in an overlay (opacity ramp and all),
    so the bar never shows low saliency stronger than the overlays do.

    Args:
        values: (N,) normalised values, in [0, 1] or [-1, 1] (any negative value: a signed scale, as `colorize`).
        alpha, cmap: as for `overlay`.
        background: the gray level in [0, 1] under the colours.

    Returns:
        uint8 RGB (N, 3).
    """
    v = np.asarray(values, dtype=np.float32).reshape(1, -1)  # (1, N): one row of pixels
    return overlay(np.full(v.shape, background, np.float32), v, alpha=alpha, cmap=cmap)[0]
