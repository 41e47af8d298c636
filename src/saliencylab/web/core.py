"""What the workbench computes, without any HTTP: decode an upload, classify, explain, render, score.

The functions here compose the library's public pieces the way `studies.photos.explain` does (load,
preprocess, resolve the target, run each registered method, resize the raw map onto the image, render),
so a result in the browser is the result the CLI gives for the same settings.
"""

from __future__ import annotations

import io
import math
import re
import tempfile
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saliencylab.data.images import DICOM_EXTENSIONS, MAX_PIXELS, LoadedImage, dicom_grayscale, load_image
from saliencylab.errors import UserError
from saliencylab.methods import MethodSpec, parse_methods, resolve_target
from saliencylab.metrics.localisation import border_mask, box_mask, mass_inside, pointing_game
from saliencylab.models import Classifier, load_model
from saliencylab.ops import resize
from saliencylab.render.maps import NORMALISE_MODES, colorize, opacity, overlay, to_uint8
from saliencylab.studies.photos import DisplaySettings, probabilities, top_k

# DICOM VOI windows (centre, width) in Hounsfield units, the usual chest CT presets
WINDOW_PRESETS: dict[str, tuple[float, float]] = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0),
                                                  "bone": (400.0, 1800.0)}
WINDOWS: tuple[str, ...] = ("file", *WINDOW_PRESETS)
DISPLAY_SIDE = 768  # the longest side of the images and overlays sent to the browser
SIGNS = ("abs", "positive", "signed")


MAX_COUNT_OPTION = 4096  # samples, steps, masks: a single request may not hold the model for hours


def parse_options(pairs: Sequence[str], specs: Sequence[MethodSpec]) -> dict[str, dict[str, Any]]:
    """['smoothgrad.n_samples=8', ...] -> {'smoothgrad': {'n_samples': 8}}, with the CLI's own checks and messages.

    Integer options are capped at MAX_COUNT_OPTION on the server.
    """
    from saliencylab.methods.registry import parse_method_options

    opts = parse_method_options(list(pairs), list(specs), None)
    for method, values in opts.items():
        for key, value in values.items():
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_COUNT_OPTION:
                raise UserError(f"--set {method}.{key}={value}: above this server's cap of {MAX_COUNT_OPTION}; "
                                "use the CLI for longer runs")
    return opts


@dataclass(frozen=True)
class ModelEntry:
    """A model the server offers: a registry name (or checkpoint) and its weights source.

    Attributes:
        name: as `load_model` takes it.
        weights: None for the model's default source, 'random', or a file.
        input_size: override the model's input side (tests use small inputs).
    """

    name: str
    weights: str | None = None
    input_size: int | None = None

    @property
    def label(self) -> str:
        return self.name if self.weights is None else f"{self.name}@{self.weights}"

    @classmethod
    def parse(cls, spec: str) -> ModelEntry:
        """'efficientnet_lite0', 'torchvision:resnet18@random' or 'runs/cxr/best.pt' -> entry."""
        name, sep, weights = spec.rpartition("@")
        return cls(name, weights) if sep and name and "/" not in weights else cls(spec)


class ModelCache:
    """Load each offered model once, on first use (or at start), and keep it."""

    def __init__(self, entries: Sequence[ModelEntry], device: str = "auto") -> None:
        if not entries:
            raise UserError("--model: offer at least one model")
        self.entries = {e.label: e for e in entries}
        self.device = device
        self._models: dict[str, Classifier] = {}
        self._lock = threading.Lock()

    @property
    def default(self) -> str:
        return next(iter(self.entries))

    def loaded(self) -> list[str]:
        return list(self._models)

    def add(self, entry: ModelEntry, clf: Classifier) -> None:
        """Offer an already loaded classifier under `entry.label` (tests share one across apps)."""
        with self._lock:
            self.entries[entry.label] = entry
            self._models[entry.label] = clf

    def get(self, label: str | None) -> Classifier:
        """The classifier offered under `label` (None: the first); a label not offered is a UserError."""
        label = label or self.default
        if label not in self.entries:
            raise UserError(f"unknown model '{label}'; this server offers {', '.join(self.entries)} "
                            "(start it with --model NAME to offer another)")
        with self._lock:
            if label not in self._models:
                e = self.entries[label]
                clf = load_model(e.name, weights=e.weights, device=self.device)
                if e.input_size:
                    clf = clf.replace(input_size=(e.input_size, e.input_size))
                self._models[label] = clf
            return self._models[label]


