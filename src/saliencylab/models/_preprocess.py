"""Preprocessing that a model file may not carry: from keyword arguments, CLI flags, or a sidecar `model.json`.

Every value a file declares wins over nothing, and a flag that contradicts the file is a one-line error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from saliencylab.errors import UserError

SIDECAR = "model.json"
_FLAGS = {"input_size": "--input-size", "channels": "--channels", "mean": "--mean", "std": "--std",
          "classes": "--classes", "cam_layer": "cam_layer"}


@dataclass(frozen=True)
class Preprocessing:
    """What it takes to feed a model; None where unknown.

    Attributes:
        input_size: (H, W) in pixels.
        channels: 1 or 3.
        mean, std: per-channel normalisation of pixels in [0, 1] (identity when neither is known).
        classes: class names, one per logit (two for a single logit: negative, positive).
        cam_layer: the layer CAM methods use by default.
    """

    input_size: tuple[int, int] | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    classes: tuple[str, ...] | None = None
    cam_layer: str | None = None

    def over(self, base: Preprocessing) -> Preprocessing:
        """Self's values where set, else base's (no contradiction check: a sidecar under flags)."""
        mine = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(base, **{k: v for k, v in mine.items() if v is not None})


def make_preprocessing(input_size: int | Sequence[int] | None = None, channels: int | None = None,
                       mean: float | Sequence[float] | None = None, std: float | Sequence[float] | None = None,
                       classes: Sequence[str] | None = None, cam_layer: str | None = None,
                       source: str = "load_model") -> Preprocessing:
    """Check and normalise user-given values (an int size is square; one mean/std value serves every channel)."""
    size = None
    if input_size is not None:
        size = (int(input_size), int(input_size)) if isinstance(input_size, (int, float)) else \
            tuple(int(s) for s in input_size)
        if len(size) != 2 or min(size) < 1:
            raise UserError(f"{source}: input size {input_size} is not H or H,W in pixels, e.g. --input-size 224")
    if channels is not None and int(channels) not in (1, 3):
        raise UserError(f"{source}: --channels {channels}: use 1 (grey) or 3 (RGB)")

    def floats(v: Any, name: str) -> tuple[float, ...] | None:
        if v is None:
            return None
        vals = (float(v),) if isinstance(v, (int, float)) else tuple(float(s) for s in v)
        if not vals or (name == "--std" and min(vals) <= 0):
            raise UserError(f"{source}: {name} {v} must be {'positive ' if name == '--std' else ''}numbers, "
                            "one per channel (or one for all)")
        return vals

    names = tuple(str(c) for c in classes) if classes is not None else None
    if names is not None and (len(names) < 2 or len(set(names)) != len(names)):
        raise UserError(f"{source}: --classes needs at least two distinct names (negative,positive for one logit)")
    return Preprocessing(size, int(channels) if channels is not None else None, floats(mean, "--mean"),
                         floats(std, "--std"), names, cam_layer)


def merge(declared: Preprocessing, given: Preprocessing, source: str) -> Preprocessing:
    """The file's values completed by the given ones; a given value that contradicts the file is an error."""
    out = {}
    for f in fields(Preprocessing):
        have, want = getattr(declared, f.name), getattr(given, f.name)
        if _differ(have, want):
            raise UserError(f"{_FLAGS[f.name]} {_show(want)} contradicts {source}, which says {_show(have)}; "
                            "drop the flag or fix model.json")
        out[f.name] = have if have is not None else want
    return Preprocessing(**out)


def _differ(have: Any, want: Any) -> bool:
    if have is None or want is None:
        return False
    if not isinstance(have, tuple):
        return have != want
    a, b = _expand(have, want), _expand(want, have)
    if len(a) != len(b):
        return True
    return any(abs(x - y) > 1e-6 if isinstance(x, float) else x != y for x, y in zip(a, b, strict=True))


def _expand(v: tuple[Any, ...], other: tuple[Any, ...]) -> tuple[Any, ...]:
    """A one-value mean/std against a per-channel one compares value by value."""
    return v * len(other) if len(v) == 1 and len(other) > 1 and isinstance(v[0], float) else v


def _show(v: Any) -> str:
    return ",".join(str(s) for s in v) if isinstance(v, tuple) else str(v)


