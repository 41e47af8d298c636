"""The audit's shards on disk: what lets a killed audit resume and a torchrun audit merge its ranks' work.

The audit's images are cut into fixed shards of whole batches (the cut depends only on the number of images,
the batch size and `--shard-size`, never on the number of processes). Each shard's result (its per-image rows
of every check, its timings, its unreadable images and its few most telling flagged images) is written as
`shards/shard-NNNNN.json` (with the thumbnails' arrays in `shard-NNNNN.npz`) once the shard is finished, the
JSON last and atomically: a shard is done when its JSON exists and carries the key of the work asked for now
(model weights, methods and options, checks, settings, and the bytes of every image and mask of the shard).
The summaries are always computed from these files, by one process and by torchrun alike, so a resumed or
distributed audit gives the audit.json of an uninterrupted single-process run.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saliencylab.fsutil import _json_default, atomic_path, write_text

STORE_VERSION = 1
FOLDER = "shards"
_NAME = re.compile(r"shard-(\d{5,})\.(json|npz)$")


@dataclass
class ShardResult:
    """What one shard of the audit produced.

    Attributes:
        rows: per check name, its rows (dataclass instances; '__images__' holds the predictions).
        timings: seconds per stage ('load', 'maps: <method>', check names).
        thumbs: the shard's most telling flagged images (dataclass instances with array fields).
        unreadable: (file, reason) per image that could not be read.
        images: readable images in the shard.
    """

    rows: dict[str, list[Any]]
    timings: dict[str, float]
    thumbs: list[Any]
    unreadable: list[tuple[str, str]]
    images: int


def shard_path(out: Path, shard: int, suffix: str = ".json") -> Path:
    return out / FOLDER / f"shard-{shard:05d}{suffix}"


def has_shards(out: Path) -> bool:
    """Whether `out` holds any finished shard of an audit."""
    return (out / FOLDER).is_dir() and any((out / FOLDER).glob("shard-*.json"))


def _header(out: Path, shard: int) -> dict[str, Any] | None:
    try:
        data = json.loads(shard_path(out, shard).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("version") == STORE_VERSION else None


def finished(out: Path, shard: int, key: str) -> int | None:
    """The number of readable images of a finished shard with this key; None when it must be (re)computed."""
    head = _header(out, shard)
    if head is None or head.get("key") != key:
        return None
    if head["thumbs"] and not shard_path(out, shard, ".npz").is_file():
        return None
    return int(head["images"])


def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}:{type(obj).__qualname__}"


def _row_dict(row: Any) -> dict[str, Any]:
    return {"type": _type_name(row), **asdict(row)}


def _row_type(name: str) -> type:
    """The dataclass a stored row was made from ('module:QualName', a module already imported)."""
    module, _, qualname = name.partition(":")
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and is_dataclass(obj)):
        raise ValueError(f"a stored row names {name!r}, which is not a loaded dataclass")
    return obj


def write(out: Path, shard: int, key: str, result: ShardResult) -> None:
    """Write one finished shard: the thumbnails' arrays first, then the JSON that marks the shard done."""
    arrays: dict[str, np.ndarray] = {}
    thumbs = []
    for i, t in enumerate(result.thumbs):
        meta = {}
        for f in fields(t):
            value = getattr(t, f.name)
            if isinstance(value, np.ndarray):
                arrays[f"{i}.{f.name}"] = value
            elif value is not None:
                meta[f.name] = value
        thumbs.append({"type": _type_name(t), **meta})
    if arrays:
        with atomic_path(shard_path(out, shard, ".npz")) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    else:
        shard_path(out, shard, ".npz").unlink(missing_ok=True)
    body = {"version": STORE_VERSION, "key": key, "images": result.images, "timings": result.timings,
            "unreadable": [list(u) for u in result.unreadable], "thumbs": thumbs,
            "rows": {name: [_row_dict(r) for r in rows] for name, rows in result.rows.items()}}
    write_text(shard_path(out, shard), json.dumps(body, default=_json_default) + "\n")


def read(out: Path, shard: int) -> ShardResult:
    """A finished shard back as dataclass rows and thumbnails."""
    head = _header(out, shard)
    if head is None:
        raise FileNotFoundError(shard_path(out, shard))
    rows = {name: [_row_type(r.pop("type"))(**r) for r in got] for name, got in head["rows"].items()}
    thumbs = []
    if head["thumbs"]:
        with np.load(shard_path(out, shard, ".npz"), allow_pickle=False) as arrays:
            for i, meta in enumerate(head["thumbs"]):
                cls = _row_type(meta.pop("type"))
                given = {f.name: arrays[f"{i}.{f.name}"] for f in fields(cls) if f"{i}.{f.name}" in arrays}
                thumbs.append(cls(**{**{f.name: None for f in fields(cls)}, **meta, **given}))
    return ShardResult(rows=rows, timings=head["timings"], thumbs=thumbs,
                       unreadable=[(f, r) for f, r in head["unreadable"]], images=int(head["images"]))


def remove(out: Path, first: int, stop: int | None = None) -> None:
    """Delete the files of shards first, first + 1, ... (up to `stop`, or all): an earlier, larger audit's."""
    folder = out / FOLDER
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and first <= int(m.group(1)) and (stop is None or int(m.group(1)) < stop):
            with contextlib.suppress(OSError):
                p.unlink()


def merged(results: Sequence[ShardResult]) -> ShardResult:
    """The shards' results in shard order as one (rows concatenated, timings summed)."""
    rows: dict[str, list[Any]] = {"__images__": []}
    timings: dict[str, float] = {}
    out = ShardResult(rows, timings, [], [], 0)
    for r in results:
        for name, got in r.rows.items():
            rows.setdefault(name, []).extend(got)
        for k, v in r.timings.items():
            timings[k] = timings.get(k, 0.0) + v
        out.thumbs += r.thumbs
        out.unreadable += r.unreadable
        out.images += r.images
    return out
