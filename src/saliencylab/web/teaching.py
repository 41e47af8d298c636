"""Teaching mode: exercises on synthetic chest X-rays whose lesions, lungs and marker are known.

The student marks where they would look; then the model's saliency, the lung mask and (for a phantom)
the lesions are revealed, with the share of saliency inside the student's region, inside the lungs and
on the marker, each beside its chance level.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from saliencylab.data.images import LoadedImage
from saliencylab.data.phantoms import Phantom, draw
from saliencylab.errors import UserError

EXERCISE_SIDE = 256


@dataclass(frozen=True)
class Exercise:
    """One phantom exercise: drawn from `seed`, COVID-like (with lesions) or not, with or without a marker."""

    id: str
    seed: int
    covid: bool
    marker: bool
    title: str


EXERCISES: tuple[Exercise, ...] = (
    Exercise("phantom-1", 101, True, False, "Exercise 1: opacities, no marker"),
    Exercise("phantom-2", 202, True, True, "Exercise 2: opacities and an 'L' marker"),
    Exercise("phantom-3", 303, False, True, "Exercise 3: a clear chest with a marker"),
    Exercise("phantom-4", 404, True, False, "Exercise 4: subtle opacities"),
)


def get_exercise(eid: str) -> Exercise:
    for ex in EXERCISES:
        if ex.id == eid:
            return ex
    raise UserError(f"unknown exercise '{eid}'; choose one of {', '.join(e.id for e in EXERCISES)}")


@functools.lru_cache(maxsize=len(EXERCISES))
def phantom(eid: str) -> Phantom:
    """The exercise's drawn phantom (image, lungs, lesions, marker box), the same on every machine."""
    ex = get_exercise(eid)
    return draw(ex.seed, ex.covid, size=EXERCISE_SIDE, marker=ex.marker, lesion_scale=1.5)


def exercise_image(eid: str) -> LoadedImage:
    ph = phantom(eid)
    return LoadedImage(source=f"{eid}.png", name=eid, pixels=ph.image, meta={"format": "phantom", "exercise": eid})


def student_scores(student: np.ndarray, lesions: np.ndarray | None) -> dict[str, Any]:
    """How the student's region compares with the lesions: share of lesion area covered, and the Dice overlap.

    Args:
        student, lesions: bool (H, W); lesions None or empty when the answer has none.
    """
    area = float(student.mean())
    if lesions is None or not lesions.any():
        return {"region_share": round(area, 6), "lesion_covered": None, "dice": None,
                "note": "this chest has no lesion: a careful reader marks the lungs broadly or nothing in particular"}
    inter = float((student & lesions).sum())
    dice = 2 * inter / (student.sum() + lesions.sum())
    return {"region_share": round(area, 6), "lesion_covered": round(inter / float(lesions.sum()), 6),
            "dice": round(dice, 6), "lesion_share": round(float(lesions.mean()), 6)}


def teaching_reading(loc: dict[str, Any]) -> list[str]:
    """Plain-language sentences for the student, from `core.localisation`'s numbers."""
    lines = []
    words = {"student": "inside the region you marked", "lungs": "inside the lungs", "marker": "on the 'L' marker",
             "lesions": "on the lesions"}
    for key, where in words.items():
        if key not in loc:
            continue
        r = loc[key]
        if r["mass"] is None:
            continue
        verb = "cover" if key in ("lungs", "lesions") else "covers"
        lines.append(f"{100 * r['mass']:.0f}% of the saliency lies {where}, which {verb} "
                     f"{100 * r['chance']:.0f}% of the image: {r['reading']}.")
    marker = loc.get("marker")
    if marker and marker["ratio"] is not None and marker["ratio"] > 2:
        lines.append("The model looks at the marker far more than its size warrants: a shortcut, not anatomy.")
    lungs = loc.get("lungs")
    if lungs and lungs["ratio"] is not None and lungs["ratio"] < 1.1:
        lines.append("The saliency is not concentrated in the lungs: be wary of trusting this prediction.")
    return lines


def marker_box(eid: str) -> tuple[int, int, int, int] | None:
    return phantom(eid).marker_box