def _looks_like_dicom(data: bytes, filename: str) -> bool:
    return Path(filename).suffix.lower() in DICOM_EXTENSIONS or data[128:132] == b"DICM"


def _safe_filename(filename: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(filename or "upload").name).strip("._")
    return name[:100] or "upload"


def decode_upload(data: bytes, filename: str, *, window: str = "file", max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Decode uploaded bytes with the CLI's loader (formats, DICOM, decompression-bomb guard, messages).

    Args:
        window: for a grayscale DICOM, 'file' (its own VOI window) or a preset from `WINDOW_PRESETS`.

    Returns:
        The image; pixels float32 in [0, 1], (H, W) or (H, W, 3); `meta['dicom']` is True for DICOM.

    Raises:
        UserError: with the CLI's one-line message, naming the uploaded file (not a temporary path).
    """
    if window not in WINDOWS:
        raise UserError(f"window '{window}': use one of {', '.join(WINDOWS)}")
    name = _safe_filename(filename)
    if not data:
        raise UserError(f"'{name}' is empty (0 bytes); choose another file")
    with tempfile.TemporaryDirectory(prefix="saliencylab-upload-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            dicom = _looks_like_dicom(data, name)
            if dicom:
                _check_dicom_size(path, max_pixels)
            img = load_image(str(path), max_pixels=max_pixels)
            if dicom and window != "file":
                img = _rewindow(path, img, window)
        except UserError as err:
            raise UserError(str(err).replace(str(path), name)) from None
    img.source, img.name = name, Path(name).stem or "upload"
    img.meta["dicom"] = img.meta.get("format") == "DICOM"
    return img


def _check_dicom_size(path: Path, max_pixels: int) -> None:
    """The decompression-bomb guard for DICOM: refuse before decoding what declares too many pixels."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return  # load_image gives the message for an unreadable file
    pixels = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("NumberOfFrames", 1) or 1)
    if pixels > max_pixels:
        raise UserError(f"'{path}' declares {pixels:,} pixels, above the safety limit of {max_pixels:,} "
                        "(decompression-bomb guard); send a single, smaller image")


def _rewindow(path: Path, img: LoadedImage, window: str) -> LoadedImage:
    """Re-render a grayscale DICOM with a preset window, through the loader's own VOI transform."""
    import pydicom

    if img.pixels.ndim != 2:
        raise UserError(f"'{path}' is a colour DICOM; window presets apply to grayscale images (use window=file)")
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    arr = arr[0] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else arr
    center, width = WINDOW_PRESETS[window]
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, "LINEAR"
    pixels, how = dicom_grayscale(arr, ds)
    meta = {**img.meta, "window": f"{window} preset: {how}"}
    if str(ds.get("Modality", "")) != "CT":
        meta["window_note"] = "presets assume Hounsfield units (CT); this file is " + str(ds.get("Modality", "?"))
    return LoadedImage(source=img.source, name=img.name, pixels=np.ascontiguousarray(pixels, np.float32), meta=meta)


