"""The phantoms' shortcut families, each switchable per image and class, with ground truth and a probe.

DeGrave et al. 2021 (https://doi.org/10.1038/s42256-021-00338-7) found each of these in real COVID-19
classifiers:
- marker: a lead laterality marker ("L" on the patient's left, the image's right; or "R" on the image's left).
- text: a burned-in label ("PORTABLE", "AP SUPINE", a date), set into the displayed pixels.
- site: the hospital (0 or 1), with its own exposure, contrast, edge enhancement and collimation border.
- position: AP (portable, supine: scapulae over the lungs, a magnified heart, higher clavicles) or PA.
- devices: ECG electrodes with their leads and a central venous line.

Each family is drawn from its own random stream, so an image can be redrawn from its metadata row with one
family switched (`redraw`), and a probe counts how many of a model's decisions flip (`probe_<family>`).
The `<class>/shortcuts/` masks hold the pixels of each family as bits (`BITS`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from saliencylab.data.glyphs import render

BITS = {"marker": 1, "text": 2, "devices": 4, "site": 8}
FAMILIES = ("marker", "text", "site", "position", "devices")
# the value each family takes when it is "present" and "absent" in a probe
STATES: dict[str, tuple[Any, Any]] = {"marker": (True, False), "text": (True, False), "site": (1, 0),
                                      "position": ("AP", "PA"), "devices": (True, False)}


def marker_glyph(letter: str, height: int) -> np.ndarray:
    """A bold lead letter about `height` pixels tall, bool (7 * scale, 5 * scale + bold): strokes at least
    two pixels wide, as real lead markers are."""
    glyph = render(letter, max(1, round(height / 7)))
    if glyph.shape[0] < 14:  # one-pixel strokes: thicken them to the right
        glyph = np.pad(glyph, ((0, 0), (0, 1)))
        glyph[:, 1:] |= glyph[:, :-1].copy()
    return glyph


def draw_marker(rng: np.random.Generator, s: int,
                inset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A lead marker's attenuation (s, s) and its box (x0, y0, x1, y1), exclusive: "L" in the image's upper
    right corner (the patient's left, 70%) or "R" in its upper left, inside a collimation border of
    `inset` (x, y) sides."""
    on_right = rng.random() < 0.7
    h = max(7, int(s * rng.uniform(0.07, 0.09)))
    glyph = marker_glyph("L" if on_right else "R", h)
    gh, gw = glyph.shape
    margin = int(s * rng.uniform(0.03, 0.06))
    x0 = s - margin - gw - round(inset[0] * s) if on_right else margin + round(inset[0] * s)
    y0 = margin + int(s * rng.uniform(0.0, 0.05)) + round(inset[1] * s)
    mu = np.zeros((s, s), np.float32)
    mu[y0:y0 + gh, x0:x0 + gw] = rng.uniform(4.0, 6.0) * glyph
    return mu, (x0, y0, x0 + gw, y0 + gh)


def _label(rng: np.random.Generator, position: str, s: int) -> tuple[str, int]:
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    options = ["PORTABLE", f"{position} SUPINE" if position == "AP" else f"{position} ERECT",
               f"{month:02d}/{day:02d}/20", f"{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}",
               f"PORTABLE {position}"]
    scale = max(1, round(0.035 * s / 7))
    fitting = [t for t in options if (6 * len(t) - 1) * scale <= 0.6 * s] or [position]
    return fitting[int(rng.integers(len(fitting)))], scale


