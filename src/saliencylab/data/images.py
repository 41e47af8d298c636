"""Read photos and radiographs into float arrays, with a clear one-line error for every bad file.

Every loader returns pixels as float32 in [0, 1], shaped (H, W) for grayscale or (H, W, 3) for colour;
16-bit data keeps its precision (no 8-bit round trip) until the overlay is drawn.
"""

from __future__ import annotations

import glob
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from saliencylab.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DICOM_EXTENSIONS = (".dcm", ".dicom")
DEFAULT_SAMPLES = ("chelsea", "coffee", "rocket", "motorcycle_left")
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit (about 0.25 GB of 24-bit RGB)
_FORMATS_HINT = "supported: PNG, JPEG, BMP, TIFF, WebP and DICOM"
_FRAME = re.compile(r"^(?P<path>.+)#frame=(?P<k>\d+)$")
Frame = int | str | None
"""Which frames of a multi-frame DICOM to read: a 1-based frame number, 'all', or None (the first, with a note)."""


@dataclass
class LoadedImage:
    """One decoded image.

    Attributes:
        source: what the user named (a path or `sample:<name>`).
        name: a short name for output files (the file stem).
        pixels: float32 in [0, 1], (H, W) grayscale or (H, W, 3) RGB.
        meta: how it was decoded (format, mode, bit depth, DICOM window...).
    """

    source: str
    name: str
    pixels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


def _sample_dir() -> Path:
    import skimage

    return Path(skimage.data_dir)