def decode_mask(data: bytes, filename: str, shape: tuple[int, int], what: str) -> np.ndarray:
    """A mask upload (white or opaque where True) -> bool (H, W), resized with nearest neighbour.

    Raises:
        UserError: unreadable, or empty (nothing marked).
    """
    from PIL import Image

    img = decode_upload(data, filename)
    px = img.pixels if img.pixels.ndim == 2 else img.pixels.mean(axis=2)
    mask = px > 0.5
    if mask.all():  # transparent PNGs are composited over white: read the alpha instead
        with Image.open(io.BytesIO(data)) as raw:
            if "A" in raw.getbands():
                mask = np.asarray(raw.getchannel("A")) > 127
    mask = np.asarray(Image.fromarray(mask).resize((shape[1], shape[0]), Image.NEAREST))
    if not mask.any():
        raise UserError(f"{what} '{_safe_filename(filename)}' marks nothing (no white or opaque pixel); "
                        "mark a region first")
    return mask


def display_size(size: tuple[int, int], side: int = DISPLAY_SIDE) -> tuple[int, int]:
    """(H, W) scaled so that the longer side is at most `side`."""
    h, w = size
    scale = min(1.0, side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize_image(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if a.shape[:2] == tuple(size):
        return a
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return (t[0] if a.ndim == 2 else t.permute(1, 2, 0)).clamp(0, 1).numpy()


def resize_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A raw map (h, w) -> (H, W), bilinear with half-pixel centres, as `explain` resizes onto the image."""
    return resize(torch.from_numpy(np.ascontiguousarray(m, np.float32))[None, None], size)[0, 0].numpy()


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W), (H, W, 3) or (H, W, 4) -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a, dtype=np.float32))
    return buf.getvalue()


def check_display(sign: str, normalise: str, smooth: float, alpha: float, cmap: str | None) -> DisplaySettings:
    """Display settings from request fields, checked with the CLI's messages."""
    if normalise not in ("auto", *NORMALISE_MODES):
        raise UserError(f"--normalise {normalise}: use auto or one of {', '.join(NORMALISE_MODES)}")
    if sign not in SIGNS:
        raise UserError(f"--sign {sign}: use abs, positive or signed")
    if not (math.isfinite(smooth) and 0.0 <= smooth <= 0.5):
        raise UserError(f"--smooth {smooth}: use a fraction of the image side between 0 and 0.5")
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise UserError(f"--alpha {alpha}: use a value between 0 and 1")
    if cmap:
        import matplotlib

        if cmap not in matplotlib.colormaps:
            raise UserError(f"--cmap {cmap}: not a matplotlib colormap (try jet, inferno, viridis, bwr)")
    return DisplaySettings(sign=sign, smooth=smooth, normalise=normalise, alpha=alpha, cmap=cmap or None)


@dataclass
class Result:
    """One explained image, kept in memory so that overlays can be redrawn and maps downloaded.

    Attributes:
        image: display pixels, uint8 (H, W) or (H, W, 3), longest side <= DISPLAY_SIDE (overlays draw on uint8).
        size: (H, W) of the decoded original.
        maps: raw maps at the model's input size, (h, w) float32, per method.
        masks: bool masks at the display size ('lungs', 'lesions', 'marker', 'student').
    """

    id: str
    model: str
    model_info: dict[str, Any]
    filename: str
    image: np.ndarray
    size: tuple[int, int]
    decoded: dict[str, Any]
    top: list[dict[str, Any]]
    target: dict[str, Any]
    maps: dict[str, np.ndarray]
    methods: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def display_map(self, method: str) -> np.ndarray:
        """The raw map resized to the display image, (H, W)."""
        return resize_map(self.maps[method], self.image.shape[:2])

    def full_map(self, method: str) -> np.ndarray:
        """The raw map resized onto the original image, as `explain` writes its .npy files."""
        return resize_map(self.maps[method], self.size)


def classify_image(clf: Classifier, img: LoadedImage, k: int = 5) -> list[dict[str, Any]]:
    """Top-k classes of one image (the CLI's `classify`)."""
    x = clf.preprocess(img.pixels)[None].to(clf.device)
    return top_k(clf, probabilities(clf, x), k)[0]


def explain_image(clf: Classifier, img: LoadedImage, specs: Sequence[MethodSpec],
                  options: dict[str, dict[str, Any]], target: str, *, model_label: str) -> Result:
    """Predictions, the resolved target and one raw map per method for one image.

    Raises:
        UserError: an unknown class name or index, or an option the method rejects.
    """
    x = clf.preprocess(img.pixels)[None].to(clf.device)  # (1, C, h, w)
    probs = probabilities(clf, x)
    top = top_k(clf, probs, 5)[0]
    tgt = resolve_target(clf.module, x, target, clf.class_names)
    maps: dict[str, np.ndarray] = {}
    methods: dict[str, dict[str, Any]] = {}
    for spec in specs:
        opts = options.get(spec.name, {})
        t0 = time.perf_counter()
        try:
            raw = spec.fn(clf.module, x, tgt, **opts)
        except (TypeError, ValueError) as err:  # an option value the method cannot use
            raise UserError(f"{spec.name}: {err}; see `saliencylab methods` for its options") from None
        if clf.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        maps[spec.name] = raw.detach().float().cpu()[0].numpy()
        methods[spec.name] = {"family": spec.family, "paper": spec.paper, "display": spec.display,
                              "seconds": round(seconds, 4), "options": {**_defaults(spec), **opts}}
    i = int(tgt[0])
    return Result(
        id=uuid.uuid4().hex[:16], model=model_label, model_info=clf.describe(), filename=img.source,
        image=to_uint8(resize_image(img.pixels, display_size(img.size)))[..., 0] if img.pixels.ndim == 2
        else to_uint8(resize_image(img.pixels, display_size(img.size))), size=img.size, decoded=jsonable(img.meta),
        top=top, target={"index": i, "class": clf.class_names[i], "probability": float(probs[0, i])},
        maps=maps, methods=methods, settings={"target": target, "methods": [s.name for s in specs]},
    )


def _defaults(spec: MethodSpec) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
            for k, v in spec.options().items()}


def jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in meta.items()}


