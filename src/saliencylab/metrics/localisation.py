"""Where does the saliency fall? Mass inside a region, pointing game, rank accuracy, AUROC, border share, Otsu IoU.

All functions take one map (H, W) and boolean masks of the same shape. `sign` says which part of a signed
map counts: 'abs' (the magnitude, so signed and unsigned methods are scored alike), 'positive' (positive
evidence only, as Arras et al. score relevance) or, for the rank-based scores, 'signed' (the raw values).
Every score has a chance level: the value a map with no information gets on average (the mask's share of
the image for mass and rank accuracy, the share within the tolerance for the pointing game, 0.5 for the
AUROC). Undefined cases (an empty mask, an all-zero, constant or non-finite map) give NaN with an
`UndefinedMetric` warning that says why, never a crash or a silent zero (as Quantus does for an empty mask).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from saliencylab.metrics._common import (
    Undefined,
    UndefinedMetric,
    at_least,
    choice,
    nan_if_undefined,
    non_finite,
)

__all__ = ["UndefinedMetric", "mass_inside", "relevance_mass_positive", "absolute_mass", "mass_scores",
           "default_tolerance", "pointing_game", "pointing_chance", "pointing_scores", "relevance_rank_accuracy",
           "mask_auroc", "otsu_iou", "border_mask", "corner_mask", "box_mask"]

Sign = Literal["abs", "positive"]
RankSign = Literal["abs", "positive", "signed"]
SIGNS: tuple[str, ...] = ("abs", "positive")
RANK_SIGNS: tuple[str, ...] = ("abs", "positive", "signed")
ZHANG_TOLERANCE = 15.0  # pixels at 224 px (Zhang et al. 2016)


def _inputs(where: str, m: np.ndarray, mask: np.ndarray, sign: str,
            allowed: tuple[str, ...] = SIGNS) -> tuple[np.ndarray, np.ndarray]:
    """Check the option, the shapes and the undefined cases; return (the map's counted part, the mask)."""
    choice(where, "sign", sign, allowed)
    m = np.asarray(m, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != m.shape:
        raise ValueError(f"{where}: mask shape {mask.shape} differs from map shape {m.shape}; resize the mask "
                         "(nearest neighbour) first")
    reason = non_finite(m)
    if reason:
        raise Undefined(f"{where}: {reason}")
    if not mask.any():
        raise Undefined(f"{where}: the mask is empty")
    if sign == "abs":
        return np.abs(m), mask
    if sign == "positive":
        return np.clip(m, 0, None), mask
    return m, mask


def _zero_reason(where: str, m: np.ndarray, sign: str) -> str:
    if sign == "positive" and np.any(np.asarray(m) != 0):
        return f"{where}: the map has no positive relevance"
    return f"{where}: the map is zero everywhere"


@nan_if_undefined
def mass_inside(m: np.ndarray, mask: np.ndarray, *, sign: Sign = "abs") -> float:
    """Share of the saliency mass that lies inside `mask`, in [0, 1]; chance level `mask.mean()`.

    With sign='positive' this is the relevance mass accuracy of Arras, Osman & Samek 2022
    (https://doi.org/10.1016/j.inffus.2021.11.008): positive relevance inside / positive relevance in total.
    With sign='abs' (the default, kept for unsigned methods) it is the absolute mass, not Arras et al.'s
    score for a signed map. `relevance_mass_positive`, `absolute_mass` and `mass_scores` name each.
    NaN when the mask is empty or the (signed part of the) map is zero everywhere.
    """
    a, mask = _inputs("mass_inside", m, mask, sign)
    total = a.sum()
    if total <= 0:
        raise Undefined(_zero_reason("mass_inside", m, sign))
    return float(a[mask].sum() / total)


def relevance_mass_positive(m: np.ndarray, mask: np.ndarray) -> float:
    """Relevance mass accuracy as Arras et al. 2022 define it: positive relevance inside the mask over all
    positive relevance, in [0, 1]; chance `mask.mean()`. NaN when the map has no positive value."""
    return mass_inside(m, mask, sign="positive")


def absolute_mass(m: np.ndarray, mask: np.ndarray) -> float:
    """Share of the absolute map |m| inside the mask, in [0, 1]; chance `mask.mean()`. Equals
    `relevance_mass_positive` for unsigned maps (>= 0); for signed maps it also counts negative evidence."""
    return mass_inside(m, mask, sign="abs")


def mass_scores(m: np.ndarray, mask: np.ndarray) -> dict[str, float | bool]:
    """Both masses and their chance level, to report side by side for signed methods.

    Returns:
        {'positive': relevance_mass_positive, 'absolute': absolute_mass, 'chance': the mask's share of the
        image, 'signed': whether the map has negative values (when False, positive == absolute)}.
    """
    mask_arr = np.asarray(mask, dtype=bool)
    return {"positive": relevance_mass_positive(m, mask), "absolute": absolute_mass(m, mask),
            "chance": float(mask_arr.mean()) if mask_arr.size else math.nan,
            "signed": bool(np.nanmin(np.asarray(m, dtype=np.float64), initial=0.0) < 0)}


def default_tolerance(shape: tuple[int, ...]) -> float:
    """Zhang et al.'s 15 pixels at 224 px, scaled with the image size (the geometric mean of the sides)."""
    side = float(np.prod(shape)) ** (1.0 / len(shape))
    return ZHANG_TOLERANCE * side / 224.0


def _within(mask: np.ndarray, tolerance: float | None) -> tuple[np.ndarray, float]:
    from scipy.ndimage import distance_transform_edt

    tol = default_tolerance(mask.shape) if tolerance is None else float(tolerance)
    at_least("pointing_game", "tolerance", tol, 0.0)
    return distance_transform_edt(~mask) <= tol, tol  # distance 0 inside the mask


@nan_if_undefined
def pointing_game(m: np.ndarray, mask: np.ndarray, *, tolerance: float | None = None, sign: Sign = "abs") -> float:
    """Hit (1.0) when the map's maximum lies within `tolerance` pixels of the mask, else 0.0 (Zhang et al.
    2016, https://arxiv.org/abs/1608.00507). Report it beside `pointing_chance`: a peak drawn uniformly at
    random hits with that probability.

    Args:
        m: (H, W) map; mask: (H, W) bool.
        tolerance: pixels; None scales the paper's 15 px at 224 px to this image (`default_tolerance`).

    Returns:
        In [0, 1]: with several maximal pixels, the share of them that hit (the expected hit when the tie is
        broken at random). NaN when the mask is empty or the map is zero everywhere or constant (no peak).
    """
    a, mask = _inputs("pointing_game", m, mask, sign)
    if a.max() <= 0:
        raise Undefined(_zero_reason("pointing_game", m, sign))
    if a.min() == a.max():
        raise Undefined("pointing_game: the map is constant: it has no peak")
    near, _ = _within(mask, tolerance)
    peaks = a == a.max()
    return float(near[peaks].mean())


@nan_if_undefined
def pointing_chance(mask: np.ndarray, *, tolerance: float | None = None) -> float:
    """Chance level of the pointing game: the share of pixels within `tolerance` of the mask, i.e. the hit
    rate of a uniformly random peak. NaN when the mask is empty."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise Undefined("pointing_chance: the mask is empty")
    near, _ = _within(mask, tolerance)
    return float(near.mean())


def pointing_scores(m: np.ndarray, mask: np.ndarray, *, tolerance: float | None = None,
                    sign: Sign = "abs") -> dict[str, float]:
    """{'hit': pointing_game, 'chance': pointing_chance, 'tolerance': the pixels used} for one map."""
    tol = default_tolerance(np.shape(mask)) if tolerance is None else float(tolerance)
    return {"hit": pointing_game(m, mask, tolerance=tol, sign=sign),
            "chance": pointing_chance(mask, tolerance=tol), "tolerance": tol}


@nan_if_undefined
def relevance_rank_accuracy(m: np.ndarray, mask: np.ndarray, *, sign: RankSign = "abs") -> float:
    """Relevance rank accuracy (Arras, Osman & Samek 2022, https://doi.org/10.1016/j.inffus.2021.11.008):
    with K the mask's pixel count, the share of the map's K highest pixels that lie inside the mask.

    Threshold-free localisation in [0, 1]; chance level K / (H W), the mask's share (a map equal to the mask
    scores 1). Ties at the K-th value count fractionally (the expected score under random tie-breaking).
    NaN when the mask is empty or the map is constant (it ranks no pixel above another) or non-finite.
    """
    a, mask = _inputs("relevance_rank_accuracy", m, mask, sign, RANK_SIGNS)
    a = a.ravel()
    if a.min() == a.max():
        raise Undefined("relevance_rank_accuracy: the map is constant: it ranks no pixel above another")
    inside = mask.ravel()
    k = int(inside.sum())
    kth = np.partition(a, a.size - k)[a.size - k]  # the K-th largest value
    above, tied = a > kth, a == kth
    from_ties = (k - above.sum()) * (tied & inside).sum() / tied.sum()
    return float(((above & inside).sum() + from_ties) / k)


@nan_if_undefined
def mask_auroc(m: np.ndarray, mask: np.ndarray, *, sign: RankSign = "abs") -> float:
    """Area under the ROC curve of the map's values as a pixel classifier of the mask (threshold-free
    localisation, as Quantus's AUC metric and Arras et al.'s rank view): the probability that a random pixel
    inside the mask outranks a random pixel outside it (ties count half).

    Returns:
        In [0, 1]; chance 0.5, a map equal to the mask scores 1. NaN when the mask is empty or covers the
        whole image (no pixel outside), or the map is constant or non-finite.
    """
    from scipy.stats import rankdata

    a, mask = _inputs("mask_auroc", m, mask, sign, RANK_SIGNS)
    if mask.all():
        raise Undefined("mask_auroc: the mask covers the whole image: no pixel outside to rank against")
    a = a.ravel()
    if a.min() == a.max():
        raise Undefined("mask_auroc: the map is constant: it ranks no pixel above another")
    inside = mask.ravel()
    pos, neg = int(inside.sum()), int((~inside).sum())
    ranks = rankdata(a)  # average ranks for ties (Mann-Whitney U)
    return float((ranks[inside].sum() - pos * (pos + 1) / 2) / (pos * neg))


def border_mask(shape: tuple[int, int], fraction: float = 0.1) -> np.ndarray:
    """True within `fraction` of the side from any edge: where markers, rulers and text sit."""
    h, w = shape
    bh, bw = max(1, round(h * fraction)), max(1, round(w * fraction))
    out = np.zeros(shape, bool)
    out[:bh], out[-bh:], out[:, :bw], out[:, -bw:] = True, True, True, True
    return out


def corner_mask(shape: tuple[int, int], fraction: float = 0.2) -> np.ndarray:
    """True within the four corner squares of `fraction` of the side."""
    h, w = shape
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    out = np.zeros(shape, bool)
    out[:ch, :cw], out[:ch, -cw:], out[-ch:, :cw], out[-ch:, -cw:] = True, True, True, True
    return out


@nan_if_undefined
def otsu_iou(m: np.ndarray, mask: np.ndarray, *, sign: Sign = "abs") -> float:
    """IoU of the Otsu-thresholded map with the mask, as CheXlocalize scores saliency segmentation
    (Saporta et al. 2022, https://doi.org/10.1038/s42256-022-00536-x). In [0, 1]; NaN when the mask is
    empty or the map is constant or non-finite."""
    from skimage.filters import threshold_otsu

    a, mask = _inputs("otsu_iou", m, mask, sign)
    if a.max() <= a.min():
        raise Undefined("otsu_iou: the map is constant")
    seg = a > threshold_otsu(a)
    return float((seg & mask).sum() / (seg | mask).sum())


def box_mask(shape: tuple[int, int], box: tuple[int, int, int, int], *, pad: int = 0) -> np.ndarray:
    """A boolean mask of the box (x0, y0, x1, y1), grown by `pad` pixels on every side."""
    x0, y0, x1, y1 = box
    out = np.zeros(shape, bool)
    out[max(0, y0 - pad):y1 + pad, max(0, x0 - pad):x1 + pad] = True
    return out
