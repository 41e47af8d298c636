"""Real anatomy for the phantoms: lung outlines and opacity boxes from the `torchxrayvision` wheel.

The optional extra `saliencylab[anatomy]` installs `torchxrayvision`, whose wheel ships (read here as data
files, without importing the package):
- `data/semantic_masks_v7labs_lungs.zip`: 517 lung segmentations drawn on real chest radiographs
  (V7 Labs' COVID-19 X-ray lung annotations); empty and partial ones are dropped, the rest become two
  polygons per film (the image's left lung, the patient's right, first), in units of the image side.
- `data/kaggle_stage_2_train_labels.csv.zip`: the RSNA Pneumonia Detection Challenge labels (opacity boxes
  on 1024 px films) and `data/BBox_List_2017.csv.gz`: the NIH ChestX-ray14 boxes (Infiltrate and
  Pneumonia kept), both in units of the image side.

Polygons and boxes are cached (a few hundred kB) under `$SALIENCYLAB_CACHE` or `~/.cache/saliencylab`,
because decoding the masks takes seconds; nothing is copied into the repository.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

MASKS = "semantic_masks_v7labs_lungs.zip"
RSNA = "kaggle_stage_2_train_labels.csv.zip"
NIH = "BBox_List_2017.csv.gz"
NIH_FINDINGS = ("Infiltrate", "Pneumonia")
CACHE_VERSION = 1
WORK = 256  # masks are resampled to this square grid before their outlines are traced


@dataclass(frozen=True)
class RealAnatomy:
    """The real shapes the phantoms are drawn from (coordinates in units of the image side, x right, y down).

    Attributes:
        polygons: per film, (image-left lung, image-right lung), each an (n, 2) float32 array of (x, y).
        names: the source file of each film.
        stats: per film (area fraction, width/height, left/right area ratio) measured on the pixel masks
            resampled to WORK x WORK (see `lung_stats`).
        boxes: (m, 4) opacity boxes (x0, y0, x1, y1), RSNA and NIH pooled.
        cases: (k + 1,) offsets: the boxes of case j (one film) are boxes[cases[j]:cases[j + 1]].
    """

    polygons: tuple[tuple[np.ndarray, np.ndarray], ...]
    names: tuple[str, ...]
    stats: np.ndarray
    boxes: np.ndarray
    cases: np.ndarray


def data_dir() -> Path | None:
    """torchxrayvision's `data` folder, found without importing the package; None when not installed."""
    import importlib.util

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return folder if all((folder / f).is_file() for f in (MASKS, RSNA, NIH)) else None


def available() -> bool:
    """True when the `[anatomy]` extra's data files are installed."""
    return data_dir() is not None


def lung_stats(left: np.ndarray, right: np.ndarray) -> tuple[float, float, float]:
    """(area fraction, width/height of both lungs' bounding box, patient-left/patient-right area ratio).

    Args:
        left: bool (H, W), the lung on the image's left (the patient's right).
        right: bool (H, W), the lung on the image's right (the patient's left).
    """
    both = left | right
    rows, cols = np.nonzero(both.any(1))[0], np.nonzero(both.any(0))[0]
    if len(rows) == 0:
        return float("nan"), float("nan"), float("nan")
    wh = (cols[-1] - cols[0] + 1) / (rows[-1] - rows[0] + 1)
    return float(both.mean()), float(wh), float(right.sum() / max(1, left.sum()))


