"""Synthetic chest X-ray phantoms with ground truth: lung masks, lesion masks and controllable shortcuts.

Real radiographs cannot be downloaded here, so the embedded dataset is drawn, anchored on real data where
it is installed: with the `[anatomy]` extra, the lung fields are real lung outlines (torchxrayvision's
V7 Labs masks, resampled and varied) and the COVID-like findings sit where real opacity boxes do (RSNA
Pneumonia Challenge and NIH ChestX-ray14 boxes); without it, parametric lungs and rule-based findings are
the fallback (see `anatomy.py`). Around the lungs: body and shoulders, curved posterior and anterior ribs,
clavicles, scapulae, the mediastinum with trachea and aortic knob, a heart whose left border is convex and
left of the midline (on the image's right), hemidiaphragms with costophrenic angles, a tapering vascular
tree from the hila, breast shadows in a share of films. The structures' attenuations are summed and formed
into an image through I = I0 exp(-mu), quantum noise, detector blur and a display curve that vary per
image and per simulated site. The COVID-like class adds ground-glass and consolidative opacities with
irregular borders (vessels stay visible through ground glass; the pattern of Wong et al. 2020,
https://doi.org/10.1148/radiol.2020201160).

Five shortcut families (see `shortcuts.py`) appear at rates set per class, so that a shortcut like those
DeGrave et al. 2021 found can be switched on, measured and switched off: the lead laterality marker,
burned-in text, the hospital (site), the patient position (AP/PA) and devices.

Everything is written in the COVID-19 Radiography Database's layout: `<class>/images/<class>-<n>.png`,
`<class>/masks/...` (lungs), plus `<class>/lesions/...`, `<class>/shortcuts/...` (shortcut pixels as
bits, `shortcuts.BITS`) and a `metadata.csv`.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from saliencylab.errors import UserError

CLASSES = ("COVID", "Normal")
ANATOMY = ("auto", "real", "drawn")


def _equal(rate: float) -> Any:
    return field(default_factory=lambda: dict.fromkeys(CLASSES, rate))


@dataclass(frozen=True)
class PhantomConfig:
    """How a phantom dataset is drawn; written to `phantoms.json` beside the images.

    Attributes:
        n_covid, n_normal: images per class (the article's database: 3,616 and 10,192).
        size: side of the square PNGs.
        seed: every image's own seed derives from it, so a dataset is the same on every machine.
        marker_rate: probability of the lead laterality marker per class; equal rates mean no shortcut.
        exposure_shift: added to the mean brightness per class (a second, optional shortcut).
        lesion_scale: multiplies lesion opacity; 1.0 is calibrated so the small CNN errs now and then.
        workers: processes (0: all cores).
        text_rate: probability of a burned-in text label per class.
        site_rate: probability that an image comes from hospital 1 (borders, hard contrast) per class.
        ap_rate: probability of an AP (portable) film per class; the rest are PA.
        device_rate: probability of ECG leads and a central line per class.
            The four newer families are off by default (rate 0), so that default datasets, and the audit's
            marker probe that redraws an image with only the marker switched, stay as they were; equal
            rates above 0 add variety without a shortcut.
        anatomy: "real" (the `[anatomy]` extra's lung outlines and opacity boxes), "drawn" (parametric),
            or "auto" (real when installed).
    """

    n_covid: int = 3616
    n_normal: int = 10192
    size: int = 256
    seed: int = 0
    marker_rate: dict[str, float] = _equal(0.5)
    exposure_shift: dict[str, float] = _equal(0.0)
    lesion_scale: float = 1.0
    workers: int = 0
    text_rate: dict[str, float] = _equal(0.0)
    site_rate: dict[str, float] = _equal(0.0)
    ap_rate: dict[str, float] = _equal(0.0)
    device_rate: dict[str, float] = _equal(0.0)
    anatomy: str = "auto"

    def count(self, cls: str) -> int:
        return self.n_covid if cls == "COVID" else self.n_normal


@dataclass
class Phantom:
    """One drawn radiograph and its ground truth (all (size, size))."""

    image: np.ndarray  # float32 in [0, 1]
    lungs: np.ndarray  # bool
    lesions: np.ndarray  # bool, inside the lungs
    marker_box: tuple[int, int, int, int] | None  # x0, y0, x1, y1 (exclusive), or None
    seed: int
    text_box: tuple[int, int, int, int] | None = None  # the burned-in label's box, or None
    lesion_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # each finding's pixel box
    shortcut_mask: np.ndarray | None = None  # uint8 bits of shortcuts.BITS per pixel
    source: int = -1  # index of the real lung outline used (-1: drawn)


def image_seed(seed: int, cls: str, index: int) -> int:
    """A stable per-image seed (independent of worker count and order)."""
    return (seed * 1_000_003 + (0 if cls == "COVID" else 500_000_000) + index) % (2**32)


def resolve_anatomy(choice: str) -> str:
    """'auto' -> 'real' when the `[anatomy]` extra is installed, else 'drawn'.

    Raises:
        UserError: an unknown choice, or 'real' without the extra.
    """
    from saliencylab.data import anatomy

    if choice not in ANATOMY:
        raise UserError(f"--anatomy {choice}: use one of {', '.join(ANATOMY)}")
    if choice == "auto":
        return "real" if anatomy.available() else "drawn"
    if choice == "real" and not anatomy.available():
        raise UserError("--anatomy real needs the [anatomy] extra: pip install 'saliencylab[anatomy]' "
                        "(or use --anatomy drawn)")
    return choice


FAMILY_STREAMS = {"anatomy": 0, "marker": 1, "text": 2, "site": 3, "position": 4, "devices": 5, "lesions": 6}


def _stream(seed: int, family: str) -> np.random.Generator:
    """An independent random stream per image and family: switching a shortcut family on or off never
    changes the anatomy or another family."""
    return np.random.default_rng([seed, FAMILY_STREAMS[family], 0x9E3779B9])


@lru_cache(maxsize=8)
def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    """(v (s, 1), u (1, s)) pixel-centre coordinates in units of the side, float32; they broadcast."""
    c = (np.arange(s, dtype=np.float32) + 0.5) / s
    return c[:, None], c[None, :]


@lru_cache(maxsize=4)
def _noise_bank(s: int) -> np.ndarray:
    """Four smooth noise fields (4, 2, 2s, 2s) in about [-1, 1] (fine, coarse), the same on every machine;
    images take random crops of them (much cheaper than filtering noise per image)."""
    from PIL import Image

    rng = np.random.default_rng(20_201_160)
    out = np.zeros((4, 2, 2 * s, 2 * s), np.float32)
    for k in range(4):
        for j, div in enumerate((48, 14)):
            n = max(4, 2 * s // max(1, s // div) if s >= div else 8)
            small = rng.standard_normal((n, n)).astype(np.float32)
            big = np.asarray(Image.fromarray(small, mode="F").resize((2 * s, 2 * s), Image.BICUBIC))
            out[k, j] = big / (np.abs(big).max() + 1e-6)
    return out


def _crop(rng: np.random.Generator, bank: np.ndarray, h: int, w: int, scale: int) -> np.ndarray:
    """A random (h, w) window of one of the bank's fields at scale 0 (fine) or 1 (coarse)."""
    k = int(rng.integers(bank.shape[0]))
    y, x = int(rng.integers(0, bank.shape[2] - h + 1)), int(rng.integers(0, bank.shape[3] - w + 1))
    return bank[k, scale, y:y + h, x:x + w]


def _lowpass(img: np.ndarray, factor: int) -> np.ndarray:
    """A smooth copy of (s, s) float32: bilinear down by `factor`, then up again."""
    from PIL import Image

    s = img.shape[0]
    small = Image.fromarray(img.astype(np.float32), mode="F").resize((max(2, s // factor),) * 2, Image.BOX)
    return np.asarray(small.resize((s, s), Image.BILINEAR))


def _upsample(img: np.ndarray, s: int) -> np.ndarray:
    """(n, n) float32 -> (s, s), bilinear."""
    from PIL import Image

    if img.shape[0] == s:
        return img
    return np.array(Image.fromarray(img, mode="F").resize((s, s), Image.BILINEAR))


def _raster(poly: np.ndarray, s: int) -> np.ndarray:
    """A polygon (n, 2) of (x, y) in units of the side -> bool (s, s)."""
    from PIL import Image, ImageDraw

    im = Image.new("L", (s, s))
    ImageDraw.Draw(im).polygon([tuple(p) for p in (poly * s).tolist()], fill=1)
    return np.asarray(im).astype(bool)


def _real_lungs(rng: np.random.Generator, s: int, real: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Two real lung outlines, varied by a small affine map and a smooth warp, rasterised at s."""
    i = int(rng.integers(len(real.polygons)))
    left, right = real.polygons[i]
    both = np.concatenate([left, right])
    centre = (both.min(0) + both.max(0)) / 2
    ang = math.radians(rng.uniform(-3, 3))
    scale = np.clip(rng.normal(1.0, 0.035, 2), 0.92, 1.08)
    rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]]) * scale[None, :]
    shift = rng.uniform(-0.02, 0.02, 2)
    amp, freq, phase = rng.uniform(0.0, 0.008, 2), rng.uniform(2, 4, 2), rng.uniform(0, 2 * math.pi, 2)
    out = []
    for poly in (left, right):
        p = (poly - centre) @ rot.T + centre + shift
        p = p + amp * np.sin(freq * 2 * math.pi * p[:, ::-1] + phase)  # gentle bends
        out.append(_raster(np.clip(p, 0, 1), s))
    return out[0], out[1], i


def _drawn_lungs(rng: np.random.Generator, s: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The fallback without the `[anatomy]` extra: rounded fields with an apex, a flat medial border and a
    dome-shaped base with sharp costophrenic angles."""
    v, u = _grid(s)
    sides = []
    for side in (-1, 1):  # -1: image left (patient's right)
        cx = 0.5 + side * rng.uniform(0.17, 0.21)
        a, b = rng.uniform(0.14, 0.18), rng.uniform(0.33, 0.38)
        cy = rng.uniform(0.12, 0.16) + b
        ellipse = ((u - cx) / a) ** 2 + ((v - cy) / b) ** 2 < 1
        medial = (u - 0.5) * side > rng.uniform(0.045, 0.065) + 0.03 * np.clip(v - 0.45, 0, 1)
        lateral = (u - cx) * side / a
        base = rng.uniform(0.70, 0.76) - (0.025 if side == 1 else 0.0)
        dome = base - 0.05 * np.cos(np.clip(lateral, -1.6, 1.6) * 1.1) + 0.06 * np.clip(lateral, 0, 1)
        sides.append(ellipse & medial & (v < dome))
    return sides[0], sides[1], -1


@dataclass(frozen=True)
class _Frame:
    """Where the thorax is, read off the lung masks (units of the side)."""

    x0: float  # lateral edge of the image-left lung
    x1: float  # lateral edge of the image-right lung
    top: float  # lung apex
    bottom: float  # lowest costophrenic angle
    mid: float  # midline (spine)
    half: float  # half width of the rib cage
    base: np.ndarray  # (s,) lowest lung row per column (diaphragm), nan outside the lungs


def _frame(left: np.ndarray, right: np.ndarray) -> _Frame:
    s = left.shape[0]
    both = left | right
    cols, rows = np.nonzero(both.any(0))[0], np.nonzero(both.any(1))[0]
    if len(cols) == 0:  # degenerate masks (a tiny size): a centred default
        return _Frame(0.1, 0.9, 0.1, 0.85, 0.5, 0.42, np.full(s, np.nan, np.float32))
    lc, rc = np.nonzero(left.any(0))[0], np.nonzero(right.any(0))[0]
    mid = ((lc.max() + 1 if len(lc) else s / 2) + (rc.min() if len(rc) else s / 2)) / 2 / s
    x0, x1 = cols[0] / s, (cols[-1] + 1) / s
    base = np.where(both.any(0), (s - np.argmax(both[::-1], axis=0)) / s, np.nan).astype(np.float32)
    half = max(mid - x0, x1 - mid) + 0.03
    return _Frame(x0, x1, rows[0] / s, (rows[-1] + 1) / s, float(mid), float(half), base)


def _body(rng: np.random.Generator, f: _Frame, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft-tissue thickness (s, s) in [0, 1] (an elliptic torso that narrows to the neck and widens at the
    shoulders) and the body's (s,) half width per row."""
    v, u = _grid(s)
    rows = v[:, 0]
    chest = f.half + rng.uniform(0.02, 0.05)
    shoulder_v = f.top + rng.uniform(-0.02, 0.03)
    neck = rng.uniform(0.08, 0.11)
    shoulders = 1 / (1 + np.exp(-(rows - (shoulder_v - 0.05)) / 0.012))  # 0 above the shoulders (neck)
    bulge = rng.uniform(0.03, 0.07) * np.exp(-(((rows - shoulder_v - 0.02) / 0.06) ** 2))
    half = neck + (chest + bulge - neck) * shoulders
    half = half * (1 - 0.12 * np.clip(rows - f.bottom, 0, None))  # the abdomen narrows a little
    x = (u - f.mid) / half[:, None]
    return np.sqrt(np.clip(1 - x * x, 0, 1)).astype(np.float32), half.astype(np.float32)


def _ribs(rng: np.random.Generator, f: _Frame, s: int, body_half: np.ndarray, ap: bool = False) -> np.ndarray:
    """Posterior ribs (arcs that leave the spine, rise, then curve down along the chest wall; flatter on AP
    films) and fainter anterior ribs (descending from the chest wall towards the sternum), as bone
    thickness (s, s)."""
    v, u = _grid(s)
    h = f.bottom - f.top
    d = np.abs(u - f.mid)
    x = d / f.half  # (1, s): 0 at the spine, 1 at the chest wall
    sp = h * rng.uniform(0.095, 0.11)
    start = f.top - rng.uniform(0.02, 0.05)
    k0 = (v - start) / sp  # (s, 1)
    bend = h * (-0.12 * x + 0.45 * x * x * x) * (0.55 if ap else 1.0)  # (1, s)
    k = (v - start - bend * np.clip(1.5 - 0.08 * k0, 0.6, 1.5)) / sp
    k = k / (1 + 0.03 * np.clip(k, 0, None))  # the lower interspaces are wider
    z = (k - np.floor(k) - 0.5) * (1 / 0.21)
    z2 = z * z
    tube = np.sqrt(np.clip(1 - z2, 0, 1)) * (0.7 + 0.3 * z2)  # brighter cortex at the margins
    fade = (np.clip((x - 0.08) / 0.06, 0, 1) * (d < body_half[:, None] * 0.97)
            * np.clip((f.bottom + 0.04 - v) / 0.08, 0, 1))
    post = tube * ((k > 0) & (k < 10)) * fade
    # anterior ribs: from the chest wall at a rib's level down and inwards, ending at the costal cartilage
    xa = 1 - x
    ka = (v - start - 0.06 - h * (0.34 * xa - 0.1 * xa * xa)) / (sp * 1.1)
    za = (ka - np.floor(ka) - 0.5) * (1 / 0.17)
    ant = np.sqrt(np.clip(1 - za * za, 0, 1)) * ((ka > 0.5) & (ka < 7)) * np.clip((x - 0.3) / 0.12, 0, 1) * (x < 0.98)
    return (post + 0.4 * ant).astype(np.float32)


def _clavicles(rng: np.random.Generator, f: _Frame, s: int, ap: bool) -> np.ndarray:
    """Two clavicles from the sternal notch out to the shoulders, (s, s) bone thickness."""
    v, u = _grid(s)
    x = np.abs(u - f.mid) / f.half
    v0 = f.top + rng.uniform(0.03, 0.06) - (0.04 if ap else 0.0)  # AP: higher, more horizontal
    centre = v0 - (0.12 - 0.06 * ap) * x + 0.035 * np.sin(math.pi * np.clip(x, 0, 1))
    width = 0.014 - 0.004 * np.clip(x, 0, 1)
    z = (v - centre) / width
    return (np.sqrt(np.clip(1 - z * z, 0, 1)) * ((x > 0.1) & (x < 1.1))).astype(np.float32)


def _scapulae(rng: np.random.Generator, f: _Frame, s: int, ap: bool) -> np.ndarray:
    """The scapulae's thin plates; on PA films they are rotated out beside the lungs, on AP films their
    medial borders cross the upper lungs."""
    v, u = _grid(s)
    x = np.abs(u - f.mid) / f.half
    h = f.bottom - f.top
    top, low = f.top - 0.01, f.top + h * rng.uniform(0.45, 0.55)
    edge0 = rng.uniform(0.6, 0.72) if ap else rng.uniform(0.92, 1.02)
    t = np.clip((v - top) / (low - top), 0, 1)
    medial = edge0 + 0.12 * t * t  # (s, 1): the medial border bends out to the inferior angle
    inside = (v > top) & (v < low + 0.3 * (x - medial))
    dx = (x - medial) * (1 / 0.025)
    return (0.45 * ((x > medial) & inside) + 0.5 * np.exp(-dx * dx) * inside).astype(np.float32)


def _heart(rng: np.random.Generator, f: _Frame, s: int, ap: bool) -> tuple[np.ndarray, np.ndarray]:
    """Heart (a tilted ellipsoid whose left border, on the image's right, is convex and left of the midline)
    and the mediastinum with the aortic knob and the trachea's air column; (s, s) thickness each."""
    v, u = _grid(s)
    h = f.bottom - f.top
    width = 2 * f.half * rng.uniform(0.40, 0.47) * (rng.uniform(1.15, 1.25) if ap else 1.0)
    col = min(s - 1, int((f.mid + 0.3 * f.half) * s))
    diaphragm = float(f.base[col]) if np.isfinite(f.base[col]) else f.bottom - 0.05
    a, b, tilt = width * 0.56, h * rng.uniform(0.23, 0.27), rng.uniform(0.5, 0.75)
    cy = diaphragm - b * rng.uniform(0.45, 0.6)  # the heart rests on the diaphragm
    cx = f.mid + width * rng.uniform(0.1, 0.15)
    du, dv = u - cx, v - cy
    along = (du * math.cos(tilt) + dv * math.sin(tilt)) / a
    across = (dv * math.cos(tilt) - du * math.sin(tilt)) / b
    heart = np.sqrt(np.sqrt(np.sqrt(np.clip(1 - along * along - across * across, 0, 1))))
    heart = heart * np.clip((v - cy + 0.9 * b) / (0.6 * b), 0, 1)  # the top fades into the hila
    # mediastinum: a column between the lungs, an aortic knob to the patient's left, the trachea (air)
    w = 0.05 + 0.03 * np.clip((v - f.top) / h, 0, 1)
    m = (u - f.mid) / w
    m2 = m * m
    med = np.exp(-m2 * m2) * (v > f.top - 0.1)
    kx, ky, kr = f.mid + rng.uniform(0.045, 0.06), f.top + h * rng.uniform(0.2, 0.26), rng.uniform(0.028, 0.036)
    knob = np.sqrt(np.clip(1 - ((u - kx) ** 2 + (v - ky) ** 2) * (1 / kr**2), 0, 1))
    carina = f.top + h * rng.uniform(0.28, 0.34)
    t = (u - f.mid + 0.006) * (1 / 0.013)
    t2 = t * t
    trachea = np.exp(-t2 * t2 * t2) * np.clip((carina - v) / 0.03, 0, 1)
    return heart.astype(np.float32), (med + 0.7 * knob - 0.5 * trachea).astype(np.float32)


def _spine(rng: np.random.Generator, f: _Frame, s: int) -> np.ndarray:
    """Vertebral bodies with disc spaces and pedicles along the midline, (s, s) bone thickness."""
    v, u = _grid(s)
    period = rng.uniform(0.042, 0.05)
    phase = (v - rng.uniform(0, period)) / period
    frac = phase - np.floor(phase)  # (s, 1)
    m = (u - f.mid) * (1 / 0.03)
    m2 = m * m
    body = np.exp(-m2 * m2 * m2) * (0.55 + 0.45 * (np.abs(frac - 0.5) < 0.4))
    p = (np.abs(u - f.mid) - 0.022) * (1 / 0.006)
    ped = np.exp(-p * p) * np.exp(-((frac - 0.3) * (1 / 0.12)) ** 2)
    return (body + 0.5 * ped).astype(np.float32)


def _vessels(rng: np.random.Generator, f: _Frame, s: int) -> np.ndarray:
    """A tapering vascular tree from each hilum to the periphery, (s, s) projected vessel thickness."""
    from scipy.ndimage import gaussian_filter

    h = f.bottom - f.top
    acc = np.zeros(s * s, np.float32)
    step = 0.6 / s  # one stamp per 0.6 px
    for side in (-1, 1):
        hx = f.mid + side * f.half * rng.uniform(0.2, 0.28)
        hy = f.top + h * rng.uniform(0.38, 0.46)
        base = np.radians(np.array([-80.0, -40.0, 0.0, 35.0, 70.0, 100.0]) + rng.normal(0, 8, 6))
        ang = base if side > 0 else math.pi - base
        x = hx + side * np.array([0.0, 0.01, 0.02, 0.02, 0.01, 0.0]) * (1 + rng.uniform(0, 0.5))
        y = hy + h * np.array([-0.09, -0.05, 0.0, 0.04, 0.08, 0.12]) * rng.uniform(0.8, 1.2)
        length = h * rng.uniform(0.08, 0.11, 6) * np.array([0.8, 0.9, 1, 1, 1.1, 1.1])
        width = 0.011 * np.array([0.8, 0.9, 1, 1, 1.15, 1.25])
        for _ in range(7):
            ex, ey = x + length * np.cos(ang), y + length * np.sin(ang)
            n = np.maximum(2, (length / step).astype(int))
            seg = np.repeat(np.arange(len(x)), n)
            first = np.repeat(np.cumsum(n) - n, n)
            t = (np.arange(len(seg)) - first) / n[seg]
            px, py = x[seg] + t * (ex - x)[seg], y[seg] + t * (ey - y)[seg]
            ok = (px > 0) & (px < 1) & (py > 0) & (py < 1)
            idx = (py[ok] * s).astype(int) * s + (px[ok] * s).astype(int)
            acc += np.bincount(idx, weights=(width[seg][ok] * s) * 0.6, minlength=s * s).astype(np.float32)
            m = len(x)
            spread = rng.uniform(0.3, 0.6, m)
            ang = np.concatenate([ang + spread, ang - spread * rng.uniform(0.6, 1.0, m)]) + rng.normal(0, 0.1, 2 * m)
            x, y = np.concatenate([ex, ex]), np.concatenate([ey, ey])
            length = np.concatenate([length, length]) * rng.uniform(0.68, 0.86, 2 * m)
            width = np.concatenate([width, width]) * 0.72
    sigma = max(0.6, 0.7 * s / 256)
    # a vessel of d px gives a line density of d; the blur spreads it to a peak of about d / 2.5 sigma
    return gaussian_filter(acc.reshape(s, s), sigma, truncate=2.5) * (256.0 / s)


def _soft_shadows(rng: np.random.Generator, f: _Frame, s: int) -> np.ndarray:
    """Breast shadows over the lower zones (curved lower edges), in about a third of the films."""
    v, u = _grid(s)
    h = f.bottom - f.top
    out = np.zeros((s, s), np.float32)
    if rng.random() < 0.35:
        cy, a, b = f.top + h * rng.uniform(0.72, 0.85), f.half * rng.uniform(0.45, 0.6), h * rng.uniform(0.2, 0.28)
        for side in (-1, 1):
            cx = f.mid + side * f.half * rng.uniform(0.5, 0.65)
            r2 = ((u - cx) / a) ** 2 + ((v - cy) / b) ** 2
            out += np.sqrt(np.clip(1 - r2, 0, 1)) * (v > cy - 0.5 * b)
    return out


CLIP_GROWTH = (1.05, 1.06, 0.012)  # width and height factors, downward shift (units of the side)
# the findings' attenuation at lesion_scale 1: calibrated on 1,900 films at 128 px, 4 epochs of cxr_cnn, to
# sit between scale 1 (val loss 0.50, AUROC 0.80) and 2 (0.32, 0.96) where the earlier default did (0.43, 0.87)
LESION_GAIN = 1.5


def _lesion_boxes(rng: np.random.Generator, f: _Frame, real: Any, lung_box: np.ndarray | None) -> np.ndarray:
    """Boxes (n, 4) for the COVID-like findings: a real case's opacity boxes, carried from the real films'
    mean lung frame onto this phantom's lungs; without the real boxes, peripheral and basal rules."""
    if real is not None and lung_box is not None:
        j = int(rng.integers(len(real.cases) - 1))
        boxes = real.boxes[real.cases[j]:real.cases[j + 1]].astype(np.float64)
        mx0, my0, mx1, my1 = lung_box
        sx, sy = (f.x1 - f.x0) / (mx1 - mx0), (f.bottom - f.top) / (my1 - my0)
        cx = f.x0 + ((boxes[:, 0] + boxes[:, 2]) / 2 - mx0) * sx
        cy = f.top + ((boxes[:, 1] + boxes[:, 3]) / 2 - my0) * sy
        # widened a little (and moved down) before they are clipped to the lungs, so that the visible
        # findings' boxes match the real boxes' distribution (measured in benchmarks/bench_phantoms.py)
        w, h = (boxes[:, 2] - boxes[:, 0]) * sx * CLIP_GROWTH[0], (boxes[:, 3] - boxes[:, 1]) * sy * CLIP_GROWTH[1]
        cy = cy + CLIP_GROWTH[2]
        return np.clip(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1), 0, 1)
    n = int(rng.integers(1, 4))
    out = []
    for i in range(n):
        side = 1 if (i % 2 == 0) == (rng.random() < 0.5) else -1
        cx = f.mid + side * f.half * rng.uniform(0.45, 0.8)
        cy = f.top + (f.bottom - f.top) * rng.uniform(0.35, 0.85)
        w, h = rng.uniform(0.08, 0.22), rng.uniform(0.1, 0.3)
        out.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return np.clip(np.array(out), 0, 1)


def _lesions(rng: np.random.Generator, boxes: np.ndarray, lungs: np.ndarray, bank: np.ndarray,
             scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int, int, int]]]:
    """Ground-glass and consolidative opacities with irregular borders inside each box and the lungs.

    Returns:
        (attenuation (s, s), vessel visibility (s, s) in [0, 1] (consolidation hides vessels), lesion mask
        (s, s) bool, each lesion's pixel box (x0, y0, x1, y1), exclusive).
    """
    s = lungs.shape[0]
    mu = np.zeros((s, s), np.float32)
    vis = np.ones((s, s), np.float32)
    mask = np.zeros((s, s), bool)
    out_boxes = []
    for x0, y0, x1, y1 in boxes:
        c0, r0 = int(x0 * s), int(y0 * s)
        c1, r1 = max(c0 + 2, int(math.ceil(x1 * s))), max(r0 + 2, int(math.ceil(y1 * s)))
        c1, r1 = min(c1, s), min(r1, s)
        h, w = r1 - r0, c1 - c0
        if h < 2 or w < 2:
            continue
        ey = (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1
        ex = (np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1
        env = 1 - (np.abs(ey)[:, None] ** 2.5 + np.abs(ex)[None, :] ** 2.5)
        taper = np.clip(env + 0.2, 0, 1)  # the noise fades out towards the box so no border is straight
        field = env + (0.45 * _crop(rng, bank, h, w, 1) + 0.15 * _crop(rng, bank, h, w, 0)) * taper
        blob = (field > 0.04) & lungs[r0:r1, c0:c1]
        if not blob.any():
            continue
        density = np.clip((field - 0.04) / 0.5, 0, 1) * blob
        consolidation = rng.random() < 0.3
        amp = (rng.uniform(0.9, 1.3) if consolidation else rng.uniform(0.45, 0.75)) * scale * LESION_GAIN
        mu[r0:r1, c0:c1] += amp * density * (0.8 + 0.2 * _crop(rng, bank, h, w, 0))
        if consolidation:
            vis[r0:r1, c0:c1] *= 1 - 0.85 * density
        mask[r0:r1, c0:c1] |= blob
        rr, cc = np.nonzero(blob.any(1))[0], np.nonzero(blob.any(0))[0]
        out_boxes.append((c0 + int(cc[0]), r0 + int(rr[0]), c0 + int(cc[-1]) + 1, r0 + int(rr[-1]) + 1))
    return mu, vis, mask, out_boxes


@dataclass(frozen=True)
class Site:
    """A simulated hospital's acquisition and processing.

    Attributes:
        photons: mean quanta per pixel before the patient (exposure).
        gamma: display curve exponent; contrast: its sigmoid steepness.
        sharpen: unsharp-mask weight of the processing.
        crop: black collimation border as a fraction of the side (left/right, top/bottom).
        brightness: added to the displayed image.
    """

    photons: float
    gamma: float
    contrast: float
    sharpen: float
    crop: tuple[float, float]
    brightness: float


def site_params(rng: np.random.Generator, site: int) -> Site:
    """Hospital 0 (no borders, soft processing) or hospital 1 (collimation borders, harder contrast, edge
    enhancement, a darker display), each with per-image jitter."""
    if site == 0:
        return Site(photons=float(rng.uniform(2000, 5000)), gamma=float(rng.uniform(0.8, 1.05)),
                    contrast=float(rng.uniform(1.0, 1.6)), sharpen=float(rng.uniform(0.0, 0.3)), crop=(0.0, 0.0),
                    brightness=float(rng.uniform(-0.03, 0.03)))
    return Site(photons=float(rng.uniform(1200, 2500)), gamma=float(rng.uniform(0.95, 1.2)),
                contrast=float(rng.uniform(2.0, 2.6)), sharpen=float(rng.uniform(0.5, 0.8)),
                crop=(float(rng.uniform(0.04, 0.08)), float(rng.uniform(0.0, 0.04))),
                brightness=float(rng.uniform(-0.08, -0.02)))


def _display(rng: np.random.Generator, mu: np.ndarray, site: Site, blur: float, hi: float) -> np.ndarray:
    """Image formation: I = I0 exp(-mu), quantum noise (Poisson, drawn as its normal approximation, which
    holds at these counts), a detector blur, the log transform, a window [0, hi] and the site's display
    curve -> [0, 1]."""
    from scipy.ndimage import gaussian_filter

    expected = site.photons * np.exp(-mu)
    counts = expected + np.sqrt(expected) * rng.standard_normal(mu.shape, dtype=np.float32)
    counts = gaussian_filter(counts, blur, truncate=2.5)
    p = -np.log(np.maximum(counts, 0.5) / site.photons)
    y = np.clip(p / hi, 0, 1) ** site.gamma
    if site.sharpen > 0:
        y = y + site.sharpen * (y - _lowpass(y, 8))
    c = site.contrast
    y = 0.5 + 0.5 * np.tanh(c * (y - 0.45)) / math.tanh(c * 0.55)
    return np.clip(y + site.brightness, 0, 1)


def _border(s: int, crop: tuple[float, float]) -> np.ndarray:
    """The collimation border of a site's crop as bool (s, s)."""
    out = np.zeros((s, s), bool)
    cx, cy = int(round(crop[0] * s)), int(round(crop[1] * s))
    if cx:
        out[:, :cx] = out[:, s - cx:] = True
    if cy:
        out[:cy] = out[s - cy:] = True
    return out


def draw(rng_seed: int, covid: bool, *, size: int = 256, marker: bool = False, exposure_shift: float = 0.0,
         lesion_scale: float = 1.0, text: bool = False, site: int = 0, position: str = "PA", devices: bool = False,
         anatomy: str = "auto") -> Phantom:
    """Draw one phantom radiograph (patient's left on the image's right, as on a PA film).

    The structures' attenuations (soft tissue, lungs, heart, mediastinum, spine, ribs, clavicles, scapulae,
    vessels, breast shadows, findings, lead markers and devices) are summed along the beam and formed into an
    image through I = I0 exp(-mu) with quantum noise, a detector blur and a display curve. Each shortcut
    family draws from its own random stream: switching one on or off changes only its own pixels (site and
    position change the whole film, as they do in a hospital).

    Args:
        rng_seed: the image's seed (see `image_seed`).
        covid: draw COVID-like findings.
        size: side in pixels.
        marker: a lead laterality marker ("L" on the image's right, or "R" on its left).
        exposure_shift: added to the displayed image.
        lesion_scale: multiplies the findings' attenuation.
        text: a burned-in text label.
        site: the hospital (0 or 1; see `site_params`).
        position: "PA" or "AP" (AP: scapulae over the lungs, a magnified heart, higher clavicles).
        devices: ECG electrodes with leads and a central line.
        anatomy: "real" (torchxrayvision's lung outlines and opacity boxes), "drawn" (parametric), or "auto".
    """
    from saliencylab.data import anatomy as real_anatomy
    from saliencylab.data import shortcuts

    if position not in ("PA", "AP"):
        raise UserError(f"position '{position}': use PA or AP")
    real = real_anatomy.load() if anatomy in ("auto", "real") else None
    if anatomy == "real" and real is None:
        raise UserError("anatomy 'real' needs the [anatomy] extra: pip install 'saliencylab[anatomy]'")
    rng = _stream(rng_seed, "anatomy")
    s = size
    ap = position == "AP"
    left, right, source = _real_lungs(rng, s, real) if real is not None else _drawn_lungs(rng, s)
    lungs = left | right
    f = _frame(left, right)
    bank = _noise_bank(s)
    v, u = _grid(s)

    # smooth structures at half resolution, upsampled once (the detector blur hides the difference)
    s2 = max(16, s // 2)
    body, body_half = _body(rng, f, s2)
    heart, mediastinum = _heart(rng, f, s2, ap)
    v2, _ = _grid(s2)
    base2 = np.interp((np.arange(s2) + 0.5) / s2, (np.arange(s) + 0.5) / s, np.nan_to_num(f.base, nan=f.bottom))
    below = (v2 > base2[None, :]).astype(np.float32)  # under the hemidiaphragms: liver, stomach, heart base
    gas = np.zeros((s2, s2), np.float32)
    if rng.random() < 0.6:  # the stomach's gas bubble under the left hemidiaphragm
        _, u2 = _grid(s2)
        gx, gy = f.mid + f.half * rng.uniform(0.35, 0.6), f.bottom + rng.uniform(0.0, 0.03)
        gas = np.sqrt(np.clip(1 - ((u2 - gx) / 0.06) ** 2 - ((v2 - gy) / 0.03) ** 2, 0, 1)) * below
    bones = (0.6 * _spine(rng, f, s2) + 0.3 * _ribs(rng, f, s2, body_half, ap) + 0.4 * _clavicles(rng, f, s2, ap)
             + 0.8 * _scapulae(rng, f, s2, ap))
    low = (3.0 * body + 0.35 * below * (body > 0) + 1.35 * heart * (1 - below) + 0.7 * mediastinum * (body > 0)
           - 1.0 * gas
           + bones + 0.35 * _soft_shadows(rng, f, s2))
    mu = _upsample(low.astype(np.float32), s)

    # the lungs at full resolution: air that thins towards the edges, parenchymal texture, vessels
    depth = lungs * (0.15 + 0.85 * np.clip(_lowpass(lungs.astype(np.float32), 8) * 1.4, 0, 1))
    mu -= 1.3 * depth * (1 + 0.05 * _crop(rng, bank, s, s, 1))
    vessels = _vessels(rng, f, s)
    hy = f.top + 0.42 * (f.bottom - f.top)
    hilum = np.exp(-(((u - f.mid) / (f.half * 0.4)) ** 4) - ((v - hy) / 0.1) ** 2)
    vessels = vessels * np.clip(lungs + hilum, 0, 1)

    # findings: drawn from their own stream, so that a COVID film and its lesion-free twin share the anatomy
    les_rng = _stream(rng_seed, "lesions")
    lesion_mu, visibility, lesions, lesion_boxes = np.zeros((s, s), np.float32), 1.0, np.zeros((s, s), bool), []
    if covid:
        lung_box = real_anatomy.mean_lung_box(real) if real is not None else None
        for _ in range(6):  # a case whose boxes miss these lungs is replaced
            boxes = _lesion_boxes(les_rng, f, real, lung_box)
            lesion_mu, visibility, lesions, lesion_boxes = _lesions(les_rng, boxes, lungs, bank, lesion_scale)
            if lesion_boxes:
                break
    mu += 0.2 * vessels * visibility + lesion_mu
    mu = np.clip(mu, 0, None).astype(np.float32)
    hi = float(np.quantile(mu[::7, ::7], 0.995)) + 1e-3  # the window ignores markers and devices

    shortcut_mask = np.zeros((s, s), np.uint8)
    if devices:
        dev_mu, dev_mask = shortcuts.draw_devices(_stream(rng_seed, "devices"), f, s)
        mu += dev_mu
        shortcut_mask |= dev_mask.astype(np.uint8) * shortcuts.BITS["devices"]
    acq = _stream(rng_seed, "site")
    params = site_params(acq, site)
    box = None
    if marker:  # inside the collimated field
        mk_mu, box = shortcuts.draw_marker(_stream(rng_seed, "marker"), s, inset=params.crop)
        mu += mk_mu
        x0, y0, x1, y1 = box
        shortcut_mask[y0:y1, x0:x1] |= shortcuts.BITS["marker"]

    img = _display(acq, mu, params, blur=float(acq.uniform(0.5, 0.9)) * s / 256, hi=hi)
    border = _border(s, params.crop)
    if border.any():
        img[border] = 0.02
        shortcut_mask |= border.astype(np.uint8) * shortcuts.BITS["site"]
    img = np.clip(img + exposure_shift, 0, 1)
    text_box = None
    if text:
        img, text_box = shortcuts.draw_text(_stream(rng_seed, "text"), img, position)
        x0, y0, x1, y1 = text_box
        shortcut_mask[y0:y1, x0:x1] |= shortcuts.BITS["text"]
    return Phantom(img.astype(np.float32), lungs, lesions & lungs, box, rng_seed, text_box=text_box,
                   lesion_boxes=lesion_boxes, shortcut_mask=shortcut_mask, source=source)

def parse_rates(spec: str, what: str = "--marker-rate") -> dict[str, float]:
    """'COVID=0.9,Normal=0.1' -> {'COVID': 0.9, 'Normal': 0.1}; a single number applies to both."""
    try:
        value = float(spec)
        return dict.fromkeys(CLASSES, value)
    except ValueError:
        pass
    out = dict.fromkeys(CLASSES, 0.0)
    for part in spec.split(","):
        name, sep, val = part.partition("=")
        match = [c for c in CLASSES if c.lower() == name.strip().lower()]
        if not sep or not match:
            raise UserError(f"{what} '{spec}': write CLASS=VALUE,... with classes {', '.join(CLASSES)}")
        try:
            out[match[0]] = float(val)
        except ValueError:
            raise UserError(f"{what} '{spec}': '{val}' is not a number") from None
    return out


RATE_OPTIONS = {"marker_rate": "--marker-rate", "text_rate": "--text-rate", "site_rate": "--site-rate",
                "ap_rate": "--ap-rate", "device_rate": "--device-rate"}


def _jobs(config: PhantomConfig) -> Iterator[tuple[str, int]]:
    for cls in CLASSES:
        for i in range(1, config.count(cls) + 1):
            yield cls, i


def families_for(config: PhantomConfig, cls: str, seed: int) -> dict[str, Any]:
    """Which shortcut families an image carries: each from its own gate, independent of the anatomy and
    of the other families (the marker's gate is the one earlier versions used)."""
    gate = np.random.default_rng(seed ^ 0x5EED)
    out: dict[str, Any] = {"marker": bool(gate.random() < config.marker_rate.get(cls, 0.0))}
    for k, (name, rates) in enumerate((("text", config.text_rate), ("site", config.site_rate),
                                       ("position", config.ap_rate), ("devices", config.device_rate))):
        hit = bool(np.random.default_rng([seed, 0x5EED, k]).random() < rates.get(cls, 0.0))
        out[name] = int(hit) if name == "site" else ("AP" if hit else "PA") if name == "position" else hit
    return out


def _box(box: tuple[int, int, int, int] | None) -> str:
    return "" if box is None else " ".join(map(str, box))


def _write_one(args: tuple[str, int, PhantomConfig, str, str]) -> dict[str, Any]:
    from PIL import Image

    cls, i, config, root, anatomy = args
    seed = image_seed(config.seed, cls, i)
    fam = families_for(config, cls, seed)
    ph = draw(seed, cls == "COVID", size=config.size, exposure_shift=config.exposure_shift.get(cls, 0.0),
              lesion_scale=config.lesion_scale, anatomy=anatomy, **fam)
    name = f"{cls}-{i}.png"
    base = Path(root) / cls
    shortcut = ph.shortcut_mask if ph.shortcut_mask is not None else np.zeros_like(ph.lungs, np.uint8)
    for sub, arr in (("images", (ph.image * 255 + 0.5).astype(np.uint8)),
                     ("masks", ph.lungs.astype(np.uint8) * 255), ("lesions", ph.lesions.astype(np.uint8) * 255),
                     ("shortcuts", shortcut)):
        tmp = base / sub / f".{name}.tmp"
        Image.fromarray(arr).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, base / sub / name)
    return {"file": f"{cls}/images/{name}", "class": cls, "lesion_area": round(float(ph.lesions.mean()), 6),
            "lung_area": round(float(ph.lungs.mean()), 6), "marker": int(ph.marker_box is not None),
            "marker_box": _box(ph.marker_box), "seed": seed,
            "lesion_boxes": ";".join(_box(b) for b in ph.lesion_boxes), "text": int(fam["text"]),
            "text_box": _box(ph.text_box), "site": fam["site"], "position": fam["position"],
            "devices": int(fam["devices"]), "lung_source": ph.source}


HEADER = ["file", "class", "lesion_area", "lung_area", "marker", "marker_box", "seed", "lesion_boxes", "text",
          "text_box", "site", "position", "devices", "lung_source"]


def generate(config: PhantomConfig, out: str | Path, *, progress: bool | None = None) -> dict[str, Any]:
    """Write a phantom dataset under `out`; return a summary with the images-per-second rate.

    Images already present and listed in a finished `metadata.csv` with the same config are kept
    (re-running is cheap); `metadata.csv` is written last, atomically, so a half-finished run is redone.
    """
    import json
    from multiprocessing import get_context

    from tqdm import tqdm

    from saliencylab.fsutil import write_json, write_text

    out = Path(out)
    if config.size < 32:
        raise UserError(f"--size {config.size}: phantoms need at least 32 pixels")
    if config.n_covid < 0 or config.n_normal < 0 or config.n_covid + config.n_normal == 0:
        raise UserError("--n-covid and --n-normal must be >= 0 and not both 0")
    for key, option in RATE_OPTIONS.items():
        for cls, rate in getattr(config, key).items():
            if not 0 <= rate <= 1:
                raise UserError(f"{option} {cls}={rate}: a rate is between 0 and 1")
    anatomy = resolve_anatomy(config.anatomy)
    settings = json.dumps(asdict(config) | {"workers": None, "anatomy": anatomy}, sort_keys=True)
    done_file = out / "phantoms.json"
    if (out / "metadata.csv").is_file() and done_file.is_file():
        if json.loads(done_file.read_text()).get("settings") == settings:
            return json.loads(done_file.read_text()) | {"reused": True}
    for cls in CLASSES:
        for sub in ("images", "masks", "lesions", "shortcuts"):
            (out / cls / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(cls, i, config, str(out), anatomy) for cls, i in _jobs(config)]
    workers = config.workers or os.cpu_count() or 1
    _warm(config.size, anatomy)  # load the real outlines and noise once, before the workers fork
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    disable = None if progress is None else not progress
    try:
        with tqdm(total=len(jobs), unit="img", desc="phantoms", disable=disable) as bar:
            if workers == 1:
                for job in jobs:
                    rows.append(_write_one(job))
                    bar.update()
            else:
                from saliencylab.runtime import worker_init

                with get_context("fork").Pool(workers, initializer=worker_init) as pool:
                    for row in pool.imap(_write_one, jobs, chunksize=16):
                        rows.append(row)
                        bar.update()
    except BaseException:  # Ctrl-C or an error: the pool is stopped; drop the image a worker was writing
        _remove_partial(out)
        raise
    seconds = time.perf_counter() - start
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HEADER, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "metadata.csv", buf.getvalue())
    summary = {"settings": settings, "images": len(rows), "seconds": round(seconds, 2),
               "images_per_second": round(len(rows) / max(seconds, 1e-9), 1), "workers": workers,
               "anatomy": anatomy}
    write_json(done_file, summary)
    return summary


def _remove_partial(out: Path) -> None:
    """Delete the `.<name>.tmp` files that workers stopped mid-write left (finished images are renamed)."""
    for cls in CLASSES:
        for sub in ("images", "masks", "lesions", "shortcuts"):
            for tmp in (out / cls / sub).glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def _warm(size: int, anatomy: str) -> None:
    from saliencylab.data import anatomy as real_anatomy

    _noise_bank(size)
    _grid(size)
    if anatomy == "real":
        real_anatomy.load()
