"""Synthetic chest X-ray phantoms with ground truth: lung masks, lesion masks and a controllable shortcut.

Real radiographs cannot be downloaded here, so the embedded dataset is drawn: frontal chest radiograph
look-alikes (body outline, soft tissue, two lung fields of varied shape, ribs, clavicles, spine and
mediastinum, heart shadow, diaphragm domes), with exposure, contrast, rotation, shift and detector noise.
The COVID-like class adds ground-glass opacities and consolidations inside the lungs, mostly bilateral,
peripheral and in the lower zones (the pattern of Wong et al. 2020, https://doi.org/10.1148/radiol.2020201160).
A laterality marker (an "L" glyph in a corner) appears at a rate set per class, so that a shortcut
like the one the article saw can be switched on, measured and switched off.

Everything is written in the COVID-19 Radiography Database's layout: `<class>/images/<class>-<n>.png`,
`<class>/masks/...` (lungs), plus `<class>/lesions/...` and a `metadata.csv`.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from saliencylab.errors import UserError

CLASSES = ("COVID", "Normal")


@dataclass(frozen=True)
class PhantomConfig:
    """How a phantom dataset is drawn; written to `phantoms.json` beside the images.

    Attributes:
        n_covid, n_normal: images per class (the article's database: 3,616 and 10,192).
        size: side of the square PNGs.
        seed: every image's own seed derives from it, so a dataset is the same on every machine.
        marker_rate: probability of the "L" marker per class; equal rates mean no shortcut.
        exposure_shift: added to the mean brightness per class (a second, optional shortcut).
        lesion_scale: multiplies lesion opacity; 1.0 is calibrated so the small CNN errs now and then.
        workers: processes (0: all cores).
    """

    n_covid: int = 3616
    n_normal: int = 10192
    size: int = 256
    seed: int = 0
    marker_rate: dict[str, float] = field(default_factory=lambda: {"COVID": 0.5, "Normal": 0.5})
    exposure_shift: dict[str, float] = field(default_factory=lambda: {"COVID": 0.0, "Normal": 0.0})
    lesion_scale: float = 1.0
    workers: int = 0

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


def image_seed(seed: int, cls: str, index: int) -> int:
    """A stable per-image seed (independent of worker count and order)."""
    return (seed * 1_000_003 + (0 if cls == "COVID" else 500_000_000) + index) % (2**32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Band-limited noise in [-1, 1]: white noise blurred at `scale` pixels, rescaled."""
    from scipy.ndimage import gaussian_filter

    n = gaussian_filter(rng.standard_normal(shape), scale, mode="wrap")
    return n / (np.abs(n).max() + 1e-8)


def draw(rng_seed: int, covid: bool, *, size: int = 256, marker: bool = False, exposure_shift: float = 0.0,
         lesion_scale: float = 1.0) -> Phantom:
    """Draw one phantom. Geometry is in units of the image side (v down, u right; the patient's left
    lung is on the image's right, as on a PA film)."""
    from scipy.ndimage import affine_transform, gaussian_filter

    rng = np.random.default_rng(rng_seed)
    s = size
    v, u = np.mgrid[0:s, 0:s].astype(np.float32) / s

    # body: a torso ellipse that widens to the shoulders, soft tissue brighter towards the edges
    body_w = rng.uniform(0.40, 0.47)
    shoulder = np.clip((0.22 - v) / 0.22, 0, 1)
    half_w = body_w * (1 - 0.25 * shoulder**2) + 0.02 * np.sin(v * 7 + rng.uniform(0, 6))
    body = np.abs(u - 0.5) < half_w
    tissue = 0.42 + 0.10 * (np.abs(u - 0.5) / body_w) ** 2
    img = np.where(body, tissue, 0.04).astype(np.float32)

    # lungs: rounded fields with an apex, a flat medial border and a dome-shaped base with sharp
    # costophrenic angles
    lungs = np.zeros((s, s), bool)
    dome = np.zeros((s, s), np.float32)
    for side in (-1, 1):  # -1: image left (patient's right)
        cx = 0.5 + side * rng.uniform(0.17, 0.21)
        a, b = rng.uniform(0.14, 0.18), rng.uniform(0.33, 0.38)
        cy = rng.uniform(0.12, 0.16) + b
        ellipse = ((u - cx) / a) ** 2 + ((v - cy) / b) ** 2 < 1
        medial = (u - 0.5) * side > rng.uniform(0.045, 0.065) + 0.03 * np.clip(v - 0.45, 0, 1)
        lateral_dist = (u - cx) * side / a
        base = rng.uniform(0.70, 0.76) - (0.025 if side == 1 else 0.0)
        dome_v = base - 0.05 * np.cos(np.clip(lateral_dist, -1.6, 1.6) * 1.1) + 0.06 * np.clip(lateral_dist, 0, 1)
        inside = ellipse & medial & (v < dome_v)
        lungs |= inside
        dome = np.maximum(dome, (v > dome_v) * np.exp(-((u - cx) / 0.25) ** 2))

    # heart: a soft, slightly tilted ellipse to the patient's left, over the medial left lung
    hx, hy = 0.5 + rng.uniform(0.04, 0.07), rng.uniform(0.58, 0.64)
    hw, hh = rng.uniform(0.14, 0.18), rng.uniform(0.11, 0.14)
    tilt = rng.uniform(0.2, 0.5)
    du, dv = u - hx, v - hy
    along, across = du * math.cos(tilt) + dv * math.sin(tilt), dv * math.cos(tilt) - du * math.sin(tilt)
    heart = (along / hw) ** 2 + (across / hh) ** 2 < 1
    lungs &= ~heart

    air = 0.30 + 0.05 * _smooth_noise(rng, (s, s), s / 24)
    img = np.where(lungs, img - air * (0.8 + 0.3 * v), img)

    # lung vessels: faint branching texture, denser near the hila
    vessels = np.clip(_smooth_noise(rng, (s, s), s / 90), 0, None) * np.exp(-((np.abs(u - 0.5) - 0.1) / 0.2) ** 2)
    img += lungs * 0.10 * vessels

    # ribs: posterior arcs that leave the spine, rise a little and fall laterally; clavicles on top
    ribs = np.zeros((s, s), np.float32)
    spacing = rng.uniform(0.058, 0.068)
    d = np.abs(u - 0.5)
    for k in range(10):
        v0 = rng.uniform(0.15, 0.17) + k * spacing
        curve = v0 + 0.9 * (d - 0.12) ** 2 - 0.013 + 0.04 * d
        thick = 0.010 + 0.004 * k / 10
        ribs += np.exp(-(((v - curve) / thick) ** 2)) * (d > 0.035) * (d < half_w * 0.97)
    for side in (-1, 1):
        cv = rng.uniform(0.12, 0.15) - 0.12 * (d - 0.05) * rng.uniform(0.3, 0.7)
        ribs += 1.5 * np.exp(-(((v - cv) / 0.011) ** 2)) * ((u - 0.5) * side > 0.03) * (d < 0.30)
    img += 0.09 * np.clip(ribs, 0, 1.5) * body

    # spine and mediastinum: a bright central band with vertebral bodies
    spine = np.exp(-(((u - 0.5) / 0.035) ** 2)) * (v > 0.05)
    vertebrae = 0.5 + 0.5 * np.cos(2 * np.pi * v / rng.uniform(0.045, 0.055))
    mediastinum = np.exp(-(((u - 0.5) / 0.07) ** 2)) * (v > 0.1) * (v < 0.7)
    img += 0.18 * spine * (0.7 + 0.3 * vertebrae) + 0.08 * mediastinum
    img += 0.07 * heart * body + 0.10 * dome * body  # heart shadow, diaphragm and abdomen

    # lesions: ground-glass opacities and consolidations, peripheral and basal, inside the lungs
    lesion_field = np.zeros((s, s), np.float32)
    if covid:
        n = rng.integers(2, 7)
        sides = rng.choice([-1, 1], size=n) if rng.random() < 0.2 else np.resize([-1, 1], n)
        for side in sides:
            ys, xs = np.nonzero(lungs & ((u - 0.5) * side > 0))
            if len(ys) == 0:
                continue
            # favour the periphery and the lower zone
            weight = ((np.abs(u[ys, xs] - 0.5) - 0.05) ** 2) * (0.3 + v[ys, xs]) ** 3
            i = rng.choice(len(ys), p=weight / weight.sum())
            cy, cx = v[ys[i], xs[i]], u[ys[i], xs[i]]
            r = rng.uniform(0.035, 0.085)
            blob = np.exp(-(((u - cx) ** 2 + ((v - cy) * rng.uniform(0.7, 1.3)) ** 2) / (2 * r**2)))
            texture = 0.75 + 0.25 * _smooth_noise(rng, (s, s), s / 70)
            consolidation = rng.random() < 0.3
            amp = rng.uniform(0.10, 0.20) if consolidation else rng.uniform(0.05, 0.12)
            lesion_field += amp * lesion_scale * blob * texture
        lesion_field *= lungs
    lesions = lesion_field > 0.02 * max(lesion_scale, 1e-3)
    img += lesion_field

    # small rotation and shift (masks move with the image, nearest neighbour)
    angle = math.radians(rng.uniform(-5, 5))
    shift = rng.uniform(-0.04, 0.04, size=2) * s
    c, sn = math.cos(angle), math.sin(angle)
    mat = np.array([[c, -sn], [sn, c]])
    centre = np.array([s / 2, s / 2])
    offset = centre - mat @ centre - shift
    img = affine_transform(img, mat, offset=offset, order=1, mode="nearest")
    lungs = affine_transform(lungs.astype(np.uint8), mat, offset=offset, order=0, mode="constant") > 0
    lesions = affine_transform(lesions.astype(np.uint8), mat, offset=offset, order=0, mode="constant") > 0

    # exposure, contrast, blur and detector noise
    gain, gamma = rng.uniform(0.85, 1.15), rng.uniform(0.8, 1.25)
    img = gain * np.clip(img, 0, 1) ** gamma + exposure_shift
    img = gaussian_filter(img, rng.uniform(0.5, 1.0))
    img += rng.normal(0, rng.uniform(0.008, 0.02), img.shape)

    box = None
    if marker:
        img, box = _draw_marker(img, rng)
    return Phantom(np.clip(img, 0, 1).astype(np.float32), lungs, lesions & lungs, box, rng_seed)


def _draw_marker(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A bright "L" in an upper corner, as radiographers place lead markers."""
    s = img.shape[0]
    h = max(6, int(s * rng.uniform(0.07, 0.09)))
    w = max(4, int(h * 0.65))
    t = max(2, h // 5)
    margin = int(s * rng.uniform(0.03, 0.06))
    x0 = s - margin - w if rng.random() < 0.7 else margin  # mostly the patient's left (image right)
    y0 = margin + int(s * rng.uniform(0.0, 0.05))
    out = img.copy()
    level = rng.uniform(0.85, 1.0)
    out[y0:y0 + h, x0:x0 + t] = level  # the stem
    out[y0 + h - t:y0 + h, x0:x0 + w] = level  # the foot
    return out, (x0, y0, x0 + w, y0 + h)


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


def _jobs(config: PhantomConfig) -> Iterator[tuple[str, int]]:
    for cls in CLASSES:
        for i in range(1, config.count(cls) + 1):
            yield cls, i


def _write_one(args: tuple[str, int, PhantomConfig, str]) -> dict[str, Any]:
    from PIL import Image

    cls, i, config, root = args
    seed = image_seed(config.seed, cls, i)
    gate = np.random.default_rng(seed ^ 0x5EED)  # the marker draw is independent of the anatomy
    has_marker = bool(gate.random() < config.marker_rate.get(cls, 0.0))
    ph = draw(seed, cls == "COVID", size=config.size, marker=has_marker,
              exposure_shift=config.exposure_shift.get(cls, 0.0), lesion_scale=config.lesion_scale)
    name = f"{cls}-{i}.png"
    base = Path(root) / cls
    for sub, arr in (("images", (ph.image * 255 + 0.5).astype(np.uint8)),
                     ("masks", ph.lungs.astype(np.uint8) * 255), ("lesions", ph.lesions.astype(np.uint8) * 255)):
        tmp = base / sub / f".{name}.tmp"
        Image.fromarray(arr).save(tmp, format="PNG")
        os.replace(tmp, base / sub / name)
    box = ph.marker_box
    return {"file": f"{cls}/images/{name}", "class": cls, "lesion_area": round(float(ph.lesions.mean()), 6),
            "lung_area": round(float(ph.lungs.mean()), 6), "marker": int(box is not None),
            "marker_box": "" if box is None else " ".join(map(str, box)), "seed": seed}


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
    for cls, rate in config.marker_rate.items():
        if not 0 <= rate <= 1:
            raise UserError(f"--marker-rate {cls}={rate}: a rate is between 0 and 1")
    settings = json.dumps(asdict(config) | {"workers": None}, sort_keys=True)
    done_file = out / "phantoms.json"
    if (out / "metadata.csv").is_file() and done_file.is_file():
        if json.loads(done_file.read_text()).get("settings") == settings:
            return json.loads(done_file.read_text()) | {"reused": True}
    for cls in CLASSES:
        for sub in ("images", "masks", "lesions"):
            (out / cls / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(cls, i, config, str(out)) for cls, i in _jobs(config)]
    workers = config.workers or os.cpu_count() or 1
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    disable = None if progress is None else not progress
    with tqdm(total=len(jobs), unit="img", desc="phantoms", disable=disable) as bar:
        if workers == 1:
            for job in jobs:
                rows.append(_write_one(job))
                bar.update()
        else:
            with get_context("fork").Pool(workers) as pool:
                for row in pool.imap(_write_one, jobs, chunksize=16):
                    rows.append(row)
                    bar.update()
    seconds = time.perf_counter() - start
    header = ["file", "class", "lesion_area", "lung_area", "marker", "marker_box", "seed"]
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "metadata.csv", buf.getvalue())
    summary = {"settings": settings, "images": len(rows), "seconds": round(seconds, 2),
               "images_per_second": round(len(rows) / max(seconds, 1e-9), 1), "workers": workers}
    write_json(done_file, summary)
    return summary
