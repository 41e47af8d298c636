"""Where does the saliency fall? Mass inside a region, pointing game, border share, Otsu IoU.

All functions take one map (H, W) and boolean masks of the same shape. By default the map's absolute
value is used (`sign='abs'`), so signed and unsigned methods are scored alike; 'positive' keeps only
positive evidence, as Arras et al. score relevance. Undefined cases give NaN with a reason, never a crash
or a silent zero (as Quantus does for an empty mask).
"""

from __future__ import annotations

import math
import warnings

import numpy as np


class UndefinedMetric(UserWarning):
    """A metric is NaN because its input makes it undefined (an empty mask, an all-zero map)."""


def _prep(m: np.ndarray, sign: str) -> np.ndarray:
    m = np.nan_to_num(np.asarray(m, dtype=np.float64))
    if sign == "abs":
        return np.abs(m)
    if sign == "positive":
        return np.clip(m, 0, None)
    raise ValueError(f"sign must be 'abs' or 'positive'; got {sign!r}")


def _nan(reason: str) -> float:
    warnings.warn(reason, UndefinedMetric, stacklevel=3)
    return math.nan


def _check(m: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != np.shape(m):
        raise ValueError(f"mask shape {mask.shape} differs from map shape {np.shape(m)}; resize the mask "
                         "(nearest neighbour) first")
    return mask


def mass_inside(m: np.ndarray, mask: np.ndarray, *, sign: str = "abs") -> float:
    """Share of the saliency mass that lies inside `mask`: relevance mass accuracy (Arras, Osman & Samek
    2022, https://doi.org/10.1016/j.inffus.2021.11.008). Compare with `mask.mean()`, its chance level."""
    mask = _check(m, mask)
    if not mask.any():
        return _nan("mass_inside: the mask is empty")
    a = _prep(m, sign)
    total = a.sum()
    if total <= 0:
        return _nan("mass_inside: the map is zero everywhere")
    return float(a[mask].sum() / total)


def pointing_game(m: np.ndarray, mask: np.ndarray, *, tolerance: int = 15, sign: str = "abs") -> float:
    """1.0 when the map's maximum lies within `tolerance` pixels of the mask, else 0.0 (Zhang et al. 2016,
    https://arxiv.org/abs/1608.00507, who use 15 pixels). Ties: any maximal pixel counts."""
    from scipy.ndimage import distance_transform_edt

    mask = _check(m, mask)
    if not mask.any():
        return _nan("pointing_game: the mask is empty")
    a = _prep(m, sign)
    if a.max() <= 0:
        return _nan("pointing_game: the map is zero everywhere")
    dist = distance_transform_edt(~mask)  # 0 inside the mask
    peaks = a == a.max()
    return float((dist[peaks] <= tolerance).any())


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


def otsu_iou(m: np.ndarray, mask: np.ndarray, *, sign: str = "abs") -> float:
    """IoU of the Otsu-thresholded map with the mask, as CheXlocalize scores saliency segmentation
    (Saporta et al. 2022, https://doi.org/10.1038/s42256-022-00536-x)."""
    from skimage.filters import threshold_otsu

    mask = _check(m, mask)
    if not mask.any():
        return _nan("otsu_iou: the mask is empty")
    a = _prep(m, sign)
    if a.max() <= a.min():
        return _nan("otsu_iou: the map is constant")
    seg = a > threshold_otsu(a)
    return float((seg & mask).sum() / (seg | mask).sum())


def box_mask(shape: tuple[int, int], box: tuple[int, int, int, int], *, pad: int = 0) -> np.ndarray:
    """A boolean mask of the box (x0, y0, x1, y1), grown by `pad` pixels on every side."""
    x0, y0, x1, y1 = box
    out = np.zeros(shape, bool)
    out[max(0, y0 - pad):y1 + pad, max(0, x0 - pad):x1 + pad] = True
    return out
