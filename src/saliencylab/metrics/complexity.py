"""How concentrated is a map? Sparseness (Gini index) and complexity (entropy), per map.

A map that points at a few pixels is easier to read than one spread thinly over the image; these scores
say how much, without a mask. They are also the measure behind eMPRT (`sanity.efficient_mprt`): a map that
explains the model should grow more complex when the model's weights are destroyed.
"""

from __future__ import annotations

import math

import numpy as np

from saliencylab.metrics._common import Undefined, at_least, nan_if_undefined, non_finite


def _magnitude(where: str, m: np.ndarray) -> np.ndarray:
    a = np.asarray(m, dtype=np.float64).ravel()
    reason = non_finite(a)
    if reason:
        raise Undefined(f"{where}: {reason}")
    a = np.abs(a)
    if a.sum() <= 0:
        raise Undefined(f"{where}: the map is zero everywhere")
    return a


@nan_if_undefined
def sparseness(m: np.ndarray) -> float:
    """Gini index of the absolute map (Chalasani et al. 2020, https://arxiv.org/abs/1810.06583, as Quantus's
    Sparseness): sum_i (2i - n - 1) a_(i) / (n sum a) over the n values sorted ascending.

    Args:
        m: a map of any shape (H, W), flattened.

    Returns:
        In [0, 1 - 1/n]: 0 for a constant map (evidence everywhere alike), (n - 1)/n for a one-hot map.
        Higher is sparser. NaN when the map is zero everywhere or non-finite.
    """
    a = np.sort(_magnitude("sparseness", m))
    n = a.size
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * a).sum() / (n * a.sum()))


@nan_if_undefined
def complexity(m: np.ndarray, *, normalised: bool = False) -> float:
    """Entropy of the fractional contributions p_i = |m_i| / sum |m| (Bhatt, Weller & Moura 2020,
    https://arxiv.org/abs/2005.00631, as Quantus's Complexity), in nats.

    Returns:
        In [0, log n]: 0 for a one-hot map, log n for a constant one; divided by log n when `normalised`
        (in [0, 1], comparable across image sizes). Lower is simpler. NaN when the map is zero everywhere or
        non-finite.
    """
    a = _magnitude("complexity", m)
    p = a / a.sum()
    p = p[p > 0]
    h = float(-(p * np.log(p)).sum())
    if normalised:
        return h / math.log(a.size) if a.size > 1 else 0.0
    return h


@nan_if_undefined
def histogram_entropy(m: np.ndarray, *, n_bins: int = 100) -> float:
    """Entropy (nats) of the histogram of the map's values in `n_bins` equal bins between its minimum and
    maximum: the discrete entropy Hedstrom et al. 2023 (https://arxiv.org/abs/2401.06465) use as eMPRT's
    complexity. Signed values are binned as they are.

    Returns:
        In [0, log n_bins]: 0 for a constant map; higher when the values spread over many bins (noise).
        NaN when the map is non-finite.
    """
    at_least("histogram_entropy", "n_bins", n_bins, 1)
    a = np.asarray(m, dtype=np.float64).ravel()
    reason = non_finite(a)
    if reason:
        raise Undefined(f"histogram_entropy: {reason}")
    counts, _ = np.histogram(a, bins=int(n_bins))
    p = counts[counts > 0] / a.size
    return float(-(p * np.log(p)).sum())
