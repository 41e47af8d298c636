"""Verdicts for the audit: does a method's map beat a random map (or the area's chance level), sit at chance, or
do worse, decided by a seeded bootstrap interval of the per-image difference and a minimum effect size.

A verdict is "beats random" when the whole 95% interval of the mean per-image difference lies above zero and the
mean clears the metric's minimum effect, "worse than random" in the mirror case, "too few images" below
`MIN_IMAGES` images, and "at chance" otherwise. Differences are oriented so that positive is better (deletion:
random minus map, since a lower deletion area is better; insertion: map minus random).

Flagging (`flag_image`) marks an image whose saliency sits off the anatomy more than chance allows: on the
marker when the marker's box holds more of the map than the same box at any of `FLAG_BOXES` random positions
of that image and at least `FLAG_MARKER_EXCESS` above its area's share; outside the lungs when the lungs hold
`FLAG_LUNG_DEFICIT` less of the map than their area's share (a random map puts its area's share inside) and less
than the same map moved to any of `FLAG_BOXES` random places (wrapping around), so that a coarse map whose blob
falls off the lungs by its size alone is not flagged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

BEATS, CHANCE, WORSE, FEW = "beats random", "at chance", "worse than random", "too few images"
ABOVE, BELOW = "above chance", "below chance"  # for the marker, where more saliency is a finding, not a merit
MIN_IMAGES = 6
N_BOOT = 2000
# the smallest mean difference that counts, per metric (areas and masses are shares in [0, 1])
MIN_EFFECT = {"deletion": 0.02, "insertion": 0.02, "faithfulness": 0.02, "lungs": 0.05, "marker": 0.01,
              "stability": 0.05}
BETTER = {"deletion": "lower", "insertion": "higher", "faithfulness": "higher", "lungs": "higher",
          "marker": "neither", "stability": "higher"}
FLAG_BOXES = 99
FLAG_MARKER_EXCESS = 0.01
FLAG_LUNG_DEFICIT = 0.10


@dataclass(frozen=True)
class Verdict:
    """One verdict and the numbers that decide it.

    Attributes:
        verdict: BEATS, CHANCE, WORSE, FEW (or ABOVE / BELOW for the marker).
        difference: mean per-image difference to the baseline, positive = better (marker: more on the marker).
        low, high: its seeded 95% bootstrap interval (NaN with fewer than 2 images).
        images: images with a defined difference.
        min_effect: the smallest mean difference that counts.
        better: which direction of the raw number is better ('lower', 'higher', 'neither').
    """

    verdict: str
    difference: float
    low: float
    high: float
    images: int
    min_effect: float
    better: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap_interval(values: Sequence[float] | np.ndarray, *, n_boot: int = N_BOOT, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """Mean of `values` [N] and the percentile bootstrap interval of the mean (seeded; NaNs dropped)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    if v.size == 1:
        return float(v[0]), math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)  # (n_boot,)
    alpha = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def judge(differences: Sequence[float] | np.ndarray, metric: str, *, seed: int = 0,
          min_images: int = MIN_IMAGES) -> Verdict:
    """The verdict of per-image differences to the baseline (positive = better) for `metric` (a MIN_EFFECT key)."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    mean, low, high = bootstrap_interval(d, seed=seed)
    effect = MIN_EFFECT[metric]
    up, down = (ABOVE, BELOW) if metric == "marker" else (BEATS, WORSE)
    if d.size < min_images:
        verdict = FEW
    elif low > 0 and mean >= effect:
        verdict = up
    elif high < 0 and mean <= -effect:
        verdict = down
    else:
        verdict = CHANCE
    return Verdict(verdict, mean, low, high, int(d.size), effect, BETTER[metric])


def empty(metric: str) -> dict[str, Any]:
    """The verdict of a check that did not run (keeps audit.json's shape)."""
    return Verdict(FEW, math.nan, math.nan, math.nan, 0, MIN_EFFECT[metric], BETTER[metric]).as_dict()


# --------------------------------------------------------------------------------------------- flagging


def box_null(saliency: np.ndarray, box: np.ndarray, *, n: int = FLAG_BOXES, seed: int = 0) -> np.ndarray:
    """Share of |saliency| in a box of the marker's size at `n` seeded random positions of the same image.

    Args:
        saliency: (H, W) map.
        box: (H, W) boolean mask of the marker (its bounding box sets the size).
    Returns:
        (n,) shares in [0, 1] (NaN for a zero map or an empty box).
    """
    a = np.abs(np.asarray(saliency, dtype=np.float64))
    total = a.sum()
    ys, xs = np.nonzero(box)
    if total <= 0 or ys.size == 0:
        return np.full(n, math.nan)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    integral = np.pad(a.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # (H+1, W+1)
    rng = np.random.default_rng(seed)
    top = rng.integers(0, a.shape[0] - h + 1, size=n)
    left = rng.integers(0, a.shape[1] - w + 1, size=n)
    sums = (integral[top + h, left + w] - integral[top, left + w] - integral[top + h, left] + integral[top, left])
    return sums / total


def shift_null(saliency: np.ndarray, region: np.ndarray, *, n: int = FLAG_BOXES, seed: int = 0) -> np.ndarray:
    """Share of |saliency| inside `region` when the map is moved (wrapping around) by `n` seeded random offsets.

    Args:
        saliency: (H, W) map; region: (H, W) boolean mask.
    Returns:
        (n,) shares in [0, 1] (NaN for a zero map).
    """
    a = np.abs(np.asarray(saliency, dtype=np.float64))
    total = a.sum()
    if total <= 0:
        return np.full(n, math.nan)
    rng = np.random.default_rng(seed)
    dy = rng.integers(1, a.shape[0], size=n)  # never the map where it is
    dx = rng.integers(0, a.shape[1], size=n)
    moved = [np.roll(a, (int(y), int(x)), axis=(0, 1))[region].sum() for y, x in zip(dy, dx, strict=True)]
    return np.array(moved) / total


@dataclass(frozen=True)
class Flag:
    """Why one image is flagged for one method (`reasons` empty: not flagged).

    Attributes:
        score: how telling the image is (the larger excess over chance of the two rules), for ordering.
        marker_excess: marker mass minus the marker's share (NaN without a marker).
        marker_null: the largest share of the map in a marker-sized box at a random position.
        lung_deficit: the lungs' share of the image minus the map's mass inside them (NaN without lungs).
        lung_null: the smallest mass inside the lungs of the map moved to a random place.
    """

    reasons: tuple[str, ...]
    score: float
    marker_excess: float
    marker_null: float
    lung_deficit: float
    lung_null: float = math.nan


def flag_image(saliency: np.ndarray, lungs: np.ndarray | None, marker: np.ndarray | None, *,
               seed: int = 0) -> Flag:
    """Flag one (H, W) map: saliency on the marker beyond every random box and the marker's share, or off the
    lungs by more than `FLAG_LUNG_DEFICIT` below their share (see the module docstring)."""
    from saliencylab.metrics.localisation import mass_inside

    reasons = []
    m_excess = m_null = l_deficit = l_null = math.nan
    a = np.abs(np.asarray(saliency, dtype=np.float64))
    if marker is not None and marker.any() and a.sum() > 0:
        mass = float(a[marker].sum() / a.sum())
        m_excess = mass - float(marker.mean())
        null = box_null(a, marker, seed=seed)
        m_null = float(np.nanmax(null)) if np.isfinite(null).any() else math.nan
        if m_excess >= FLAG_MARKER_EXCESS and mass > m_null:
            reasons.append("marker")
    if lungs is not None and lungs.any() and a.sum() > 0:
        mass = float(mass_inside(a, lungs))
        l_deficit = float(lungs.mean()) - mass
        l_null = float(np.nanmin(shift_null(a, lungs, seed=seed)))
        if l_deficit >= FLAG_LUNG_DEFICIT and mass < l_null:
            reasons.append("outside lungs")
    score = max((v for v in (m_excess, l_deficit) if math.isfinite(v)), default=math.nan)
    return Flag(tuple(reasons), score, m_excess, m_null, l_deficit, l_null)


# ------------------------------------------------------------------------------------------------ words


NAMES = {"faithfulness": "faithfulness (deletion and insertion against a random map)",
         "lungs": "localisation (saliency inside the lungs against their share of the image)",
         "stability": "stability (map of a noisy copy against the map of another image)"}


def _fmt(v: Mapping[str, Any]) -> str:
    return f"{v['difference']:+.3f}, 95% interval {v['low']:+.3f} to {v['high']:+.3f}, {v['images']} images"


def failing(methods: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Sentences naming each method that does worse than random (or at chance) on a judged property."""
    out = []
    for name, s in methods.items():
        v = s.get("verdicts") or {}
        for key in ("faithfulness", "lungs", "stability"):
            got = v.get(key)
            if not got or got["verdict"] not in (WORSE, CHANCE):
                continue
            extra = ""
            if key == "faithfulness":
                f = s["faithfulness"]["blur"]
                extra = (f": deletion {f['deletion']['map']:.3f} against {f['deletion']['random']:.3f} for a random "
                         f"map (lower is better), insertion {f['insertion']['map']:.3f} against "
                         f"{f['insertion']['random']:.3f} (higher is better)")
            elif key == "lungs":
                extra = f": {100 * s['lung_mass']:.0f}% inside lungs that cover {100 * s['lung_share']:.0f}%"
            out.append(f"{name} is {got['verdict']} on {NAMES[key]}{extra} (difference {_fmt(got)})")
    return out