def render_overlay(result: Result, method: str, display: DisplaySettings) -> bytes:
    """The method's map over the image, drawn as `explain` draws it (PNG, display size)."""
    shown = display.render(result.display_map(method), result.methods[method]["display"])
    return png_bytes(overlay(result.image, shown, alpha=display.alpha, cmap=display.cmap))


def render_heat(result: Result, method: str, display: DisplaySettings) -> bytes:
    """The coloured map with per-pixel alpha `render.opacity(map)` (RGBA PNG).

    Laid over the image with CSS opacity a, it gives image * (1 - a o) + colour * a o with o = opacity(m):
    exactly `render.overlay` with alpha a, so the page's opacity slider needs no server round trip.
    """
    shown = display.render(result.display_map(method), result.methods[method]["display"])
    rgba = np.dstack([colorize(shown, display.cmap), (opacity(shown) * 255 + 0.5).astype(np.uint8)])
    return png_bytes(rgba)


MASK_COLOURS = {"lungs": (64, 200, 255), "lesions": (255, 60, 60), "marker": (255, 210, 0), "student": (60, 255, 120)}


def render_mask(mask: np.ndarray, kind: str) -> bytes:
    """A mask as a translucent colour fill with an opaque outline (RGBA PNG)."""
    from scipy.ndimage import binary_erosion

    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[..., :3] = MASK_COLOURS.get(kind, (255, 255, 255))
    edge = mask & ~binary_erosion(mask, iterations=2)
    rgba[..., 3] = np.where(edge, 255, np.where(mask, 60, 0))
    return png_bytes(rgba)


def _verdict(mass: float, share: float) -> str:
    """'above chance (2.1x)': the report's reading of a share of saliency against its chance level."""
    from saliencylab.report.writer import reading

    text = reading(mass, share)
    return text.rpartition(": ")[2] if ": " in text else "not available"