def finalise(p: Preprocessing, source: str, *, default_size: tuple[int, int] | None = None
             ) -> tuple[tuple[int, int], int, tuple[float, ...], tuple[float, ...]]:
    """(input_size, channels, mean, std) with defaults: 3 channels, identity normalisation; the size is required."""
    size = p.input_size or default_size
    if size is None:
        raise UserError(f"{source} does not say its input size; pass --input-size H[,W] (or input_size=...), or "
                        f"write {{\"input_size\": [H, W]}} into {SIDECAR} next to it")
    channels = p.channels or 3
    mean = p.mean or (0.0,) * channels
    std = p.std or (1.0,) * channels
    mean, std = (mean * channels if len(mean) == 1 else mean), (std * channels if len(std) == 1 else std)
    if len(mean) != channels or len(std) != channels:
        raise UserError(f"{source}: --mean/--std give {len(mean)}/{len(std)} values for {channels} channels; "
                        "give one value per channel")
    return (int(size[0]), int(size[1])), channels, tuple(mean), tuple(std)


def class_names(p: Preprocessing, num_outputs: int, source: str, default: Sequence[str] | None = None) -> list[str]:
    """The given class names, checked against the logits' width; numbered names when none are known."""
    names = list(p.classes) if p.classes is not None else (list(default) if default is not None else None)
    want = 2 if num_outputs == 1 else num_outputs
    if names is None:
        return ["negative", "positive"] if num_outputs == 1 else [f"class_{i}" for i in range(num_outputs)]
    if len(names) != want:
        raise UserError(f"{source} has {num_outputs} output{'s' if num_outputs > 1 else ''} but {len(names)} class "
                        f"names were given; give {want} names" + (" (negative,positive)" if num_outputs == 1 else ""))
    return names


def read_sidecar(model_path: Path) -> Preprocessing:
    """`model.json` beside a model file (or inside a model folder), if any, checked key by key."""
    folder = model_path if model_path.is_dir() else model_path.parent
    path = folder / SIDECAR
    if not path.is_file():
        return Preprocessing()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"'{path}' is not valid JSON ({type(err).__name__}); fix it or remove it") from None
    keys = {"input_size", "channels", "mean", "std", "classes", "cam_layer"}
    if not isinstance(data, dict) or set(data) - keys:
        extra = sorted(set(data) - keys) if isinstance(data, dict) else "not an object"
        raise UserError(f"'{path}': unknown keys {extra}; it may hold {', '.join(sorted(keys))}")
    try:
        return make_preprocessing(**data, source=str(path))
    except (TypeError, ValueError):
        raise UserError(f"'{path}': a value has the wrong type; e.g. {{\"input_size\": [224, 224], \"channels\": 3, "
                        "\"mean\": [0.5], \"std\": [0.25], \"classes\": [\"Normal\", \"COVID\"]}") from None


def preprocessing_kwargs(input_size: str | None = None, channels: int | None = None, mean: str | None = None,
                         std: str | None = None, classes: str | None = None,
                         classes_file: Path | None = None) -> dict[str, Any]:
    """CLI flags (strings as typed) -> `load_model` keyword arguments; only the flags that were given.

    `--input-size 224` or `224,192` (H,W); `--mean 0.5` or `0.485,0.456,0.406`; `--classes Normal,COVID`;
    `--classes-file names.txt` (one name per line).
    """
    out: dict[str, Any] = {}

    def numbers(text: str, flag: str, kind: type) -> list[Any]:
        try:
            return [kind(s) for s in text.replace("x", ",").split(",") if s.strip()]
        except ValueError:
            raise UserError(f"{flag} {text}: give comma-separated numbers, e.g. {flag} "
                            f"{'224,224' if kind is int else '0.5,0.5,0.5'}") from None

    if input_size is not None:
        size = numbers(input_size, "--input-size", int)
        out["input_size"] = size * 2 if len(size) == 1 else size
    if channels is not None:
        out["channels"] = channels
    if mean is not None:
        out["mean"] = numbers(mean, "--mean", float)
    if std is not None:
        out["std"] = numbers(std, "--std", float)
    if classes is not None and classes_file is not None:
        raise UserError("give --classes or --classes-file, not both")
    if classes is not None:
        out["classes"] = [c.strip() for c in classes.split(",") if c.strip()]
    if classes_file is not None:
        try:
            out["classes"] = [ln.strip() for ln in Path(classes_file).read_text().splitlines() if ln.strip()]
        except OSError as err:
            raise UserError(f"--classes-file '{classes_file}' cannot be read ({type(err).__name__})") from None
    make_preprocessing(**out, source="flags")  # check early, before any model is loaded
    return out