def split_lungs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The two largest components of a lung mask as (image-left, image-right) lungs, or None when the mask
    is empty or partial (fewer than two sizeable lungs side by side, or one lung less than 40% of the other)."""
    from scipy import ndimage

    lab, k = ndimage.label(mask)
    if k < 2:
        return None
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(sizes)[::-1][:2]
    a, b = (lab == order[0] + 1), (lab == order[1] + 1)
    if sizes[order[1]] < 0.4 * sizes[order[0]] or sizes[order[1]] < 0.03 * mask.size:
        return None
    ca, cb = np.nonzero(a)[1].mean(), np.nonzero(b)[1].mean()
    left, right = (a, b) if ca < cb else (b, a)
    # side by side: the left lung's centre is left of the right lung's leftmost column, and neither touches
    # the image's sides (cut-off films)
    if np.nonzero(left)[1].mean() > np.nonzero(right)[1].min() or left[:, 0].any() or right[:, -1].any():
        return None
    if (left | right)[-1].mean() > 0.02 or (left | right)[0].any():
        return None
    return left, right


def _outline(lung: np.ndarray) -> np.ndarray:
    """The outer contour of a bool mask as (n, 2) float32 (x, y) in units of the side, about one point per
    two pixels."""
    from skimage.measure import find_contours

    padded = np.pad(lung, 1).astype(np.float32)
    contours = find_contours(padded, 0.5)
    c = max(contours, key=len)[::2] - 1.0  # (row, col)
    return (c[:, ::-1] + 0.5).astype(np.float32) / lung.shape[0]


def _read_masks(folder: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str], list[tuple]]:
    from PIL import Image

    polys, names, stats = [], [], []
    with zipfile.ZipFile(folder / MASKS) as z:
        for name in sorted(z.namelist()):
            if name.endswith("/"):
                continue
            im = Image.open(io.BytesIO(z.read(name)))
            im.draft("L", (WORK, WORK))
            mask = np.asarray(im.convert("L").resize((WORK, WORK), Image.BILINEAR)) > 127
            pair = split_lungs(mask)
            if pair is None:
                continue
            polys.append((_outline(pair[0]), _outline(pair[1])))
            names.append(name.rsplit("/", 1)[-1])
            stats.append(lung_stats(*pair))
    return polys, names, stats


def _read_boxes(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Opacity boxes per case, normalised by the films' 1024 px side."""
    cases: dict[str, list[list[float]]] = {}
    with zipfile.ZipFile(folder / RSNA) as z:
        name = next(n for n in z.namelist() if n.endswith(".csv"))
        for r in csv.DictReader(io.TextIOWrapper(z.open(name), "utf-8")):
            if r["Target"] == "1":
                x, y, w, h = (float(r[k]) for k in ("x", "y", "width", "height"))
                cases.setdefault("rsna:" + r["patientId"], []).append([x, y, x + w, y + h])
    with gzip.open(folder / NIH, "rt") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            if len(row) >= 6 and row[1] in NIH_FINDINGS:
                x, y, w, h = map(float, row[2:6])
                cases.setdefault("nih:" + row[0] + row[1], []).append([x, y, x + w, y + h])
    boxes, offsets = [], [0]
    for key in sorted(cases):
        boxes += cases[key]
        offsets.append(len(boxes))
    return np.clip(np.array(boxes, np.float32) / 1024.0, 0, 1), np.array(offsets, np.int64)


def _cache_path(folder: Path) -> Path:
    st = (folder / MASKS).stat()
    key = hashlib.sha1(f"{CACHE_VERSION}:{st.st_size}:{int(st.st_mtime)}:{WORK}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("SALIENCYLAB_CACHE") or Path.home() / ".cache" / "saliencylab")
    return root / f"real_anatomy_{key}.npz"


@lru_cache(maxsize=1)
def load() -> RealAnatomy | None:
    """The real lung outlines and opacity boxes, or None without the `[anatomy]` extra."""
    folder = data_dir()
    if folder is None:
        return None
    path = _cache_path(folder)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                n = len(z["names"])
                polys = tuple((z[f"l{i}"], z[f"r{i}"]) for i in range(n))
                return RealAnatomy(polys, tuple(str(s) for s in z["names"]), z["stats"], z["boxes"], z["cases"])
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache is rebuilt
    polys, names, stats = _read_masks(folder)
    boxes, cases = _read_boxes(folder)
    anatomy = RealAnatomy(tuple(polys), tuple(names), np.array(stats, np.float64), boxes, cases)
    arrays = {f"l{i}": p[0] for i, p in enumerate(polys)} | {f"r{i}": p[1] for i, p in enumerate(polys)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, names=np.array(names), stats=anatomy.stats, boxes=boxes, cases=cases, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs time
    return anatomy


def mean_lung_box(anatomy: RealAnatomy) -> np.ndarray:
    """The real films' mean bounding box of both lungs (x0, y0, x1, y1), in units of the side."""
    return _mean_lung_box(id(anatomy), anatomy)


_BOXES: dict[int, np.ndarray] = {}


def _mean_lung_box(key: int, anatomy: RealAnatomy) -> np.ndarray:
    if key not in _BOXES:
        boxes = [np.r_[np.minimum(a.min(0), b.min(0)), np.maximum(a.max(0), b.max(0))] for a, b in anatomy.polygons]
        _BOXES[key] = np.mean(boxes, axis=0)
    return _BOXES[key]