def localisation(result: Result, method: str) -> dict[str, Any]:
    """Share of |map| inside each known mask, beside its chance level (the mask's area share).

    Returns:
        {region: {'mass', 'chance', 'ratio', 'reading'}} for lungs, lesions, marker, student and the image
        border (where markers and text sit), plus 'lung_pointing' when there is a lung mask.
    """
    m = result.display_map(method)
    masks = dict(result.masks)
    masks["border"] = border_mask(m.shape)
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, mask in masks.items():
            mass, chance = mass_inside(m, mask), float(mask.mean())
            out[name] = {"mass": _num(mass), "chance": round(chance, 6),
                         "ratio": _num(mass / chance) if chance > 0 and math.isfinite(mass) else None,
                         "reading": _verdict(mass, chance)}
        if "lungs" in masks:
            from saliencylab.report.writer import reading

            out["lungs"]["reading_long"] = reading(mass_inside(m, masks["lungs"]), float(masks["lungs"].mean()))
            out["lung_pointing"] = _num(pointing_game(m, masks["lungs"], tolerance=max(1, round(15 * max(m.shape)
                                                                                               / 224))))
    return out


def _num(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def marker_mask(shape: tuple[int, int], box: tuple[int, int, int, int], source_side: int) -> np.ndarray:
    """A phantom's marker box (x0, y0, x1, y1 at `source_side`) as a mask at `shape`, padded by one pixel."""
    h, w = shape
    sy, sx = h / source_side, w / source_side
    x0, y0, x1, y1 = box
    return box_mask(shape, (math.floor(x0 * sx), math.floor(y0 * sy), math.ceil(x1 * sx), math.ceil(y1 * sy)), pad=1)


def cli_command(result: Result, display: DisplaySettings) -> str:
    """The `saliencylab explain` command that reproduces the result from the CLI."""
    import shlex

    model, _, weights = result.model.partition("@") if "@" in result.model else (result.model, "", "")
    args = ["saliencylab", "explain", result.filename, "--model", model]
    if weights:
        args += ["--weights", weights]
    args += ["--methods", ",".join(result.settings["methods"]), "--target", str(result.settings["target"])]
    for pair in result.settings.get("set", []):
        args += ["--set", pair]
    args += ["--sign", display.sign, "--smooth", f"{display.smooth:g}", "--normalise", display.normalise,
             "--alpha", f"{display.alpha:g}"]
    if display.cmap:
        args += ["--cmap", display.cmap]
    return " ".join(shlex.quote(a) for a in args)


class ResultStore:
    """The last `capacity` results, least recently used dropped first; thread-safe."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Result] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, result: Result) -> None:
        with self._lock:
            self._items[result.id] = result
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, rid: str) -> Result | None:
        with self._lock:
            result = self._items.get(rid)
            if result is not None:
                self._items.move_to_end(rid)
            return result


def method_catalogue() -> list[dict[str, Any]]:
    """Every registered method with family, paper and option schema (name, default, type)."""
    from saliencylab.methods import METHODS

    out = []
    for spec in METHODS.values():
        opts = []
        for k, v in spec.options().items():
            kind = ("boolean" if isinstance(v, bool) else "integer" if isinstance(v, int) else "number"
                    if isinstance(v, float) else "string")
            opts.append({"name": k, "default": v if isinstance(v, (int, float, str, bool, type(None))) else repr(v),
                         "type": kind, "nullable": v is None})
        out.append({"name": spec.name, "family": spec.family, "paper": spec.paper, "display": spec.display,
                    "uses_model": spec.uses_model, "options": opts})
    return out


def check_methods(methods: str) -> list[MethodSpec]:
    """'gradcam,smoothgrad' -> specs, with the CLI's messages; at most every registered method once."""
    specs = parse_methods(methods)
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"--methods names {', '.join(dupes)} twice; name each method once")
    return specs


def image_png(result: Result) -> bytes:
    return png_bytes(to_uint8(result.image))
