"""Similarity of two saliency maps: Spearman rank correlation and SSIM.

Both are NaN with an `UndefinedMetric` warning when either map is constant (no rank order, no structure:
SSIM's structure term divides by the maps' spread) or holds NaN/infinity. The similarity of maps of
unrelated images (`sanity.unrelated_baseline`) is the line to compare against.
"""

from __future__ import annotations

import numpy as np

from saliencylab.metrics._common import Undefined, nan_if_undefined, non_finite


def _pair(where: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size != b.size:
        raise ValueError(f"{where}: maps differ in size: {a.size} vs {b.size}")
    for name, m in (("first", a), ("second", b)):
        reason = non_finite(m)
        if reason:
            raise Undefined(f"{where}: the {name} map: {reason.removeprefix('the map ')}")
    const = [name for name, m in (("first", a), ("second", b)) if np.ptp(m) == 0]
    if const:
        which = "both maps are" if len(const) == 2 else f"the {const[0]} map is"
        raise Undefined(f"{where}: {which} constant")
    return a, b


@nan_if_undefined
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (flattened), in [-1, 1]; NaN when either is constant."""
    from scipy.stats import rankdata

    a, b = _pair("spearman", a, b)
    ra, rb = rankdata(a.ravel()), rankdata(b.ravel())
    return float(np.corrcoef(ra, rb)[0, 1])


@nan_if_undefined
def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two (H, W) maps, each min-max scaled to [0, 1] first (as Adebayo et al.
    compare normalised maps); in [-1, 1]. NaN when either map is constant (scaling is undefined and SSIM's
    structure term divides by zero spread: two constant maps are not 'identical structure')."""
    from skimage.metrics import structural_similarity

    a, b = _pair("ssim", a, b)
    if a.shape != b.shape:
        raise ValueError(f"ssim: maps differ in shape: {a.shape} vs {b.shape}")
    a, b = (a - a.min()) / np.ptp(a), (b - b.min()) / np.ptp(b)
    win = min(7, *a.shape) // 2 * 2 + 1 if min(a.shape) >= 3 else 3
    return float(structural_similarity(a, b, data_range=1.0, win_size=min(win, 7)))