def draw_text(rng: np.random.Generator, img: np.ndarray, position: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A burned-in white label in the image's lower band, left or right. Returns (copy of img, box)."""
    s = img.shape[0]
    text, scale = _label(rng, position, s)
    glyph = render(text, scale)
    gh, gw = glyph.shape
    margin = int(s * rng.uniform(0.03, 0.06))
    x0 = margin if rng.random() < 0.5 else s - margin - gw
    y0 = s - margin - gh - int(s * rng.uniform(0.0, 0.04))
    out = img.copy()
    patch = out[y0:y0 + gh, x0:x0 + gw]
    patch[glyph] = rng.uniform(0.92, 1.0)
    return out, (x0, y0, x0 + gw, y0 + gh)


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def draw_devices(rng: np.random.Generator, frame: Any, s: int) -> tuple[np.ndarray, np.ndarray]:
    """ECG electrodes (rings with a central snap) with leads running off the film, and a central venous line
    from the neck to the superior vena cava. Returns (attenuation (s, s), bool mask (s, s))."""
    from scipy.ndimage import gaussian_filter

    h = frame.bottom - frame.top
    pts = []
    snaps = np.zeros((s, s), np.float32)
    for _ in range(int(rng.integers(3, 6))):
        cx = float(np.clip(frame.mid + rng.choice([-1, 1]) * frame.half * rng.uniform(0.2, 0.95), 0.04, 0.96))
        cy = float(np.clip(frame.top + h * rng.uniform(-0.05, 0.85), 0.04, 0.96))
        r = rng.uniform(0.014, 0.02)
        lo_r, hi_r = max(0, int((cy - 2 * r) * s)), min(s, int((cy + 2 * r) * s) + 1)
        lo_c, hi_c = max(0, int((cx - 2 * r) * s)), min(s, int((cx + 2 * r) * s) + 1)
        yy, xx = np.mgrid[lo_r:hi_r, lo_c:hi_c]
        d = np.hypot((yy + 0.5) / s - cy, (xx + 0.5) / s - cx) / r
        snaps[lo_r:hi_r, lo_c:hi_c] += (np.abs(d - 1) < 0.22) * 0.8 + (d < 0.35) * 1.5
        end = np.array([rng.uniform(0, 1), 0.0]) if rng.random() < 0.5 else \
            np.array([0.0 if cx < frame.mid else 1.0, rng.uniform(0.1, 0.9)])
        ctrl = (np.array([cx, cy]) + end) / 2 + rng.normal(0, 0.08, 2)
        pts.append(_bezier(np.array([cx, cy]), ctrl, end, int(2 * s)))
    if rng.random() < 0.7:  # a central line entering on the patient's right (image left)
        start = np.array([frame.mid - frame.half * rng.uniform(0.5, 0.9), 0.0])
        tip = np.array([frame.mid - rng.uniform(0.01, 0.03), frame.top + h * rng.uniform(0.25, 0.35)])
        ctrl = np.array([frame.mid - frame.half * rng.uniform(0.2, 0.4), frame.top + rng.uniform(-0.02, 0.05)])
        pts.append(_bezier(start, ctrl, tip, int(2 * s)))
    acc = np.zeros(s * s, np.float32)
    if pts:
        p = np.concatenate(pts)
        ok = (p[:, 0] >= 0) & (p[:, 0] < 1) & (p[:, 1] >= 0) & (p[:, 1] < 1)
        idx = (p[ok, 1] * s).astype(int) * s + (p[ok, 0] * s).astype(int)
        acc = np.minimum(np.bincount(idx, minlength=s * s).astype(np.float32), 2.0)
    wires = gaussian_filter(acc.reshape(s, s), 0.6, truncate=2.5)
    mu = 2.5 * (np.clip(wires, 0, 1) + snaps)
    return mu, mu > 0.4


def _bool(value: str | None) -> bool:
    return str(value).strip() in ("1", "True", "true")


def draw_kwargs(row: dict[str, str], settings: dict[str, Any]) -> dict[str, Any]:
    """The `draw` arguments that reproduce a metadata row's image (given the dataset's `phantoms.json`
    settings), every family as it was drawn."""
    cls = row["class"]
    return {"marker": _bool(row.get("marker")), "text": _bool(row.get("text")),
            "site": int(row.get("site") or 0), "position": row.get("position") or "PA",
            "devices": _bool(row.get("devices")),
            "exposure_shift": float(settings.get("exposure_shift", {}).get(cls, 0.0)),
            "lesion_scale": float(settings.get("lesion_scale", 1.0)),
            "anatomy": settings.get("anatomy", "auto")}


def redraw(row: dict[str, str], settings: dict[str, Any], *, size: int | None = None,
           **families: Any) -> np.ndarray:
    """A metadata row's image drawn again with some families set (e.g. `marker=False`, `site=1`,
    `position="AP"`); float32 (size, size) in [0, 1]. Without overrides it equals the stored file (up to
    the uint8 rounding)."""
    from saliencylab.data.phantoms import draw

    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown shortcut families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
    kwargs = draw_kwargs(row, settings) | families
    return draw(int(row["seed"]), row["class"] == "COVID", size=size or int(settings.get("size", 256)),
                **kwargs).image


def as_batch(images: Sequence[np.ndarray], size: int, channels: int) -> torch.Tensor:
    """Float (H, W) images in [0, 1] -> x[B, channels, size, size], through uint8 as the stored PNGs are."""
    from PIL import Image

    arr = []
    for img in images:
        u8 = (np.asarray(img) * 255 + 0.5).astype(np.uint8)
        if u8.shape[0] != size:
            u8 = np.asarray(Image.fromarray(u8).resize((size, size), Image.BILINEAR))
        arr.append(u8)
    x = torch.from_numpy(np.stack(arr)).float().div_(255.0).unsqueeze(1)  # (B, 1, H, W), as train.to_batch
    return x.expand(-1, channels, -1, -1).contiguous() if channels > 1 else x


def probe(family: str, model: torch.nn.Module, rows: Sequence[dict[str, str]], settings: dict[str, Any], *,
          input_size: int, channels: int = 1) -> dict[str, float]:
    """Draw each row's image with the family present and absent, and count the model's flipped decisions.

    Args:
        family: one of FAMILIES.
        model: a single-logit model taking x[B, channels, input_size, input_size] in [0, 1].
        rows: metadata rows of a phantom dataset (`metadata.csv`).
        settings: the dataset's settings (`phantoms.json` "settings", parsed).

    Returns:
        `metrics.probes.flips` of (present, absent): images, flips, flip_rate, positive_rate_a (present),
        positive_rate_b (absent). A model that uses the shortcut flips many decisions and is called positive
        more often with it present; one that does not, hardly any.
    """
    from saliencylab.metrics.probes import flips, positive_probability

    present, absent = swapped(family, rows, settings, input_size=input_size, channels=channels)
    return flips(positive_probability(model, present), positive_probability(model, absent))


def swapped(family: str, rows: Sequence[dict[str, str]], settings: dict[str, Any], *, input_size: int,
            channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's image redrawn with the family present and with it absent, everything else as stored:
    two batches x[B, channels, input_size, input_size] in [0, 1], for a probe to compare."""
    return tuple(as_batch([redraw(r, settings, **{family: state}) for r in rows], input_size, channels)
                 for state in STATES[family])  # type: ignore[return-value]


def _make_probe(family: str) -> Callable[..., dict[str, float]]:
    def run(model: torch.nn.Module, rows: Sequence[dict[str, str]], settings: dict[str, Any], *,
            input_size: int, channels: int = 1) -> dict[str, float]:
        return probe(family, model, rows, settings, input_size=input_size, channels=channels)

    run.__name__ = f"probe_{family}"
    run.__doc__ = f"`probe('{family}', ...)`: flips when the {family} family is switched (present vs absent)."
    return run


probe_marker = _make_probe("marker")
probe_text = _make_probe("text")
probe_site = _make_probe("site")
probe_position = _make_probe("position")
probe_devices = _make_probe("devices")
PROBES = {f: globals()[f"probe_{f}"] for f in FAMILIES}