def sample_names() -> list[str]:
    """Names accepted after `sample:`: the photos that scikit-image bundles in its wheel."""
    return sorted(p.stem for p in _sample_dir().iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _sample_path(name: str) -> Path:
    for p in _sample_dir().iterdir():
        if p.stem == name and p.suffix.lower() in IMAGE_EXTENSIONS:
            return p
    import difflib

    close = difflib.get_close_matches(name, sample_names(), n=3)
    hint = f" Did you mean {', '.join('sample:' + c for c in close)}?" if close else ""
    raise UserError(f"unknown sample 'sample:{name}'.{hint} Available: {', '.join(sample_names())}")


def parse_frame(value: str | None, flag: str = "--frame") -> Frame:
    """'3' -> 3, 'all' -> 'all', None -> None; anything else is a UserError naming the flag."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text == "all":
        return "all"
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise UserError(f"{flag} {value}: give a frame number (1 is the first frame) or 'all'")


def split_frame(source: str) -> tuple[str, int | None]:
    """'scan.dcm#frame=3' -> ('scan.dcm', 3); a source without the suffix -> (source, None)."""
    m = _FRAME.match(source)
    if m is None or os.path.exists(source):
        return source, None
    return m["path"], int(m["k"])


def _is_dicom(path: str) -> bool:
    p = Path(path)
    if p.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        return p.is_file() and p.stat().st_size >= 132 and _looks_like_dicom(p)
    except OSError:
        return False


def dicom_frames(path: str) -> int:
    """Number of frames a DICOM file declares (1 when it says nothing or cannot be read: loading reports why)."""
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except Exception:
        return 1


def with_frames(sources: Iterable[str], frame: Frame) -> list[str]:
    """Point every DICOM source at its frames: frame N -> `file.dcm#frame=N`; 'all' -> one source per frame
    of a multi-frame file (`file.dcm#frame=1`, ...); None leaves them as they are. Other images pass through."""
    out: list[str] = []
    for source in sources:
        if frame is None or source.startswith("sample:") or split_frame(source)[1] is not None \
                or not _is_dicom(source):
            out.append(source)
        elif frame == "all":
            n = dicom_frames(source)
            out.extend([source] if n == 1 else [f"{source}#frame={k}" for k in range(1, n + 1)])
        else:
            out.append(f"{source}#frame={frame}")
    return out


def expand_inputs(specs: Iterable[str], *, default_samples: bool = True, frame: Frame = None) -> list[str]:
    """Turn files, folders (searched recursively), globs and `sample:<name>` into a list of sources.

    With no specs and `default_samples`, the four bundled photos that stand in for the article's.
    `frame` picks frames of multi-frame DICOM files (see `with_frames`).
    """
    specs = list(specs)
    if not specs and default_samples:
        return [f"sample:{n}" for n in DEFAULT_SAMPLES]
    out: list[str] = []
    exts = IMAGE_EXTENSIONS + DICOM_EXTENSIONS
    for spec in specs:
        if spec.startswith("sample:"):
            _sample_path(spec.removeprefix("sample:"))  # fail early on a bad name
            out.append(spec)
        elif os.path.isdir(spec):
            found = sorted(
                str(p) for p in Path(spec).rglob("*") if p.is_file() and p.suffix.lower() in exts
            )
            if not found:
                raise UserError(f"folder '{spec}' holds no images ({_FORMATS_HINT}); point at another folder")
            out.extend(found)
        elif any(ch in spec for ch in "*?["):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise UserError(f"pattern '{spec}' matches no file; check the pattern (quote it in the shell)")
            out.extend(found)
        else:
            out.append(spec)  # a file: checked when it is read
    return with_frames(out, frame)


def load_image(source: str, *, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Decode one source (a file path, `file.dcm#frame=K` or `sample:<name>`) to float32 pixels in [0, 1].

    Raises:
        UserError: the file is missing, empty, not an image, truncated, too large, or unsupported.
    """
    if source.startswith("sample:"):
        name = source.removeprefix("sample:")
        path = _sample_path(name)
        img = _load_pil(path, max_pixels)
        img.source, img.name = source, name
        return img
    path_text, frame = split_frame(source)
    path = Path(path_text)
    if not path.exists():
        if os.path.lexists(path):
            raise UserError(f"cannot read '{source}': it is a broken or looping symbolic link; point it at a file")
        raise UserError(f"cannot read '{source}': no such file; check the path")
    if path.is_dir():
        raise UserError(f"'{source}' is a folder; pass it as an input to read the images inside")
    if path.stat().st_size == 0:
        raise UserError(f"'{source}' is empty (0 bytes); re-export or re-copy the file")
    if path.suffix.lower() in DICOM_EXTENSIONS or _looks_like_dicom(path):
        img = _load_dicom(path, frame)
        if frame is not None:
            img.source, img.name = source, f"{path.stem}_frame{frame}"
        return img
    if frame is not None:
        raise UserError(f"'{source}': only DICOM files have frames; drop '#frame={frame}'")
    return _load_pil(path, max_pixels)


def iter_images(sources: Iterable[str], *, skip_bad: bool = False,
                skipped: list[tuple[str, str]] | None = None) -> Iterator[LoadedImage]:
    """Decode sources one at a time (memory does not grow with their number).

    Args:
        skip_bad: report a bad file in `skipped` as (source, reason) and go on, instead of raising.
    """
    for source in sources:
        try:
            yield load_image(source)
        except UserError as err:
            if not skip_bad:
                raise
            if skipped is not None:
                skipped.append((source, str(err)))


def _looks_like_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _load_pil(path: Path, max_pixels: int) -> LoadedImage:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise Image.DecompressionBombError(f"{w}x{h}")
                img.load()
                fmt = img.format
                img = ImageOps.exif_transpose(img)
                pixels, meta = _pil_to_float(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UserError(
            f"'{path}' declares {err} pixels, above the safety limit of {max_pixels:,} "
            "(decompression-bomb guard); downscale the image first"
        ) from None
    except UnidentifiedImageError:
        raise UserError(f"'{path}' is not an image that can be read ({_FORMATS_HINT}); "
                        "check that the file is what its name says") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"'{path}' is truncated or corrupt ({err}); re-export or re-copy the file") from None
    if min(pixels.shape[:2]) < 1:
        raise UserError(f"'{path}' has no pixels ({pixels.shape}); re-export the file")
    meta["format"] = fmt
    return LoadedImage(source=str(path), name=path.stem, pixels=pixels, meta=meta)


def _pil_to_float(img: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """PIL image of any mode -> float32 [0, 1] array, (H, W) or (H, W, 3)."""
    mode = img.mode
    meta: dict[str, Any] = {"mode": mode, "bits": 8}
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img).astype(np.float32) / 65535.0
        meta["bits"] = 16
    elif mode == "I":
        arr = np.asarray(img).astype(np.float32)
        top = 65535.0 if arr.max() <= 65535 else float(arr.max())
        arr = np.clip(arr, 0, None) / top
        meta["bits"] = 16 if top == 65535.0 else 32
    elif mode == "F":
        arr = np.asarray(img).astype(np.float32)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if lo < 0 or hi > 1:
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        meta["bits"] = 32
    elif mode in ("1", "L"):
        arr = np.asarray(img.convert("L")).astype(np.float32) / 255.0
    elif mode in ("LA", "RGBA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA")).astype(np.float32) / 255.0
        alpha = rgba[..., 3:4]
        arr = rgba[..., :3] * alpha + (1.0 - alpha)  # composite over white
        if mode == "LA":
            arr = arr[..., 0]
        meta["alpha"] = "composited over white"
    else:  # RGB, P, CMYK, YCbCr, LAB, HSV
        arr = np.asarray(img.convert("RGB")).astype(np.float32) / 255.0
    return np.ascontiguousarray(np.nan_to_num(arr, nan=0.0), dtype=np.float32), meta


