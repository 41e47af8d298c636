"""Similarity of two saliency maps: Spearman rank correlation and SSIM."""

from __future__ import annotations

import math

import numpy as np


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (flattened); NaN when either is constant."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps differ in size: {a.size} vs {b.size}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    ra, rb = rankdata(a), rankdata(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two maps, each min-max scaled to [0, 1] first (as Adebayo et al. compare
    normalised maps); 1.0 for two constant maps."""
    from skimage.metrics import structural_similarity

    def scale(m: np.ndarray) -> np.ndarray:
        m = np.asarray(m, np.float64)
        r = np.ptp(m)
        return (m - m.min()) / r if r > 0 else np.zeros_like(m)

    a, b = scale(a), scale(b)
    win = min(7, *a.shape) // 2 * 2 + 1 if min(a.shape) >= 3 else 3
    return float(structural_similarity(a, b, data_range=1.0, win_size=min(win, 7)))