def _load_dicom(path: Path, frame: int | None = None) -> LoadedImage:
    """Decode a DICOM image; of a multi-frame file, frame `frame` (1-based), or the first with a note on stderr."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise UserError(f"'{path}' is not a DICOM file pydicom can read; check the file") from None
    except Exception as err:  # pydicom raises many types for broken files
        raise UserError(f"'{path}' is a corrupt DICOM file ({type(err).__name__}: {err})") from None
    if "PixelData" not in ds:
        if "Rows" in ds and "Columns" in ds:
            raise UserError(f"'{path}' is a DICOM image header without its pixel data (the file is probably cut "
                            "short); re-export or re-copy the file")
        raise UserError(f"'{path}' is a DICOM file without pixel data (a report or structure set?); "
                        "pass an image")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    _check_dicom_length(path, ds, syntax)
    frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    if frame is not None and not 1 <= frame <= frames:
        raise UserError(f"'{path}' has {frames} frame{'s' if frames > 1 else ''}; frame {frame} is out of range "
                        f"(--frame 1..{frames}, or --frame all)")
    try:
        if frames > 1:  # decode only the frame asked for (a cine loop may hold hundreds)
            from pydicom.pixels import pixel_array

            arr = pixel_array(ds, index=(frame or 1) - 1)
        else:
            arr = ds.pixel_array
    except Exception as err:
        raise UserError(_decode_failure(path, syntax, err)) from None
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    meta: dict[str, Any] = {"format": "DICOM", "photometric": photometric,
                            "bits": int(ds.get("BitsStored", 8) or 8), "frames": frames}
    if frames > 1:
        meta["frame"] = frame or 1
        if frame is None:
            meta["note"] = f"first of {frames} frames"
            sys.stderr.write(f"note: only the first of the {frames} frames of '{path}' was used; "
                             "pass --frame N for another one or --frame all for every frame\n")
    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        from pydicom.pixels import apply_color_lut

        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as err:
            raise UserError(f"'{path}' is a palette-colour DICOM whose palette cannot be applied "
                            f"({type(err).__name__}: {err}); re-export it as RGB") from None
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2]) if "RedPaletteColorLookupTableDescriptor" in ds else 8
        pixels = np.clip(rgb.astype(np.float32) / float(2 ** bits - 1), 0, 1)
        meta["palette"] = f"{bits}-bit colour lookup table applied"
    elif arr.ndim == 3 and arr.shape[-1] == 3:  # colour: pydicom already converted to RGB
        top = float(2 ** int(ds.get("BitsStored", 8) or 8) - 1)
        pixels = np.clip(arr.astype(np.float32) / top, 0, 1)
    elif arr.ndim == 2:
        pixels, window = dicom_grayscale(arr, ds)
        meta["window"] = window
    else:
        raise UserError(f"'{path}' has pixel data of shape {arr.shape}, not a 2D image; pass a single image")
    return LoadedImage(source=str(path), name=path.stem, pixels=np.ascontiguousarray(pixels, np.float32),
                       meta=meta)


# what to install for each family of compressed transfer syntaxes (pydicom's decoder plugins)
_DICOM_DECODERS = (
    (("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"),
     "pylibjpeg pylibjpeg-libjpeg"),
    (("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"), "pyjpegls"),
    (("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
      "1.2.840.10008.1.2.4.203"), "pylibjpeg pylibjpeg-openjpeg"),
    (("1.2.840.10008.1.2.5",), "pylibjpeg pylibjpeg-rle"),
)


def dicom_decoder_hint(syntax: Any) -> str:
    """The pip packages that let pydicom decode a transfer syntax UID."""
    for uids, packages in _DICOM_DECODERS:
        if str(syntax) in uids:
            return packages
    return "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"


def _syntax_name(syntax: Any) -> str:
    name = getattr(syntax, "name", None)
    return f"{name} ({syntax})" if name and name != str(syntax) else str(syntax)


def _decode_failure(path: Path, syntax: Any, err: Exception) -> str:
    """One line for pixel data that pydicom could not decode."""
    if syntax is None:
        return f"'{path}' does not say how its pixels are encoded (no transfer syntax); re-export the file"
    if getattr(syntax, "is_compressed", False):
        return (f"cannot decode '{path}': no installed decoder reads its transfer syntax {_syntax_name(syntax)}; "
                f"install one with `pip install {dicom_decoder_hint(syntax)}`")
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"cannot decode the pixels of '{path}' ({_syntax_name(syntax)}: {reason}); re-export the file"


def _check_dicom_length(path: Path, ds: Any, syntax: Any) -> None:
    """An uncompressed file cut short holds fewer pixel bytes than rows x columns x samples x bits x frames."""
    if syntax is None or getattr(syntax, "is_compressed", True):
        return
    try:
        n = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
             * int(ds.get("NumberOfFrames", 1) or 1))
        bits = int(ds.BitsAllocated)
        have = len(ds.PixelData)
    except (AttributeError, TypeError, ValueError):
        return  # incomplete attributes: pydicom's decoder reports them
    need = (n * bits + 7) // 8
    if have < need:
        raise UserError(f"'{path}' is truncated: its pixel data holds {have:,} of the {need:,} bytes that "
                        f"{int(ds.Rows)}x{int(ds.Columns)} pixels need; re-export or re-copy the file")


def dicom_grayscale(arr: np.ndarray, ds: Any) -> tuple[np.ndarray, str]:
    """Stored values -> display intensities in [0, 1] for a grayscale DICOM image.

    Order as in DICOM PS3.3 C.11: modality LUT (rescale slope/intercept), then the VOI transform (the
    first window, or the VOI LUT), then MONOCHROME1 inverted so that bright means dense in every output.
    Without a window, the full range of the modality values is used.
    """
    from pydicom.multival import MultiValue
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c = float(center[0] if isinstance(center, MultiValue) else center)
        w = float(width[0] if isinstance(width, MultiValue) else width)
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        out = _window(values, c, max(w, 1.0), function)
        how = f"window center {c:g} width {w:g} ({function.lower()})"
    elif "VOILUTSequence" in ds:
        out = np.asarray(apply_voi_lut(arr, ds, index=0), dtype=np.float64)
        out = _stretch(out)
        how = "VOI LUT"
    else:
        out = _stretch(values)
        how = "full range"
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out
        how += ", MONOCHROME1 inverted"
    return out.astype(np.float32), how


def _window(x: np.ndarray, c: float, w: float, function: str) -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2) mapped to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if function == "LINEAR_EXACT":
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    if w <= 1.0:
        return (x > c - 0.5).astype(np.float64)
    return np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)


def _stretch(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
